"""The streaming local engine of ``datapipe.decompose`` (datapipe/decomposition_stream.py): the same files, byte
for byte, as the in-memory path (``decompose_lengths`` + ``write_index``), whatever the block size; real Arrow
datasets in tmp_path, lengths from a real memory-mapped ``.npy``."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

import datapipe
from datapipe.dataset import ArrowDataset
from datapipe.decomposition import verify_decomposition, write_index
from datapipe.decomposition_stream import ColumnTableFile, plan_stream, stored_arrays, write_stream
from datapipe.format import DatasetError, file_checksum
from native.decompose import decompose_lengths

FILES = ("manifest.json", "pieces.arrow", "sequences.arrow")


def _write(path, lengths):
    rng = np.random.default_rng(len(lengths))
    datapipe.write_dataset([{"input_ids": rng.integers(0, 1000, int(L)).astype(np.int32).tolist()} for L in lengths],
                           path, shard_rows=64)
    return path


def _lognormal(n, seed=0):
    return np.maximum(1, np.random.default_rng(seed).lognormal(4.0, 1.3, n).astype(np.int64))


# (lengths, min_log2, max_log2): every document shorter than 2^min; one document; documents of 2^(max+1) tokens
# and more (size draws) on both sides of block boundaries; a lognormal corpus
CORPORA = {
    "one_short": ([5], 4, 6),
    "one_long": ([700], 3, 5),
    "all_tails": ([3, 7, 1, 15, 2], 4, 6),
    "long_at_edges": ([9, 200, 300, 13, 257, 31, 1, 513, 129, 64, 3, 260], 3, 6),
    "lognormal": (_lognormal(300).tolist(), 4, 8),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {name: _write(root / name, lens) for name, (lens, _, _) in CORPORA.items()}


def _straddles(ref, block_rows):
    """Whether a packed remainder sequence holds pieces of rows from two blocks."""
    off, rows = ref["sequence_offsets"], ref["row"]
    return any(len(set((rows[off[s]:off[s + 1]] // block_rows).tolist())) > 1 for s in range(len(off) - 1))


@pytest.mark.parametrize("remainder", ["pack", "pad", "drop"])
@pytest.mark.parametrize("name", list(CORPORA))
def test_streamed_files_are_byte_identical_to_the_in_memory_path(datasets, name, remainder):
    path = datasets[name]
    lens, lo, hi = CORPORA[name]
    params = {"min_log2": lo, "max_log2": hi, "remainder": remainder, "seed": 11}
    ref = decompose_lengths(lens, min_log2=lo, max_log2=hi, remainder=remainder, seed=11)
    write_index(ArrowDataset.open(path), ref, params)
    want = {f: (path / "decomposition" / f).read_bytes() for f in FILES}
    for block_rows in sorted({1, 2, 3, 5, len(lens), 1 << 20} if len(lens) < 20 else {7, 64, 1 << 20}):
        idx = datapipe.decompose(path, block_rows=block_rows, **params)
        for f in FILES:
            assert (idx.path / f).read_bytes() == want[f], (f, block_rows)
    if name == "long_at_edges" and remainder == "pack":
        assert _straddles(ref, 3) and _straddles(ref, 5)  # the case the block boundaries must get right
    if name == "all_tails" and remainder == "drop":
        assert idx.num_pieces == 0 == idx.num_sequences  # empty tables, written the same way


def test_materialized_buckets_match_the_in_memory_path(datasets):
    path = datasets["lognormal"]
    params = {"min_log2": 4, "max_log2": 8, "remainder": "pack", "seed": 2}
    ref = decompose_lengths(CORPORA["lognormal"][0], **params)
    write_index(ArrowDataset.open(path), ref, params, materialize=True)
    want = {p.relative_to(path): p.read_bytes() for p in (path / "decomposition").rglob("*") if p.is_file()}
    assert any(p.parts[1] == "buckets" for p in want)
    idx = datapipe.decompose(path, materialize=True, block_rows=7, **params)
    got = {p.relative_to(path): p.read_bytes() for p in idx.path.rglob("*") if p.is_file()}
    assert got == want
    assert verify_decomposition(path) == []


@pytest.mark.parametrize("remainder", ["pack", "pad", "drop"])
@pytest.mark.parametrize("block_rows", [7, 997, 4096])
def test_lengths_from_a_memory_mapped_npy(tmp_path, remainder, block_rows):
    lens = _lognormal(3000, seed=block_rows).astype(np.int32)
    lens[[0, 999, 1000, 2999]] = [4000, 1, 3000, 700]  # long documents next to block edges
    np.save(tmp_path / "lengths.npy", lens)
    mm = np.load(tmp_path / "lengths.npy", mmap_mode="r")
    ref = decompose_lengths(lens, min_log2=5, max_log2=9, remainder=remainder, seed=4)
    plan = plan_stream(mm, min_log2=5, max_log2=9, remainder=remainder, seed=4, block_rows=block_rows)
    assert (plan.num_pieces, plan.num_sequences) == (len(ref["row"]), len(ref["sequence_log2"]))
    out = tmp_path / "out"
    out.mkdir()
    res = write_stream(mm, out, plan)
    got = stored_arrays(out)
    for k in got:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert res["counts"] == {k: ref[k] for k in res["counts"]}
    for meta in res["files"].values():
        assert meta["checksum"] == file_checksum(out / meta["file"], meta["checksum"].split(":")[0])
        assert meta["bytes"] == (out / meta["file"]).stat().st_size


def test_memory_is_one_block_of_outputs(tmp_path):
    """What the Python side allocates while streaming 400k documents in blocks of 2^14 rows stays near one
    block's outputs; the in-memory path holds all of them (numpy allocations are what tracemalloc sees)."""
    lens = _lognormal(400_000, seed=1).astype(np.int32)
    np.save(tmp_path / "l.npy", lens)
    mm = np.load(tmp_path / "l.npy", mmap_mode="r")
    kw = dict(min_log2=4, max_log2=9, remainder="pack", seed=0)
    plan = plan_stream(mm[:1000], block_rows=1 << 14, **kw)  # compile the kernels outside the measurement
    (tmp_path / "warm").mkdir()
    write_stream(mm[:1000], tmp_path / "warm", plan)
    tracemalloc.start()
    try:
        plan = plan_stream(mm, block_rows=1 << 14, **kw)
        (tmp_path / "out").mkdir()
        write_stream(mm, tmp_path / "out", plan)
        _, streamed = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole = decompose_lengths(lens, **kw)
        _, in_memory = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(v.nbytes for v in whole.values() if isinstance(v, np.ndarray))
    assert total > 20 << 20  # the corpus's outputs: > 20 MiB
    assert in_memory > total // 2  # tracemalloc sees numpy's buffers (the check below means something)
    assert streamed < total // 8, (streamed, total)


