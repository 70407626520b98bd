"""datapipe.decompose / DecomposedIndex / DecomposedDataset / `datapipe decompose`: real Arrow datasets in tmp_path,
the Ray engine on a real local cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import datapipe
from datapipe.collate import collate_decomposed
from datapipe.decomposed_dataset import DecomposedDataset
from datapipe.decomposition import DecomposedIndex, bucket_histogram_lines, plot_buckets
from datapipe.format import DatasetError
from native.decompose import decompose_lengths
from samplers.decomposed import DecomposedBatchSampler

EOS = 256


def _docs(n=240, seed=0, max_len=2500):
    rng = np.random.default_rng(seed)
    lens = np.minimum(max_len, np.maximum(1, rng.lognormal(5.0, 1.1, n).astype(np.int64)))
    lens[:3] = [1, 16, 5000]  # just EOS, exactly one min bucket, long enough for size draws at max_log2=9
    return [np.append(rng.integers(0, 256, L - 1), EOS).astype(np.int32).tolist() for L in lens]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("dd") / "ds"
    docs = _docs()
    datapipe.write_dataset([{"input_ids": d} for d in docs], path, shard_rows=50)
    return path, docs


KW = dict(min_log2=4, max_log2=9)


def _rebuild(index, docs, ids, seq_ids):
    """Check every row of a [b, 2^k] batch against the documents its pieces come from."""
    for r, s in enumerate(seq_ids.tolist()):
        pos = 0
        for p in range(index.sequence_offsets[s], index.sequence_offsets[s + 1]):
            row, st, n = int(index.row[p]), int(index.start[p]), int(index.length[p])
            np.testing.assert_array_equal(ids[r, pos : pos + n], docs[row][st : st + n])
            pos += n


@pytest.mark.parametrize("remainder", ["pack", "pad", "drop"])
def test_index_matches_kernel_and_reopens(corpus, remainder):
    path, docs = corpus
    idx = datapipe.decompose(path, remainder=remainder, seed=5, **KW)
    ref = decompose_lengths([len(d) for d in docs], remainder=remainder, seed=5, **KW)
    again = DecomposedIndex.open(path, verify=True)
    for name in ("row", "start", "length", "sequence", "sequence_log2", "sequence_tokens", "sequence_offsets"):
        for obj in (idx, again):
            arr = getattr(obj, name)
            assert isinstance(arr, np.ndarray) and arr.dtype == np.int64, name
            np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    assert idx.params == {"min_log2": 4, "max_log2": 9, "remainder": remainder, "seed": 5}
    assert sum(idx.bucket_sequences.values()) == idx.num_sequences
    assert sum(idx.bucket_tokens.values()) == idx.counts["kept_tokens"]
    if remainder == "drop":
        assert idx.counts["eos_kept"] < len(docs) and idx.counts["dropped_tokens"] > 0
    else:
        assert idx.counts["eos_kept"] == len(docs) and idx.counts["kept_tokens"] == sum(map(len, docs))
    m = json.loads((path / "decomposition" / "manifest.json").read_text())
    assert m["params"]["remainder"] == remainder
    assert not [p for p in path.iterdir() if p.name.startswith(".decomposition")]  # no temp dirs left


@pytest.mark.parametrize("remainder", ["pack", "pad", "drop"])
def test_files_are_plain_int64_arrow_with_checksums_taken_while_writing(corpus, tmp_path, remainder):
    import pyarrow as pa

    from datapipe.format import file_checksum

    path, docs = corpus
    idx = datapipe.decompose(path, remainder=remainder, seed=3, **KW)
    m = json.loads((idx.path / "manifest.json").read_text())
    ref = decompose_lengths([len(d) for d in docs], remainder=remainder, seed=3, **KW)
    expected = {"pieces": {k: ref[k] for k in ("row", "start", "length", "sequence")},
                "sequences": {"log2": ref["sequence_log2"], "tokens": ref["sequence_tokens"],
                              "first_piece": ref["sequence_offsets"][:-1]}}
    for name, cols in expected.items():
        meta, p = m["files"][name], idx.path / m["files"][name]["file"]
        assert meta["checksum"] == file_checksum(p, meta["checksum"].split(":")[0])
        assert meta["bytes"] == p.stat().st_size and meta["rows"] == len(next(iter(cols.values())))
        # byte for byte what pyarrow's own file writer gives for the same int64 columns (the on-disk contract)
        table = pa.table({k: pa.array(v) for k, v in cols.items()})
        plain = tmp_path / f"{name}-{remainder}.arrow"
        with pa.OSFile(str(plain), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table, max_chunksize=max(1, table.num_rows))
        assert p.read_bytes() == plain.read_bytes(), name
    seqs, toks = np.bincount(ref["sequence_log2"], minlength=10), np.bincount(
        ref["sequence_log2"], weights=ref["sequence_tokens"], minlength=10)
    assert m["buckets"] == {str(k): {"sequences": int(seqs[k]), "tokens": int(toks[k])} for k in range(4, 10)}


@pytest.mark.parametrize("materialize", [False, True])
def test_batches_are_the_document_tokens_with_boundaries(corpus, materialize):
    path, docs = corpus
    idx = datapipe.decompose(path, materialize=materialize, **KW)
    assert bool(idx.materialized) == materialize
    ds = DecomposedDataset(path)
    sampler = DecomposedBatchSampler(idx, tokens_per_batch=2048, seed=2, drop_last=False)  # repeats fill last steps
    ends = set()
    for seq_ids in sampler:
        b = ds.__getitems__(seq_ids)
        k = b["log2"]
        ids = b["input_ids"].numpy()
        assert ids.shape == (2048 >> k, 1 << k) and b["input_ids"].dtype.is_floating_point is False
        _rebuild(idx, docs, ids, seq_ids)
        cu = b["cu_seqlens"].numpy()
        assert cu[0] == 0 and cu[-1] == ids.size and (np.diff(cu) > 0).all()
        pos = b["position_ids"].numpy().ravel()
        assert (pos[cu[:-1]] == 0).all() and b["max_seqlen"] == np.diff(cu).max()
        labels = b["labels"].numpy().ravel()
        mask = b["attention_mask"].numpy().ravel().astype(bool)
        assert (labels[cu[:-1]] == -100).all() and (labels[~mask] == -100).all()
        real = labels != -100
        assert (labels[real] == ids.ravel()[real]).all()
        for p in np.concatenate([np.arange(idx.sequence_offsets[s], idx.sequence_offsets[s + 1]) for s in seq_ids]):
            if idx.start[p] + idx.length[p] == len(docs[idx.row[p]]):
                ends.add(int(idx.row[p]))
    assert ends == set(range(len(docs)))  # every document's EOS reached a batch


def test_materialized_and_zero_copy_batches_are_identical(corpus):
    path, _ = corpus
    idx = datapipe.decompose(path, **KW)
    plain = DecomposedDataset(path)
    sampler = DecomposedBatchSampler(idx, tokens_per_batch=1024, seed=1)
    batches = [plain.__getitems__(b) for b in sampler]
    idx_m = datapipe.decompose(path, materialize=True, **KW)
    assert idx_m.materialized and (path / "decomposition" / "buckets" / "k04.arrow").exists()
    mat = DecomposedDataset(path)
    for b, ref in zip(sampler, batches):
        got = mat.__getitems__(b)
        for key in ("input_ids", "labels", "cu_seqlens", "position_ids", "attention_mask"):
            assert (got[key] == ref[key]).all(), key


def test_dataloader_with_workers(corpus):
    path, _ = corpus
    idx = datapipe.decompose(path, **KW)
    sampler = DecomposedBatchSampler(idx, tokens_per_batch=1024, seed=3)
    loader = datapipe.DataLoader(DecomposedDataset(path), batch_sampler=sampler, collate_fn=collate_decomposed,
                                 num_workers=2)
    got = [b["sequence_ids"].numpy() for b in loader]
    assert sampler.epoch == 1  # the loader positioned its sampler at the epoch the next iter() runs
    sampler.set_epoch(0)
    ref = list(sampler)
    assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref))
    # the loader's default collate passes the batch through too
    plain = datapipe.DataLoader(DecomposedDataset(path), batch_sampler=sampler)
    first = next(iter(plain))
    assert first["input_ids"].shape[1] == 1 << first["log2"] and first["cu_seqlens"].dtype.is_signed


def test_mixed_buckets_in_one_batch_are_refused(corpus):
    path, _ = corpus
    idx = datapipe.decompose(path, **KW)
    ds = DecomposedDataset(path)
    a = int(np.flatnonzero(idx.sequence_log2 == 4)[0])
    b = int(np.flatnonzero(idx.sequence_log2 == 9)[0])
    with pytest.raises(ValueError, match="one bucket"):
        ds.__getitems__([a, b])
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([idx.num_sequences])


def test_rebuild_replaces_and_stale_index_is_refused(tmp_path):
    path = tmp_path / "ds"
    datapipe.write_dataset([{"input_ids": d} for d in _docs(60, seed=1)], path)
    datapipe.decompose(path, **KW)
    idx2 = datapipe.decompose(path, min_log2=5, max_log2=8)
    assert DecomposedIndex.open(path).params["min_log2"] == 5 == idx2.min_log2
    # an index next to a dataset it was not built for must not be used
    other = tmp_path / "other"
    datapipe.write_dataset([{"input_ids": d} for d in _docs(70, seed=3)], other)
    (other / "decomposition").mkdir()
    for f in (path / "decomposition").iterdir():
        if f.is_file():
            (other / "decomposition" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DatasetError, match="another version of the dataset"):
        DecomposedIndex.open(other)


def test_bad_input(tmp_path):
    path = tmp_path / "ds"
    datapipe.write_dataset([{"input_ids": [1, 2, EOS]}, {"input_ids": []}, {"input_ids": [EOS]}], path)
    with pytest.raises(DatasetError, match=r"length.*row 1"):
        datapipe.decompose(path, **KW)
    with pytest.raises(ValueError, match="min_log2 must be <= max_log2"):
        datapipe.decompose(path, min_log2=9, max_log2=4)
    with pytest.raises(ValueError, match="engine must be one of"):
        datapipe.decompose(path, engine="spark")
    with pytest.raises(FileNotFoundError, match="datapipe decompose"):
        DecomposedIndex.open(path)
    assert bucket_histogram_lines(path) == []
    assert not (path / "decomposition").exists()


def test_cli_decompose_and_inspect(corpus, tmp_path):
    from datapipe.cli import main

    path, _ = corpus
    runner = CliRunner()
    res = runner.invoke(main, ["decompose", str(path), "--min-log2", "4", "--max-log2", "9", "--remainder", "pad"])
    assert res.exit_code == 0, res.output
    assert "D_9" in res.output and "EOS kept" in res.output
    assert DecomposedIndex.open(path).remainder == "pad"
    lines = bucket_histogram_lines(path)
    assert lines[0].startswith("decomposition") and sum(line.strip().startswith("D_") for line in lines) == 6
    res = runner.invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0 and "D_4" in res.output, res.output
    ax = plot_buckets(path)
    assert len(ax.patches) == 6
    ax.figure.savefig(tmp_path / "buckets.png")
    res = runner.invoke(main, ["decompose", str(path), "--min-log2", "9", "--max-log2", "4"])
    assert res.exit_code != 0 and "min_log2 must be <= max_log2" in res.output
    res = runner.invoke(main, ["decompose", "--help"])
    assert "Example" in res.output


@pytest.mark.ray
def test_ray_engine_is_byte_identical(corpus, tmp_path):
    import ray

    path, docs = corpus
    other = tmp_path / "copy"
    datapipe.write_dataset([{"input_ids": d} for d in docs], other, shard_rows=50)
    local = datapipe.decompose(path, remainder="pack", seed=7, **KW)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = datapipe.decompose(other, remainder="pack", seed=7, engine="ray", num_blocks=5, **KW)
    finally:
        ray.shutdown()
    for f in ("pieces.arrow", "sequences.arrow"):
        assert (local.path / f).read_bytes() == (remote.path / f).read_bytes(), f
    ml = json.loads((local.path / "manifest.json").read_text())
    mr = json.loads((remote.path / "manifest.json").read_text())
    assert ml == mr
