"""bench_duration2d_scale: DurationBucketSampler with 2D buckets (duration x output tokens, Żelasko et al., 2025 /
NeMo's 2D bucketing) in its windowed plan (above ``EXACT_MAX_ROWS``) against the exact 2D plan over the same cuts:
padding (seconds and tokens), bucket purity, batch sizes and randomness (batch-mates kept across epochs).

The windowed plan is forced on 1e6-4e6 cuts by setting ``samplers.duration.EXACT_MAX_ROWS = 0`` (the windows, block
size and bin sample keep their library values), once with the exact plan's bins (the only difference is then the
windowing) and once with bins estimated from the strided sample (what a user gets at 1e9 cuts). Durations are
those of ``bench_scale`` (log-normal, median ~6 s, clipped to [0.5, 40] s, float32); output tokens are
``round(duration * U(2, 6)) + 1`` (int32), with one cut in 5,000 at 40 tokens/s (outliers that the 2D rule
promotes or drops). The 1e9-row time and memory case is ``bench_scale.py --case duration2d 1e9``; its output-length
file is written by :func:`output_lengths_file` here.

    python benchmarks/bench_duration2d_scale.py                 # 1e6 and 4e6 cuts, seeds 1 and 2 (a few minutes)
    python benchmarks/bench_duration2d_scale.py --sizes 1e6     # quicker
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from scale_common import metadata_file  # noqa: E402

OUT = HERE / "results" / "bench_duration2d_scale.md"
#: the results file's section with the 1e9-row figures of ``bench_scale.py --case duration2d 1e9`` (kept on rewrite)
SCALE_HEADING = "## 1e9 cuts"


def tokens_for(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Output tokens of cuts of ``d`` seconds: 2-6 tokens/s, one cut in 5,000 at 40 tokens/s."""
    d = np.asarray(d, dtype=np.float64)
    tok = np.rint(d * rng.uniform(2.0, 6.0, len(d))).astype(np.int32) + 1
    out = rng.random(len(d)) < 2e-4
    tok[out] = np.rint(d[out] * 40.0).astype(np.int32)
    return tok


def output_lengths_file(n: int, tmp: Path) -> Path:
    """Memory-mapped int32 output tokens of the ``n`` durations of ``scale_common.metadata_file("durations", n)``,
    written in chunks under ``tmp`` as ``bench_scale_tokens_{n}.npy`` (bench_scale deletes it with the others)."""
    path = tmp / f"bench_scale_tokens_{n}.npy"
    if path.exists():
        return path
    d = np.load(metadata_file("durations", n, tmp), mmap_mode="r")
    part = path.with_suffix(".part.npy")
    mm = np.lib.format.open_memmap(part, mode="w+", dtype=np.int32, shape=(n,))
    rng = np.random.default_rng(7)
    for a in range(0, n, 1 << 24):
        mm[a:a + (1 << 24)] = tokens_for(d[a:a + (1 << 24)], rng)
    mm.flush()
    del mm
    part.rename(path)
    return path


