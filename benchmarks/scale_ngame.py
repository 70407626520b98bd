"""bench_scale's NGAME kinds (issue 15): the windowed NGAMEBatchSampler at 1e8-1e9 rows.

* ``ngame``: a random (warm-up) epoch, no bank: a Feistel permutation cut into batches of 1024.
* ``ngame_clustered``: a clustered epoch read from a rows-by-cluster file. Writing and clustering a 1e9 x d bank
  does not fit this machine's disk and time (``benchmarks/bench_ngame_scale.py`` measures one window's clustering
  and extrapolates), so the file is built directly: the rows in a Feistel order laid out as the windowed
  clustering lays them out (``samplers.ngame_windowed.Layout``), its sidecar and a ``save_clusters`` file naming
  it, which the sampler loads through ``load_clusters`` (the public path of a resumed job). Planning and reading a
  batch do not depend on what the clusters contain, so this measures the clustered epoch's memory and time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KW = {"batch_size": 1024, "cluster_size": 16, "seed": 1, "rank": 3, "world_size": 8}


def clustered_files(n: int, tmp: Path) -> Path:
    """The rows-by-cluster file of ``n`` rows (int32, written in chunks), its sidecar, and the npz naming it."""
    from native.feistel import feistel_range
    from samplers.ngame import WINDOW_ROWS
    from samplers.ngame_io import write_cluster_file
    from samplers.ngame_windowed import Layout, _combine, _digest_rows, clusters_path

    bank = tmp / f"bench_scale_ngame_bank_{n}.npy"
    rows_path = clusters_path(bank, 0, KW["cluster_size"])
    npz = tmp / f"bench_scale_ngame_clusters_{n}.npz"
    if npz.exists():
        return npz
    lay = Layout.of(n, WINDOW_ROWS, KW["cluster_size"])
    mm = np.lib.format.open_memmap(rows_path, mode="w+", dtype=np.int32 if n < 2**31 else np.int64, shape=(n,))
    dig = np.zeros(lay.num_windows, dtype=np.int64)
    for w in range(lay.num_windows):
        a, b = int(lay.wstart[w]), int(lay.wstart[w + 1])
        part = feistel_range(a, b, n, 12345)
        mm[a:b] = part
        dig[w] = _digest_rows(part)
    mm.flush()
    del mm
    digest = _combine(dig)
    rows_path.with_suffix(".json").write_text(json.dumps({
        "rows": n, "window_rows": WINDOW_ROWS, "cluster_size": KW["cluster_size"], "epoch": 0, "seed": 0,
        "digest": digest, "window_sizes": np.diff(lay.wstart).tolist()}))
    write_cluster_file(npz, {"num_items": np.int64(n), "clustered_epoch": np.int64(0),
                             "cluster_size_now": np.int64(KW["cluster_size"]), "bank_dirty": np.int64(0),
                             "ids": np.zeros(0, np.int64), "window_rows": np.int64(WINDOW_ROWS),
                             "rows_file": np.array(str(rows_path)), "digest": np.array(digest)})
    return npz


def make_ngame(kind: str, n: int, tmp: Path):
    import samplers

    if kind == "ngame":
        return lambda: samplers.NGAMEBatchSampler(n, **KW)
    npz = clustered_files(n, tmp)

    def build():
        s = samplers.NGAMEBatchSampler(n, bank_path=tmp / f"bench_scale_ngame_bank_{n}.npy", **KW)
        s.load_clusters(npz)
        return s

    return build


def warm_up_ngame(kind: str) -> None:
    """Compile the windowed path's kernels on a tiny input (a random and a clustered epoch)."""
    import tempfile

    import samplers
    import samplers.ngame as ng

    saved = ng.EXACT_MAX_ROWS, ng.WINDOW_ROWS
    ng.EXACT_MAX_ROWS, ng.WINDOW_ROWS = 100, 1024
    try:
        with tempfile.TemporaryDirectory() as d:
            emb = np.random.default_rng(0).normal(size=(3000, 4)).astype(np.float32)
            s = samplers.NGAMEBatchSampler(3000, embeddings=emb if kind != "ngame" else None,
                                           bank_path=Path(d) / "b.npy", **KW)
            next(iter(s))
    finally:
        ng.EXACT_MAX_ROWS, ng.WINDOW_ROWS = saved


