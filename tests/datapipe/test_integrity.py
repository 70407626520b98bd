"""Storage integrity (issue 12): checked reads, one verify for every file the library writes. Real files, real
processes; crash-prone cases run in a child process and must end in a named DatasetError (or correct data), never
in a signal. Writes that cannot half-happen or race, and the entry points in fresh interpreters:
``test_integrity_writes.py``."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

import datapipe
from datapipe.cli import main
from datapipe.format import DatasetError, seal_manifest
from tests.datapipe.conftest import make_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_child(script: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def flip(path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def offsets_position(shard_bytes: bytes, lengths) -> int:
    """Byte position of the int32 list offsets of a shard's ``input_ids`` column (found by content)."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    pos = shard_bytes.find(offsets.tobytes())
    assert pos > 0
    return pos


@pytest.fixture
def ds_dir(tmp_path):
    rows = make_rows(97, seed=1)
    return datapipe.write_dataset(rows, tmp_path / "ds", shard_rows=20), rows


# ---- checked reads ---------------------------------------------------------------------------------------------
def test_flipped_payload_byte_raises_on_getitems_of_that_shard(ds_dir):
    path, rows = ds_dir
    shard = path / "shards" / "00001.arrow"
    needle = np.asarray(rows[25]["input_ids"], np.int32).tobytes()
    assert len(needle) >= 8
    flip(shard, shard.read_bytes().find(needle) + 1)  # a byte of row 25's token ids
    ds = datapipe.ArrowDataset.open(path)
    assert ds.__getitems__(np.arange(0, 20))["input_ids"][3].tolist() == rows[3]["input_ids"]  # shard 0 is fine
    with pytest.raises(DatasetError, match=r"shards/00001\.arrow: checksum mismatch"):
        ds.__getitems__(np.arange(20, 40))
    with pytest.raises(DatasetError, match=r"00001\.arrow: checksum mismatch"):
        datapipe.ArrowDataset.open(path)[25]
    # verify="never" skips the checksum (the user verifies offline): the bytes are read as they are
    assert datapipe.ArrowDataset.open(path, verify="never")[25]["input_ids"].tolist() != rows[25]["input_ids"]


def test_verify_option_is_checked_and_pickled(ds_dir):
    import pickle

    path, _ = ds_dir
    with pytest.raises(ValueError, match="verify must be one of"):
        datapipe.ArrowDataset.open(path, verify="sometimes")
    ds = pickle.loads(pickle.dumps(datapipe.ArrowDataset.open(path, verify="never")))
    assert ds.verify_mode == "never"


def test_checksum_is_verified_once_per_file_per_process(ds_dir):
    from datapipe import dataset as dsmod

    path, rows = ds_dir
    ds = datapipe.ArrowDataset.open(path)
    ds.__getitems__([0, 1, 2])
    before = set(dsmod._VERIFIED)
    assert any(k[0].endswith("00000.arrow") for k in before)
    # a second dataset object in the same process does not hash the shard again; a replaced file (new inode,
    # same size) is hashed again and refused
    shard = path / "shards" / "00000.arrow"
    data = bytearray(shard.read_bytes())
    needle = np.asarray(rows[2]["input_ids"], np.int32).tobytes()
    data[data.find(needle)] ^= 1
    os.unlink(shard)
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        datapipe.ArrowDataset.open(path)[0]


