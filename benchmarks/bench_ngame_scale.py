"""bench_ngame_scale: batch quality of NGAME's windowed clustering (issue 15) against the exact one.

Synthetic clustered embeddings: ``--blobs`` Gaussian blobs in ``d = 32`` (unit-variance centres, noise
``--sigma``), ``--rows`` rows. ``NGAMEBatchSampler(rows, batch_size=256, cluster_size=16, embeddings=...)`` clusters
at construction (timed: *cluster s*), then one clustered epoch is scored:

* *cos*: mean cosine similarity of a row with its batch-mates (the hardness of the in-batch negatives);
* *same blob*: share of a row's batch-mates from its own blob;
* *cluster purity*: share of clusters whose rows all come from one blob.

Plans: the exact path (``EXACT_MAX_ROWS`` above the row count), the windowed path with ``WINDOW_ROWS`` patched to
2**18 and 2**16 (``EXACT_MAX_ROWS`` patched to 0), and random batches (no embeddings) as the floor. Also times one
window of 2**20 rows (the default ``WINDOW_ROWS``) on the CPU, to extrapolate a refresh at 1e9 rows.

    .venv/bin/python benchmarks/bench_ngame_scale.py                 # 1e6 rows, ~10 minutes on 2 busy cores
    .venv/bin/python benchmarks/bench_ngame_scale.py --rows 200000   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def data(n: int, blobs: int, d: int, sigma: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, blobs, n)
    centres = rng.normal(size=(blobs, d))
    return (centres[lab] + sigma * rng.normal(size=(n, d))).astype(np.float32), lab


def score(batches, emb: np.ndarray, lab: np.ndarray, ids: np.ndarray | None) -> dict:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = same = pairs = 0.0
    for b in batches:
        m = len(b)
        if m < 2:
            continue
        e = unit[b]
        s = e.sum(axis=0)
        cos += float(s @ s) - m  # sum over ordered pairs i != j of cos(i, j) (unit rows: the diagonal is m)
        counts = np.bincount(lab[b])
        same += float((counts * (counts - 1)).sum())
        pairs += m * (m - 1)
    out = {"cos": cos / pairs, "same": same / pairs}
    if ids is not None:
        order = np.argsort(ids, kind="stable")
        cut = np.flatnonzero(np.diff(ids[order])) + 1
        out["purity"] = float(np.mean([len(np.unique(lab[g])) == 1 for g in np.split(order, cut)]))
    return out


def run(n: int, emb: np.ndarray, lab: np.ndarray, plan: str, seed: int, tmp: Path) -> dict:
    import samplers.ngame as ng

    saved = ng.EXACT_MAX_ROWS, ng.WINDOW_ROWS
    kw = {"batch_size": 256, "cluster_size": 16, "seed": seed, "device": "cpu"}
    try:
        if plan == "random":
            s = ng.NGAMEBatchSampler(n, **kw)
            t = 0.0
        else:
            if plan == "exact":
                ng.EXACT_MAX_ROWS = n
            else:
                ng.EXACT_MAX_ROWS, ng.WINDOW_ROWS = 0, 1 << int(plan.split("**")[1])
                kw["bank_path"] = tmp / f"bank_{plan[-2:]}_{seed}.npy"
            t0 = time.perf_counter()
            s = ng.NGAMEBatchSampler(n, embeddings=emb, **kw)
            t = time.perf_counter() - t0
        batches = list(s)
        out = score(batches, emb, lab, s.cluster_ids)
        out.update(plan=plan, seed=seed, cluster_s=t, batches=len(batches))
        return out
    finally:
        ng.EXACT_MAX_ROWS, ng.WINDOW_ROWS = saved


def window_time(d: int, blobs: int, sigma: float) -> float:
    from native.balanced import balanced_kmeans

    x, _ = data(1 << 20, blobs, d, sigma, seed=9)
    balanced_kmeans(x[:4096], 16, device="cpu")  # compiled
    t0 = time.perf_counter()
    balanced_kmeans(x, 16, device="cpu")
    return time.perf_counter() - t0


def refresh_memory(windows: int, d: int, blobs: int, sigma: float, tmp: Path) -> dict:
    """A windowed refresh at the default ``WINDOW_ROWS``: ``windows`` windows of 2**20 rows, the embeddings a
    memory-mapped ``.npy`` written in chunks, the bank a float16 file; peak anonymous memory (``RssAnon``) while the
    sampler copies the bank in and clusters, and its first clustered batch."""
    sys.path.insert(0, str(HERE))
    from scale_common import Peak, anon_kb

    import samplers.ngame as ng

    n = windows << 20
    path = tmp / "emb.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for w in range(windows):
        mm[w << 20 : (w + 1) << 20] = data(1 << 20, blobs, d, sigma, seed=w)[0]
    mm.flush()
    del mm
    emb = np.load(path, mmap_mode="r")
    warm, ng.EXACT_MAX_ROWS = ng.EXACT_MAX_ROWS, 0
    try:
        base = anon_kb()
        peak = Peak()
        t0 = time.perf_counter()
        s = ng.NGAMEBatchSampler(n, batch_size=256, cluster_size=16, embeddings=emb, bank_path=tmp / "bank.npy",
                                 device="cpu")
        first = next(iter(s))
        t = time.perf_counter() - t0
        top = peak.done()
    finally:
        ng.EXACT_MAX_ROWS = warm
    return {"rows": n, "windows": windows, "peak_anon_mib": (top - base) / 1024, "refresh_s": t,
            "first_rows": len(first), "clustered": s.stats()["clustered"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, default=1e6)
    ap.add_argument("--blobs", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--plans", default="exact,windowed 2**18,windowed 2**16,random")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_ngame_scale.md"))
    ap.add_argument("--memory", type=int, default=0, metavar="WINDOWS", help="only measure a windowed refresh of "
                    "WINDOWS x 2**20 rows (peak anonymous memory) and print it")
    args = ap.parse_args()
    if args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            print(refresh_memory(args.memory, args.dim, args.blobs, args.sigma, Path(tmp)))
        return
    n = int(args.rows)
    emb, lab = data(n, args.blobs, args.dim, args.sigma)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for plan in args.plans.split(","):
            for seed in (int(x) for x in args.seeds.split(",")):
                r = run(n, emb, lab, plan, seed, Path(tmp))
                print(r, flush=True)
                rows.append(r)
    tw = window_time(args.dim, args.blobs, args.sigma)
    print({"window_2**20_s": tw}, flush=True)
    cmd = " ".join(["benchmarks/bench_ngame_scale.py", *sys.argv[1:]])
    lines = ["# bench_ngame_scale: NGAME's windowed clustering vs the exact one (issue 15)", "",
             (f"Command: `.venv/bin/python {cmd}` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2-core "
             f"machine shared with other jobs, load average {os.getloadavg()[0]:.0f}: times are inflated and noisy). "
             f"{n:,} rows, {args.blobs:,} Gaussian blobs in d={args.dim} (noise {args.sigma}), batch_size 256, "
             "cluster_size 16 (16 clusters per batch), clustering on the CPU (Numba kernel), one clustered epoch "
             "per row. *cos*: mean cosine similarity of a row with its batch-mates; *same blob*: share of "
             "batch-mates from the row's blob; *purity*: share of clusters from one blob; *cluster s*: "
             "construction with `embeddings=` (the clustering; windowed: also copying the bank to its file)."), "",
             "| plan | seed | cos | same blob | purity | cluster s | batches |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pur = f"{r['purity']:.4f}" if "purity" in r else "-"
        lines.append(f"| {r['plan']} | {r['seed']} | {r['cos']:.4f} | {r['same']:.4f} | {pur} | {r['cluster_s']:.1f} "
                     f"| {r['batches']} |")
    lines += ["", (f"One window of 2**20 rows (d={args.dim}, the default `WINDOW_ROWS`) clusters in {tw:.1f} s here. "
              f"Extrapolated, not measured: 1e9 rows are 954 windows, {954 * tw / 3600:.1f} h on this machine in one "
              f"process, {954 * tw / 8 / 60:.0f} min per refresh with 8 ranks clustering their own windows at this "
              "speed (each rank its windows r, r + 8, ...).")]
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    keep = old.find("\n## ")  # sections written by hand or by other runs (scale figures) stay
    out.write_text("\n".join(lines) + "\n" + (old[keep:] if keep >= 0 else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
