import json
import os
import signal
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datapipe
from datapipe.format import DatasetError
from tests.datapipe.conftest import make_rows


def assert_round_trip(ds, rows):
    assert len(ds) == len(rows)
    for i, r in enumerate(rows):
        got = ds[i]
        assert got["input_ids"].tolist() == r["input_ids"]
        assert got["text"] == r["text"] and got["score"] == r["score"] and got["domain"] == r["domain"]
    np.testing.assert_array_equal(ds.index["length"], [len(r["input_ids"]) for r in rows])


def sources(kind, rows, tmp_path):
    table = pa.Table.from_pylist(rows)
    if kind == "dicts":
        return iter(rows)
    if kind == "table":
        return table
    if kind == "reader":
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=13))
    if kind == "hf":
        return datasets.Dataset.from_list(rows)
    if kind == "hf_shuffled":  # an indices mapping must be honoured
        return datasets.Dataset.from_list(rows[::-1]).shuffle(seed=0).sort("score")
    if kind == "parquet":
        a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
        pq.write_table(table.slice(0, 50), a)
        pq.write_table(table.slice(50), b)
        return [str(a), str(b)]
    if kind == "jsonl":
        p = tmp_path / "rows.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in rows))
        return str(p)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dicts", "table", "reader", "hf", "hf_shuffled", "parquet", "jsonl"])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_round_trip_every_source_kind(tmp_path, kind, compression):
    rows = make_rows(97)
    out = datapipe.write_dataset(sources(kind, rows, tmp_path), tmp_path / "ds", shard_rows=20,
                                 compression=compression)
    ds = datapipe.ArrowDataset.open(out)
    assert ds.num_shards == 5
    assert ds.schema.field("input_ids").type == pa.list_(pa.int32())
    assert_round_trip(ds, rows)
    assert ds.verify()["ok"]


def test_manifest_contents(tmp_path):
    out = datapipe.write_dataset(make_rows(30), tmp_path / "ds", shard_rows=16, index_columns=("length", "domain"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_rows"] == 30 and m["format_version"] == 2 and m["manifest_checksum"].startswith("xxh3_64:")
    assert [s["rows"] for s in m["shards"]] == [16, 14]
    assert all(s["checksum"].startswith(("xxh3_64:", "blake2b:")) and s["bytes"] > 0 for s in m["shards"])
    assert m["index_columns"] == ["length", "domain"]
    ds = datapipe.ArrowDataset.open(out)
    assert set(ds.index) == {"length", "domain"}


@pytest.mark.parametrize("bad_rows,match", [
    ([{"input_ids": [1], "length": 1}, {"input_ids": [2], "length": -3}], "row 1, column 'length'.*negative"),
    ([{"input_ids": [1], "duration": 1.0}, {"input_ids": [2], "duration": float("nan")}], "row 1, column 'duration'"),
    ([{"input_ids": [1], "length": 1}, {"input_ids": [2], "length": None}], "row 1, column 'length': null"),
    ([{"input_ids": [1]}, {"input_ids": None}], "row 1, column 'input_ids': null"),
    ([{"input_ids": [1]}, {"ids": [2]}], "row 1: columns"),
])
def test_bad_rows_name_row_and_column(tmp_path, bad_rows, match):
    with pytest.raises(DatasetError, match=match):
        datapipe.write_dataset(bad_rows, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.tmp")], "temporary files left behind"


def test_empty_source(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        datapipe.write_dataset([], tmp_path / "ds")
    with pytest.raises(DatasetError, match="empty"):
        datapipe.write_dataset(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}), tmp_path / "ds")


def test_schema_mismatch_across_sources_names_file(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2]], "x": [1]}), a)
    pq.write_table(pa.table({"input_ids": [[1, 2]], "y": ["s"]}), b)
    with pytest.raises(DatasetError, match=r"b\.parquet.*do not match.*a\.parquet"):
        datapipe.write_dataset([str(a), str(b)], tmp_path / "ds")
    pq.write_table(pa.table({"input_ids": [[1, 2]], "x": ["not an int"]}), b)
    with pytest.raises(DatasetError, match=r"b\.parquet.*schema"):
        datapipe.write_dataset([str(a), str(b)], tmp_path / "ds")


def test_existing_dataset_needs_overwrite(tmp_path):
    datapipe.write_dataset(make_rows(5), tmp_path / "ds")
    with pytest.raises(DatasetError, match="overwrite=True"):
        datapipe.write_dataset(make_rows(6), tmp_path / "ds")
    datapipe.write_dataset(make_rows(6), tmp_path / "ds", overwrite=True)
    assert len(datapipe.ArrowDataset.open(tmp_path / "ds")) == 6


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shard_rows"):
        datapipe.write_dataset(make_rows(3), tmp_path / "ds", shard_rows=0)
    with pytest.raises(ValueError, match="compression"):
        datapipe.write_dataset(make_rows(3), tmp_path / "ds", compression="gzip")
    with pytest.raises(TypeError, match="source must be"):
        datapipe.write_dataset(42, tmp_path / "ds")
    with pytest.raises(DatasetError, match="index column 'nope'"):
        datapipe.write_dataset(make_rows(3), tmp_path / "ds", index_columns=("nope",))