def test_corrupt_index_is_named(ds_dir):
    path, _ = ds_dir
    index = path / "index.arrow"
    flip(index, index.stat().st_size // 2)
    with pytest.raises(DatasetError, match=r"index\.arrow"):
        datapipe.ArrowDataset.open(path).index


CRASH_SCRIPT = """
import json, os, sys, numpy as np
sys.path.insert(0, {root!r})
import datapipe
from datapipe.format import DatasetError
from tests.datapipe.conftest import make_rows

out = {{}}
path = {path!r}
for name, verify, workers in [("stale_checksum", "first_touch", 0), ("stale_checksum_workers", "first_touch", 2),
                              ("never", "never", 0), ("resealed", "first_touch", 2)]:
    p = path + "_" + name
    try:
        ds = datapipe.ArrowDataset.open(p, verify=verify)
        n = 0
        for batch in datapipe.DataLoader(ds, batch_size=8, num_workers=workers):
            n += 1
        out[name] = "no error"
    except DatasetError as e:
        out[name] = "DatasetError: " + str(e)
    except Exception as e:
        out[name] = type(e).__name__ + ": " + str(e)
    try:
        out[name + "_getitem"] = repr(datapipe.ArrowDataset.open(p, verify=verify)[25])
    except DatasetError as e:
        out[name + "_getitem"] = "DatasetError: " + str(e)

# fuzz: flipped bytes and truncations of every file kind; first_touch must give an error or the right rows
rows = make_rows(97, seed=1)
rng = np.random.default_rng({seed})
fuzz = []
base = path + "_fuzz"
files = ["shards/00000.arrow", "shards/00002.arrow", "index.arrow", "manifest.json"]
pristine = {{f: open(os.path.join(base, f), "rb").read() for f in files}}
for trial in range({trials}):
    f = files[trial % len(files)]
    data = bytearray(pristine[f])
    if trial % 5 == 4:
        data = data[: int(rng.integers(0, len(data)))]
        kind = "truncate"
    else:
        data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        kind = "flip"
    open(os.path.join(base, f), "wb").write(bytes(data))
    for verify in ("first_touch", "never"):
        try:
            ds = datapipe.ArrowDataset.open(base, verify=verify)
            b = ds.__getitems__(np.arange(len(ds)))
            idx = ds.index
            ok = (len(ds) == 97 and [b["input_ids"][i].tolist() for i in range(97)] == [r["input_ids"] for r in rows]
                  and b["text"] == [r["text"] for r in rows] and idx["length"].tolist() == [len(r["input_ids"]) for r in rows])
            fuzz.append([f, kind, verify, "correct" if ok else "wrong"])
        except DatasetError as e:
            fuzz.append([f, kind, verify, "DatasetError"])
        except Exception as e:
            fuzz.append([f, kind, verify, type(e).__name__ + ": " + str(e)[:200]])
    open(os.path.join(base, f), "wb").write(pristine[f])
out["fuzz"] = fuzz
print("RESULT" + json.dumps(out))
"""


def _crash_fixtures(tmp_path):
    rows = make_rows(97, seed=1)
    base = str(tmp_path / "ds")
    lengths = [len(r["input_ids"]) for r in rows[20:40]]
    for name in ("stale_checksum", "stale_checksum_workers", "never", "resealed", "fuzz"):
        p = datapipe.write_dataset(rows, base + "_" + name, shard_rows=20)
        if name == "fuzz":
            continue
        shard = p / "shards" / "00001.arrow"
        data = bytearray(shard.read_bytes())
        at = offsets_position(bytes(data), lengths) + 4 * 6  # offset of row 6: far past the values buffer
        data[at:at + 4] = np.int32(2**30).tobytes()
        shard.write_bytes(bytes(data))
        if name == "resealed":  # a manifest that vouches for the damaged file: only the structural check is left
            from datapipe.format import file_checksum

            m = json.loads((p / "manifest.json").read_text())
            m["shards"][1]["checksum"] = file_checksum(shard)
            (p / "manifest.json").write_text(seal_manifest(m))
    return base


def _check_crash_run(proc, min_trials):
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("stale_checksum", "stale_checksum_workers", "never", "resealed"):
        for key in (name, name + "_getitem"):
            assert out[key].startswith("DatasetError") and "00001.arrow" in out[key], (key, out[key])
    assert "checksum mismatch" in out["stale_checksum"]
    assert "offsets" in out["never"] or "cannot read" in out["never"]
    fuzz = out["fuzz"]
    assert len(fuzz) >= min_trials
    for f, kind, verify, outcome in fuzz:
        allowed = ("correct", "DatasetError") if verify == "first_touch" else ("correct", "wrong", "DatasetError")
        assert outcome in allowed, (f, kind, verify, outcome)
    assert any(o == "DatasetError" for *_, o in fuzz)


def test_corrupt_offsets_raise_dataset_error_never_a_signal(tmp_path):
    base = _crash_fixtures(tmp_path)
    proc = run_child(CRASH_SCRIPT.format(root=ROOT, path=base, seed=0, trials=16))
    _check_crash_run(proc, 32)


@pytest.mark.slow
def test_corruption_fuzz_many_flips(tmp_path):
    base = _crash_fixtures(tmp_path)
    proc = run_child(CRASH_SCRIPT.format(root=ROOT, path=base, seed=1, trials=400), timeout=900)
    _check_crash_run(proc, 800)


# ---- the manifest -----------------------------------------------------------------------------------------------
def test_swapped_shard_entries_are_refused(ds_dir):
    path, _ = ds_dir
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]
    mpath.write_text(json.dumps(m, indent=1))
    with pytest.raises(DatasetError, match=r"manifest\.json: the manifest does not match its own digest"):
        datapipe.ArrowDataset.open(path)
    r = CliRunner().invoke(main, ["verify", str(path)])
    assert r.exit_code == 1 and "manifest.json" in r.output


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("shards"), "no 'shards' list"),
    (lambda m: m.update(schema="!!not base64!!"), "'schema' entry is not a serialized Arrow schema"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), r"shards\[0\]: 'file' must be a relative path"),
    (lambda m: m["shards"][0].update(rows=-1), r"shards\[0\]: 'rows' must be an integer"),
    (lambda m: m["shards"][0].update(checksum="md5:00"), r"shards\[0\]: 'checksum'"),
    (lambda m: m.update(num_rows=5), "shard rows sum to 97 but num_rows is 5"),
])
def test_malformed_manifests_are_named_even_with_a_valid_digest(ds_dir, edit, match):
    path, _ = ds_dir
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(seal_manifest(m))
    with pytest.raises(DatasetError, match=match):
        datapipe.ArrowDataset.open(path)