def quality(n: int, seeds=(1, 2)) -> list[dict]:
    import samplers
    import samplers.duration as sd
    from bench_scale import batch_ids, mates_overlap
    from native.duration import assign_buckets_2d

    rng = np.random.default_rng(0)
    d = np.clip(rng.lognormal(1.8, 0.6, n), 0.5, 40.0).astype(np.float32)
    tok = tokens_for(d, np.random.default_rng(7))
    anchors = np.random.default_rng(1).choice(n, 3000, replace=False)
    kw = dict(max_duration=600.0, output_lengths=tok, world_size=8)
    rows = []
    saved = sd.EXACT_MAX_ROWS
    exact_bins = None
    try:
        for name in ("exact", "windowed, exact plan's bins", "windowed, sampled bins"):
            sd.EXACT_MAX_ROWS = 1 << 62 if name == "exact" else 0
            for seed in seeds:
                t0 = time.perf_counter()
                bins = dict(bucket_bins=exact_bins) if name == "windowed, exact plan's bins" else dict(num_buckets=30)
                s = samplers.DurationBucketSampler(d, seed=seed, **bins, **kw)
                if name == "exact":
                    exact_bins = s.bins
                st0 = s.stats()
                p0 = s.global_plan()
                t1 = time.perf_counter()
                sizes = p0.sizes
                # purity: share of a batch's cuts whose own 2D bucket (the exact rule) is the batch's bucket; and how
                # close a batch's durations are (shortest / longest cut, mean over batches)
                own = assign_buckets_2d(d[p0.indices], tok[p0.indices], s.bins, s.strict_2d)[0]
                purity = float(np.mean(own == np.repeat(p0.groups, sizes)))
                lo = np.minimum.reduceat(d[p0.indices], p0.offsets[:-1])
                hi = np.maximum.reduceat(d[p0.indices], p0.offsets[:-1])
                b0 = batch_ids(p0, n)
                s.set_epoch(1)
                b1 = batch_ids(s.global_plan(), n)
                rows.append({"rows": n, "plan": name, "seed": seed, "buckets": s.num_buckets,
                             "batches": st0["num_batches"], "mean_rows": st0["mean_batch_size"],
                             "p10": float(np.percentile(sizes, 10)), "p50": float(np.percentile(sizes, 50)),
                             "p90": float(np.percentile(sizes, 90)), "padding": st0["padding_fraction"],
                             "token_padding": st0["token_padding_fraction"], "purity": purity,
                             "spread": float(np.mean(lo / hi)), "dropped": st0["dropped_rows"],
                             "promoted": st0["promoted"], "overlap": mates_overlap(b0, b1, anchors),
                             "expected": float(st0["mean_batch_size"]) / n, "plan_s": t1 - t0})
                print(rows[-1], flush=True)
    finally:
        sd.EXACT_MAX_ROWS = saved
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e6,4e6")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("DATAPIPE_PLAN_CACHE", "0")  # in-memory metadata: nothing to keep on disk
    res = [r for n in args.sizes.split(",") for r in quality(int(float(n)))]
    load = os.getloadavg()[0]
    lines = ["# bench_duration2d_scale: windowed vs exact 2D duration buckets", "",
             f"Command: `.venv/bin/python benchmarks/bench_duration2d_scale.py --sizes {args.sizes}` (run "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, shared 2-core machine, load average {load:.0f} at "
             "the end). `DurationBucketSampler(durations, max_duration=600.0, num_buckets=30, output_lengths=tokens, "
             "world_size=8)` (num_sub_buckets=2: up to 60 buckets); *windowed* forces the windowed plan "
             "(`EXACT_MAX_ROWS = 0`; windows of 524,288 cuts: 262,144 x 2 sub-buckets, blocks of 16, bins from a "
             "strided sample of 4,194,304 "
             "cuts) with the exact plan's bins or its own. Durations: log-normal, median ~6 s, clipped to [0.5, 40] s; "
             "tokens: 2-6 per second, one cut in 5,000 at 40 per second.", "",
             "*padding*: padded seconds not speech (and padded tokens not tokens); *purity*: share of a batch's cuts "
             "whose own 2D bucket is the batch's; *short/long*: a batch's shortest over its longest cut, mean over "
             "batches; *overlap*: mean share of a cut's epoch-0 batch-mates that are its batch-mates again in epoch 1 "
             "(3000 anchors), beside *1/N x rows per batch*, what uniformly random batches give; *plan (s)*: "
             "construction + stats + the materialised global plan.", "",
             "| cuts | plan | seed | buckets | batches | rows/batch | p10 / p50 / p90 | padding (s) | padding (tokens) "
             "| purity | short/long | dropped / promoted | overlap | 1/N x rows per batch | plan (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for q in res:
        lines.append(f"| {q['rows']:.0e} | {q['plan']} | {q['seed']} | {q['buckets']} | {q['batches']} | "
                     f"{q['mean_rows']:.2f} | {q['p10']:.0f} / {q['p50']:.0f} / {q['p90']:.0f} | {q['padding']:.4f} | "
                     f"{q['token_padding']:.4f} | {q['purity']:.4f} | {q['spread']:.3f} | {q['dropped']} / "
                     f"{q['promoted']} | {q['overlap']:.5f} | {q['expected']:.6f} | {q['plan_s']:.1f} |")
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    start = old.find(SCALE_HEADING)  # the 1e9 section is measured by bench_scale.py's cases: kept as it is
    if start >= 0:
        lines += ["", old[start:].rstrip("\n")]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