def test_interrupted_write_leaves_no_manifest_and_next_write_succeeds(tmp_path):
    # a real process killed in the middle of writing shards
    out = tmp_path / "ds"
    script = textwrap.dedent(f"""
        import os, signal, datapipe
        def rows():
            for i in range(100000):
                if i == 5000:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield {{"input_ids": list(range(i % 50))}}
        datapipe.write_dataset(rows(), {str(out)!r}, shard_rows=1000)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    left = [p for p in tmp_path.iterdir()]
    assert left and all(p.name.startswith(".ds.") for p in left)  # the killed writer's temporary and lock
    with pytest.raises(DatasetError, match="no manifest.json"):
        datapipe.ArrowDataset.open(next(p for p in left if p.is_dir()))
    datapipe.write_dataset(make_rows(10), out)
    assert len(datapipe.ArrowDataset.open(out)) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the next write removed what the dead one left


def test_interrupted_overwrite_keeps_the_old_dataset(tmp_path):
    out = datapipe.write_dataset(make_rows(7), tmp_path / "ds")

    def rows():
        yield {"input_ids": [1], "text": "a", "score": 0.0, "domain": 0}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        datapipe.write_dataset(rows(), out, overwrite=True)
    ds = datapipe.ArrowDataset.open(out)
    assert len(ds) == 7 and ds.verify()["ok"]


def test_token_ids_cast_to_int32_with_overflow_check(tmp_path):
    t = pa.table({"input_ids": pa.array([[1, 2**40]], pa.list_(pa.int64()))})
    with pytest.raises(DatasetError):
        datapipe.write_dataset(t, tmp_path / "ds")


def test_rows_with_numpy_arrays_and_torch_tensors(tmp_path):
    import torch

    rows = [{"input_ids": np.arange(i, dtype=np.int64), "t": torch.tensor([float(i)])} for i in range(6)]
    ds = datapipe.ArrowDataset.open(datapipe.write_dataset(rows, tmp_path / "ds", shard_rows=4))
    assert ds[5]["input_ids"].tolist() == list(range(5)) and ds[5]["t"].tolist() == [5.0]
    assert ds.index["length"].tolist() == list(range(6))


@pytest.mark.parametrize("ids,match", [
    ([[1, 2], [3, None, 4]], r"rows: row 1, column 'input_ids': null token id at position 1"),
    ([[1, 2], [3], [4, -7]], r"rows: row 2, column 'input_ids': token id -7 at position 1 is negative"),
    ([[1], [2**31]], r"row 1, column 'input_ids': token id 2147483648 at position 0 does not fit int32"),
])
def test_null_negative_or_too_large_token_ids_are_refused_naming_row_and_column(tmp_path, ids, match):
    with pytest.raises(DatasetError, match=match):
        datapipe.write_dataset([{"input_ids": x} for x in ids], tmp_path / "ds")
    t = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int64()))})
    with pytest.raises(DatasetError, match=match.replace("rows: ", "<table>: ")):
        datapipe.write_dataset(t, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_float_token_ids_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="'input_ids' must be a list of integer token ids"):
        datapipe.write_dataset([{"input_ids": [1.5, 2.0]}], tmp_path / "ds")


def test_bad_index_values_name_the_file_and_the_row_within_it(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"input_ids": [[1]] * 8, "duration": [1.0] * 8}), a)
    d = [1.0] * 8
    d[5] = float("nan")
    pq.write_table(pa.table({"input_ids": [[1]] * 8, "duration": d}), b)
    with pytest.raises(DatasetError, match=r"b\.parquet: row 5, column 'duration': value nan is not finite"):
        datapipe.write_dataset([str(a), str(b)], tmp_path / "ds")


@pytest.mark.parametrize("col,values,match", [
    ("length", pa.array([3, 2**63 + 10], pa.uint64()), r"row 1, column 'length': value 9223372036854775818 does not fit int64"),
    ("duration", pa.array([1.0, 1e30]), r"row 1, column 'duration': value 1e\+30 is absurdly large"),
    ("num_frames", pa.array([4, -1]), r"row 1, column 'num_frames': value -1 is negative"),
])
def test_absurd_lengths_are_refused(tmp_path, col, values, match):
    with pytest.raises(DatasetError, match=match):
        datapipe.write_dataset(pa.table({"x": [1, 2], col: values}), tmp_path / "ds")


def test_named_batches_name_their_source(tmp_path):
    good = pa.record_batch({"input_ids": pa.array([[1, 2]] * 4, pa.list_(pa.int32()))})
    bad = pa.record_batch({"input_ids": pa.array([[1], [2], [-3]], pa.list_(pa.int32()))})
    pairs = [("a.txt", good), ("b.txt", good), ("b.txt", bad)]
    with pytest.raises(DatasetError, match=r"b\.txt: row 6, column 'input_ids': token id -3"):
        datapipe.write_dataset(iter(pairs), tmp_path / "ds")
    ds = datapipe.ArrowDataset.open(datapipe.write_dataset(pairs[:2], tmp_path / "ok"))
    assert len(ds) == 8


def test_extra_files_are_listed_and_checked(tmp_path):
    out = datapipe.write_dataset(make_rows(5), tmp_path / "ds",
                                 extra_files={"notes.bin": lambda p: p.write_bytes(b"hello")})
    m = json.loads((out / "manifest.json").read_text())
    assert [(f["file"], f["bytes"]) for f in m["files"]] == [("notes.bin", 5)]
    assert datapipe.ArrowDataset.open(out).verify()["files"] == 3
    (out / "notes.bin").write_bytes(b"hellp")
    with pytest.raises(DatasetError, match=r"notes\.bin: checksum mismatch"):
        datapipe.ArrowDataset.open(out).verify()
