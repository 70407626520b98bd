"""NGAME batches (Dahiya et al., "NGAME: Negative Mining-aware Mini-batching for Extreme Classification",
WSDM 2023) against random batches, and our batched balanced 2-means against the reference's per-cluster loop.

Measured, side by side in one run:

1. In-batch hard-negative recall: the fraction of each point's 10 nearest neighbours (cosine, exact, FAISS) that
   land in the point's own batch, for ``NGAMEBatchSampler`` vs ``RandomBatchSampler`` (goal: >= 20x random), on
   planted-structure data (topics > sub-topics > points) and on real text embeddings (Python standard-library
   docstrings embedded with all-MiniLM-L6-v2, ``benchmarks/text_embeddings.py``).
2. Clustering time for 100k x 384 on 2 cores: ``native.balanced_kmeans`` (Numba kernel, one pass per tree level;
   and the batched torch path that CUDA runs, on the CPU) vs a reimplementation of the reference's approach,
   pyxclib's ``cluster_balance`` + ``b_kmeans_dense``: a Python loop splitting one cluster at a time with numpy.
3. The memory bank's size (float16 and float32).

Run: ``.venv/bin/python benchmarks/bench_ngame.py [--quick] [--write]``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import operator
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from native import knn_search  # noqa: E402
from native.balanced import balanced_kmeans  # noqa: E402
from samplers import NGAMEBatchSampler, RandomBatchSampler  # noqa: E402


# ---- the reference's clustering, reimplemented (pyxclib.utils.clustering, as called by NGAME) ------------------
def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pyxclib_b_kmeans_dense(features, index, rng, tol=1e-4):
    """pyxclib's ``b_kmeans_dense``: balanced spherical 2-means of one cluster, until the objective settles."""
    features = _normalize(features)
    if features.shape[0] == 1:
        return [index]
    cluster = rng.integers(0, features.shape[0], size=2)
    while cluster[0] == cluster[1]:
        cluster = rng.integers(0, features.shape[0], size=2)
    centroids = features[cluster]
    sim = features @ centroids.T
    old_sim, new_sim = -1000000, -2
    clustered = None
    while new_sim - old_sim >= tol:
        clustered = np.array_split(np.argsort(sim[:, 1] - sim[:, 0]), 2)
        centroids = _normalize(np.vstack([np.mean(features[x, :], axis=0) for x in clustered]))
        sim = features @ centroids.T
        old_sim, new_sim = new_sim, np.sum([np.sum(sim[indx, i]) for i, indx in enumerate(clustered)])
    return [index[x] for x in clustered]


def pyxclib_cluster_balance(x, num_clusters, seed=0):
    """pyxclib's ``cluster_balance``: split every cluster in two until there are ``num_clusters`` or more."""
    rng = np.random.default_rng(seed)
    clusters = [np.arange(x.shape[0])]
    while len(clusters) < num_clusters:
        clusters = functools.reduce(operator.iconcat, (pyxclib_b_kmeans_dense(x[c], c, rng) for c in clusters), [])
    return clusters