def test_bad_length_in_a_later_block_names_the_row_and_writes_nothing(tmp_path):
    path = _write(tmp_path / "ds", [3, 4, 5, 6, 7, 8])
    ds = ArrowDataset.open(path)
    lens = np.array(ds.index["length"])
    lens[[4, 5]] = [0, -2]
    with pytest.raises(ValueError, match=r"zero .* at row 4 \(2 rows in all\)"):
        plan_stream(lens, min_log2=1, max_log2=3, block_rows=2, name="length")
    with pytest.raises(TypeError, match="must be integers"):
        plan_stream(lens.astype(np.float32), block_rows=2)
    with pytest.raises(ValueError, match="block_rows must be an integer >= 1"):
        datapipe.decompose(path, block_rows=0)
    empty = _write(tmp_path / "bad", [3, 4, 5, 6, 0, 8])
    with pytest.raises(DatasetError, match=r"index.arrow: column 'length': .*row 4"):
        datapipe.decompose(empty, min_log2=1, max_log2=3, block_rows=2)
    assert not (empty / "decomposition").exists()
    assert not [p for p in empty.iterdir() if p.name.startswith(".decomposition.tmp")]


@pytest.mark.parametrize("rows", [0, 1, 9])
def test_column_table_file_written_in_any_order_is_pyarrows_file(tmp_path, rows):
    rng = np.random.default_rng(rows)
    cols = {"a": rng.integers(-5, 1 << 40, rows), "b": rng.integers(0, 9, rows)}
    f = ColumnTableFile(tmp_path / "t.arrow", ("a", "b"), rows)
    cuts = [0, *sorted(rng.choice(np.arange(1, rows), size=min(3, max(rows - 1, 0)), replace=False)), rows]
    runs = [(k, a, b) for k in cols for a, b in zip(cuts[:-1], cuts[1:])]
    for i in rng.permutation(len(runs)):
        k, a, b = runs[i]
        f.write(k, int(a), cols[k][a:b])
    meta = f.finish()
    table = pa.table({k: pa.array(v, pa.int64()) for k, v in cols.items()})
    with pa.OSFile(str(tmp_path / "plain.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=max(1, rows))
    assert (tmp_path / "t.arrow").read_bytes() == (tmp_path / "plain.arrow").read_bytes()
    assert meta == {"file": "t.arrow", "rows": rows, "bytes": (tmp_path / "t.arrow").stat().st_size,
                    "checksum": file_checksum(tmp_path / "t.arrow")}


def test_column_table_file_refuses_rows_left_unwritten(tmp_path):
    f = ColumnTableFile(tmp_path / "t.arrow", ("a",), 4)
    f.write("a", 0, np.arange(3))
    with pytest.raises(AssertionError, match="unwritten"):
        f.finish()
    f.close()
    g = ColumnTableFile(tmp_path / "u.arrow", ("a",), 4)
    with pytest.raises(AssertionError, match="outside"):
        g.write("a", 2, np.arange(3))
    g.close()
