"""Speech batching beside Lhotse: padding, batch size and epoch sampling time at equal ``max_duration``.

"Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025) measures that
naive batches spend most compute on padding. This compares, on the same durations and budget:

* naive random batches of 32, and random order cut under the padded budget;
* Lhotse 1.33 ``DynamicBucketingSampler`` (CutSet of MonoCut, ``num_buckets=30``, ``shuffle=True``);
* ``samplers.DurationBucketSampler`` (30 buckets; plain bucketing ``chunk_batches=0`` and the default);
* ``samplers.PackedDurationSampler`` (padding-free packs, best-fit decreasing).

Epoch time is the wall time of a full pass over a fresh epoch (plan + iteration), median of repeats.

Run:  .venv/bin/python benchmarks/bench_speech.py [--quick] [--n 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
import warnings

import numpy as np

from native import budget_cuts
from samplers import DurationBucketSampler, PackedDurationSampler, RandomBatchSampler

MAX_DURATION = 600.0


def issue_mix(n: int, seed: int = 0) -> np.ndarray:
    """The issue's distribution: 60 % N(14.5, 1.7), 30 % U(1, 12), 10 % N(17, 4.5), clipped to [1, 35] s."""
    rng = np.random.default_rng(seed)
    a, b = int(0.6 * n), int(0.3 * n)
    d = np.concatenate([rng.normal(14.5, 1.7, a), rng.uniform(1, 12, b), rng.normal(17, 4.5, n - a - b)])
    return rng.permutation(d.clip(1, 35))


def commands_and_read(n: int, seed: int = 1) -> np.ndarray:
    """Short voice commands (40 %, log-normal around 1.5 s) beside long read speech (60 %, N(16, 6) in [3, 35])."""
    rng = np.random.default_rng(seed)
    a = int(0.4 * n)
    short = np.exp(rng.normal(np.log(1.5), 0.35, a)).clip(0.3, 5)
    long = rng.normal(16, 6, n - a).clip(3, 35)
    return rng.permutation(np.concatenate([short, long]))


def batch_stats(batches: list[np.ndarray], d: np.ndarray) -> tuple[float, float]:
    padded = sum(len(b) * d[b].max() for b in batches)
    return 1.0 - sum(d[b].sum() for b in batches) / padded, float(np.mean([len(b) for b in batches]))


def timed(fn, repeats: int):
    times, out = [], None
    for e in range(repeats):
        t = time.perf_counter()
        out = fn(e)
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def run_ours(sampler, repeats: int):
    def epoch(e):
        sampler.set_epoch(e + 1)
        return list(sampler)

    epoch(-1)  # compile / load the kernels once
    return timed(epoch, repeats)


def run_lhotse(d: np.ndarray, repeats: int):
    from lhotse import CutSet, MonoCut
    from lhotse.dataset import DynamicBucketingSampler

    cuts = CutSet.from_cuts(MonoCut(id=str(i), start=0.0, duration=float(x), channel=0) for i, x in enumerate(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager-CutSet hint: lazy manifests are slower still
        sampler = DynamicBucketingSampler(cuts, max_duration=MAX_DURATION, num_buckets=30, shuffle=True, seed=0)

        def epoch(e):
            sampler.set_epoch(e)
            return [np.fromiter((int(c.id) for c in b), dtype=np.int64) for b in sampler]

        return timed(epoch, repeats)


def naive_budget(d: np.ndarray, repeats: int):
    ms = np.ceil(d * 1000).astype(np.int64)

    def epoch(e):
        order = np.random.default_rng(e).permutation(len(d))
        off = budget_cuts(ms[order], int(MAX_DURATION * 1000))
        return [order[a:b] for a, b in zip(off[:-1], off[1:])]

    return timed(epoch, repeats)


def bench(name: str, d: np.ndarray, repeats: int, lhotse_repeats: int) -> list[dict]:
    rows = []

    def add(system, batches, secs, note=""):
        pad, mean = batch_stats(batches, d)
        rows.append(dict(dist=name, system=system, padding=pad, mean=mean, batches=len(batches), secs=secs, note=note))
        print(f"  {system:<44} padding {pad:7.2%}  mean batch {mean:6.1f}  epoch {secs * 1e3:9.1f} ms", flush=True)

    b, t = run_ours(RandomBatchSampler(len(d), 32, seed=0), repeats)
    add("random batches of 32", b, t)
    b, t = naive_budget(d, repeats)
    add("random order, padded budget", b, t)
    b, t = run_lhotse(d, lhotse_repeats)
    add("Lhotse 1.33 DynamicBucketingSampler (30)", b, t)
    lhotse_t, lhotse_mean = t, rows[-1]["mean"]
    b, t = run_ours(DurationBucketSampler(d, max_duration=MAX_DURATION, num_buckets=30, chunk_batches=0), repeats)
    add("DurationBucketSampler, plain buckets", b, t)
    s = DurationBucketSampler(d, max_duration=MAX_DURATION, num_buckets=30)
    b, t = run_ours(s, repeats)
    add("DurationBucketSampler (default)", b, t)
    ours = rows[-1]
    p = PackedDurationSampler(d, max_duration=MAX_DURATION)
    b, t = run_ours(p, repeats)
    fill = p.stats()["fill_fraction"]
    rows.append(dict(dist=name, system="PackedDurationSampler (varlen)", padding=0.0,
                     mean=float(np.mean([len(x) for x in b])), batches=len(b), secs=t,
                     note=f"fill {fill:.2%} of {MAX_DURATION:.0f} s"))
    print(f"  PackedDurationSampler: fill {fill:.2%}, mean pack {rows[-1]['mean']:.1f} cuts, {t * 1e3:.1f} ms")
    ours["goals"] = (ours["padding"] <= 0.012, ours["mean"] >= lhotse_mean, lhotse_t / ours["secs"])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| distribution | system | padding | mean batch (cuts) | batches | epoch time (median) | vs Lhotse time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lhotse = {r["dist"]: r["secs"] for r in rows if r["system"].startswith("Lhotse")}
    for r in rows:
        ratio = lhotse[r["dist"]] / r["secs"]
        pad = r["note"] if r["note"] else f"{r['padding']:.2%}"
        lines.append(f"| {r['dist']} | {r['system']} | {pad} | {r['mean']:.1f} | {r['batches']} | "
                     f"{r['secs'] * 1e3:.1f} ms | {ratio:.1f}x faster |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k cuts, fewer repeats")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--lhotse-repeats", type=int, default=3)
    a = ap.parse_args()
    n, reps, lreps = (20_000, 3, 1) if a.quick else (a.n, a.repeats, a.lhotse_repeats)
    rows = []
    for name, d in [("issue mix", issue_mix(n)), ("commands + read speech", commands_and_read(n))]:
        print(f"{name}: {n} cuts, {d.sum() / 3600:.1f} h, max_duration={MAX_DURATION:.0f} s")
        rows += bench(name, d, reps, lreps)
    print()
    print(table(rows))
    print()
    for r in rows:
        if "goals" in r:
            pad_ok, mean_ok, speed = r["goals"]
            print(f"goals, {r['dist']}: padding <= 1.2 % {'met' if pad_ok else 'NOT met'} ({r['padding']:.2%}); "
                  f"mean batch >= Lhotse's {'met' if mean_ok else 'NOT met'} ({r['mean']:.1f}); "
                  f"epoch >= 30x faster than Lhotse {'met' if speed >= 30 else 'NOT met'} ({speed:.0f}x)")
    print(f"\n{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {n} cuts per distribution, "
          f"medians of {reps} epochs (Lhotse: {lreps})")


if __name__ == "__main__":
    main()