# ---- data -----------------------------------------------------------------------------------------------------
def planted_data(n: int, dim: int = 384, topics: int = 200, subtopics: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topic = rng.normal(size=(topics, dim))
    sub = np.repeat(topic, subtopics, axis=0) + 0.8 * rng.normal(size=(topics * subtopics, dim))
    lab = rng.integers(0, topics * subtopics, n)
    x = sub[lab] + 0.9 * rng.normal(size=(n, dim))
    return _normalize(x).astype(np.float32)


def neighbours(x: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """The k nearest neighbours (cosine) of rows ``queries`` among all rows, the row itself left out."""
    _, idx = knn_search(x, k + 1, queries=x[queries], metric="ip")
    out = np.empty((len(queries), k), dtype=np.int64)
    for i, q in enumerate(queries):
        row = idx[i][idx[i] != q]
        out[i] = row[:k]
    return out


def batch_recall(batches, n: int, queries: np.ndarray, nn: np.ndarray) -> float:
    batch_of = np.full(n, -1, dtype=np.int64)
    for b, rows in enumerate(batches):
        batch_of[rows] = b
    return float(np.mean(batch_of[nn] == batch_of[queries][:, None]))


def median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def recall_rows(name: str, x: np.ndarray, configs, nq: int, seed: int = 0) -> list[str]:
    n = len(x)
    queries = np.random.default_rng(seed).choice(n, size=min(nq, n), replace=False)
    nn = neighbours(x, queries)
    rows = []
    for B, c in configs:
        t, s = median_time(lambda: NGAMEBatchSampler(n, batch_size=B, cluster_size=c, embeddings=x, seed=seed), 1)
        ng = np.mean([batch_recall(list(s), n, queries, nn) for e in range(2) if s.set_epoch(e) is None])
        r = RandomBatchSampler(n, B, seed=seed)
        rnd = np.mean([batch_recall(list(r), n, queries, nn) for e in range(2) if r.set_epoch(e) is None])
        ratio = ng / rnd if rnd else float("inf")
        rows.append(f"| {name} | {n:,} x {x.shape[1]} | {B} | {c} | {ng:.4f} | {rnd:.5f} | **{ratio:.0f}x** | "
                    f"{'yes' if ratio >= 20 else 'NO'} | {t:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k planted points instead of 100k, one repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/bench_ngame.md")
    args = ap.parse_args()
    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    n = 20_000 if args.quick else 100_000
    reps = 1 if args.quick else 3
    out = []

    # 1. recall -----------------------------------------------------------------------------------------------
    x = planted_data(n)
    out += ["## In-batch hard-negative recall (fraction of each point's 10 NN in its batch; mean of epochs 0-1)", "",
            "| data | n x d | batch | cluster size | NGAME | random | ratio | >= 20x | build s |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    out += recall_rows("planted", x, [(64, 8), (256, 8), (256, 64), (256, 256), (512, 512)], nq=2000)
    from text_embeddings import docstring_embeddings

    _, emb = docstring_embeddings()
    out += recall_rows("stdlib docstrings (MiniLM)", emb,
                       [(32, 4), (32, 32), (64, 8), (64, 64), (128, 128), (256, 256)], nq=2000)
    print("\n".join(out), flush=True)

    # 2. clustering time --------------------------------------------------------------------------------------
    c = 8
    t_ref, clusters = median_time(lambda: pyxclib_cluster_balance(x, n // c, seed=0), 1)
    ref_sizes = np.array([len(cl) for cl in clusters])
    K = len(clusters)  # pyxclib stops at the first power of two >= n // c: same tree depth for ours below
    balanced_kmeans(x[:1000], c, seed=0, device="cpu")  # warm-up: load (or compile) the kernel
    t_nb, ids = median_time(lambda: balanced_kmeans(x, num_clusters=K, seed=0, device="cpu"), reps)
    t_nb8, ids8 = median_time(lambda: balanced_kmeans(x, c, seed=0, device="cpu"), reps)
    t_tc, _ = median_time(lambda: balanced_kmeans(x, num_clusters=K, seed=0, device="torch-cpu"), 1)
    sizes, sizes8 = np.bincount(ids), np.bincount(ids8)

    def cohesion(groups):  # mean cosine of a point to its cluster's mean direction (higher is tighter)
        return float(np.mean(np.concatenate([x[g] @ _normalize(x[g].sum(0, keepdims=True))[0] for g in groups])))

    order = np.argsort(ids, kind="stable")
    ours = np.split(order, np.cumsum(sizes)[:-1])
    times = ["", f"## Clustering time, {n:,} x 384 float32, {args.threads} threads (Numba: median of {reps} runs "
             "after a warm-up; others: 1 run)", "",
             "| method | clusters | sizes | cohesion | seconds | speed-up vs reference |",
             "|---|---:|---|---:|---:|---:|",
             f"| pyxclib-style per-cluster loop (reference approach, reimplemented), target n/{c} | {K:,} | "
             f"{ref_sizes.min()}-{ref_sizes.max()} | {cohesion(clusters):.4f} | {t_ref:.1f} | 1.0x |",
             f"| `balanced_kmeans(x, num_clusters={K})`, Numba kernel per level (CPU default) | {len(sizes):,} | "
             f"{sizes.min()}-{sizes.max()} | {cohesion(ours):.4f} | {t_nb:.1f} | **{t_ref / t_nb:.1f}x** |",
             f"| `balanced_kmeans(x, {c})`, Numba (exactly n/{c} clusters, any n) | {len(sizes8):,} | "
             f"{sizes8.min()}-{sizes8.max()} | | {t_nb8:.1f} | {t_ref / t_nb8:.1f}x |",
             f"| `balanced_kmeans(x, num_clusters={K}, device='torch-cpu')`: the batched CUDA code, on CPU | "
             f"{len(sizes):,} | {sizes.min()}-{sizes.max()} | | {t_tc:.1f} | {t_ref / t_tc:.1f}x |"]
    print("\n".join(times), flush=True)
    out += times

    # 3. memory bank ------------------------------------------------------------------------------------------
    bank = ["", "## Memory bank", "", "| rows x dim | dtype | bytes | per row |", "|---|---|---:|---:|"]
    for dt in (np.float16, np.float32):
        s = NGAMEBatchSampler(n, batch_size=64, cluster_size=8, embeddings=x, bank_dtype=dt, refresh_every=1,
                              warmup_epochs=1)
        b = s.stats()["bank_bytes"]
        bank.append(f"| {n:,} x 384 | {np.dtype(dt).name} | {b / 2**20:.1f} MiB | {b // n} B |")
    print("\n".join(bank), flush=True)
    out += bank

    if args.write:
        cmd = " ".join([".venv/bin/python", "benchmarks/bench_ngame.py", *sys.argv[1:]])
        head = [f"# bench_ngame ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
                f"Command: `{cmd}`. Machine: 2 shared CPU cores (other jobs running), no GPU; times are medians "
                "and noisy, ratios matter more.", ""]
        (ROOT / "benchmarks" / "results" / "bench_ngame.md").write_text("\n".join(head + out) + "\n")


if __name__ == "__main__":
    main()