def test_garbage_manifest(ds_dir):
    path, _ = ds_dir
    (path / "manifest.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        datapipe.ArrowDataset.open(path)


# ---- verify and inspect: every file kind --------------------------------------------------------------------------
def _flip_each_and_verify(root, files, positions=3):
    runner = CliRunner()
    for f in files:
        pristine = f.read_bytes()
        n = len(pristine)
        for pos in sorted({0, n // 2, n - 1} if positions == 3 else set(np.linspace(0, n - 1, positions).astype(int))):
            flip(f, int(pos))
            r = runner.invoke(main, ["verify", str(root)])
            assert r.exit_code == 1, (f, pos, r.output)
            assert str(f.relative_to(root)) in r.output, (f, pos, r.output)
            f.write_bytes(pristine)
    r = runner.invoke(main, ["verify", str(root)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("positions", [3, pytest.param(40, marks=pytest.mark.slow)])
def test_verify_names_a_flipped_byte_in_any_decomposition_file(tmp_path, positions):
    rows = [{"input_ids": list(range(1, 3 + (i * 37) % 300))} for i in range(60)]
    path = datapipe.write_dataset(rows, tmp_path / "ds", shard_rows=25)
    datapipe.decompose(path, min_log2=4, max_log2=7, materialize=True)
    files = sorted(p for p in (path / "decomposition").rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"manifest.json", "pieces.arrow", "sequences.arrow", "k04.arrow", "k07.arrow"}
    _flip_each_and_verify(path, files, positions)


def test_verify_names_every_bad_dataset_file(ds_dir):
    path, _ = ds_dir
    files = [path / "manifest.json", path / "index.arrow"] + sorted((path / "shards").iterdir())
    _flip_each_and_verify(path, files)
    flip(files[2], files[2].stat().st_size // 2)
    flip(files[4], files[4].stat().st_size // 2)
    r = CliRunner().invoke(main, ["verify", str(path)])
    assert r.exit_code == 1 and "00000.arrow" in r.output and "00002.arrow" in r.output and "2 bad file(s)" in r.output


def test_inspect_exits_non_zero_on_a_bad_checksum(ds_dir):
    path, _ = ds_dir
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0 and "checksums ok" in r.output
    shard = path / "shards" / "00003.arrow"
    flip(shard, shard.stat().st_size // 2)
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 1 and "00003.arrow: checksum mismatch" in r.output
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert r.exit_code == 1 and "00003.arrow" in r.output


def test_tas_pairs_and_cluster_files_are_covered(tmp_path):
    from datapipe.tas_ingest import cluster_embeddings, ingest_tas, load_clusters, load_pair_table

    q = tmp_path / "q.tsv"
    q.write_text("".join(f"q{i}\tquery {i}\n" for i in range(12)))
    p = tmp_path / "p.tsv"
    p.write_text("".join(f"{i % 7}.5\t{i % 3}.0\tq{i % 12}\t{i}\t{i + 100}\n" for i in range(40)))
    out = ingest_tas(q, p, tmp_path / "tas")
    assert [f["file"] for f in json.loads((out / "manifest.json").read_text())["files"]] == ["pairs.arrow"]
    assert load_pair_table(out).num_pairs == 40
    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    _, ids = cluster_embeddings(tmp_path / "emb.npy", 3, out=out / "clusters.arrow")
    got, centroids = load_clusters(out / "clusters.arrow")
    assert got.tolist() == ids.tolist() and centroids.shape == (3, 4)
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "not covered" not in r.output, r.output
    _flip_each_and_verify(out, [out / "pairs.arrow", out / "clusters.centroids.npy"])
    # the pair table and the cluster file refuse a changed value on load, also outside a dataset directory
    standalone = tmp_path / "pairs.arrow"
    (standalone).write_bytes((out / "pairs.arrow").read_bytes())
    assert load_pair_table(standalone).num_pairs == 40
    for f, load in ((out / "pairs.arrow", load_pair_table), (out / "clusters.arrow", load_clusters)):
        t = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
        cols = {n: t.column(n).to_numpy().copy() for n in t.column_names}
        first = t.column_names[-1] if f.name == "pairs.arrow" else "cluster"
        cols[first][3] += 1  # a value changed, the file rewritten consistently by a foreign tool
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(pa.table(cols).replace_schema_metadata(t.schema.metadata))
        with pytest.raises(DatasetError, match=f"{f.name}"):
            load(f)


def test_ngame_cluster_file_refuses_corruption(tmp_path):
    from samplers import NGAMEBatchSampler

    emb = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    a = NGAMEBatchSampler(64, batch_size=16, cluster_size=8, embeddings=emb)
    f = tmp_path / "ngame.npz"
    a.save_clusters(f)
    pristine = f.read_bytes()
    outcomes = set()
    for pos in np.linspace(0, len(pristine) - 1, 25).astype(int):
        flip(f, int(pos))
        b = NGAMEBatchSampler(64, batch_size=16, cluster_size=8)
        try:
            b.load_clusters(f)
            assert b.stats()["num_clusters"] == a.stats()["num_clusters"]
            outcomes.add("correct")
        except ValueError as e:
            assert str(f) in str(e)
            outcomes.add("error")
        f.write_bytes(pristine)
    assert "error" in outcomes


def test_verify_a_standalone_cluster_file(tmp_path):
    from datapipe.tas_ingest import cluster_embeddings

    np.save(tmp_path / "emb.npy", np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32))
    out = tmp_path / "clusters.arrow"
    cluster_embeddings(tmp_path / "emb.npy", 3, out=out)
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "ok: 1 files" in r.output, r.output
    t = pa.ipc.open_file(pa.memory_map(str(out))).read_all()
    ids = t.column("cluster").to_numpy().copy()
    ids[0] = (ids[0] + 1) % 3
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(pa.table({"cluster": ids}).replace_schema_metadata(t.schema.metadata))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "clusters.arrow: content does not match" in r.output, r.output


def test_materialized_bucket_is_checked_on_first_touch(tmp_path):
    rows = [{"input_ids": list(range(1, 3 + (i * 37) % 300))} for i in range(60)]
    path = datapipe.write_dataset(rows, tmp_path / "ds", shard_rows=25)
    idx = datapipe.decompose(path, min_log2=4, max_log2=7, materialize=True)
    t = idx.open_bucket(5)
    assert t.num_rows == idx.bucket_sequences[5] and t.column("input_ids").type.list_size == 32
    f = idx.path / "buckets" / "k06.arrow"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    os.unlink(f)  # a new file (new inode): this process has not verified it
    f.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"k06\.arrow: checksum mismatch"):
        datapipe.DecomposedIndex.open(path).open_bucket(6)
    with pytest.raises(DatasetError, match="bucket 3 is not materialized"):
        idx.open_bucket(3)
