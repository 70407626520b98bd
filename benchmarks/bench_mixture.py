"""MixtureBatchSampler memory and speed: lazy Feistel streams vs the materialised plan, side by side.

The sampler of "RegMix" (Liu et al., ICLR 2025) / "Does your data spark joy?" (Blakeney et al., 2024) schedules
used to materialise the whole run (``total_steps * world_size * batch_size`` int64 rows) and a full permutation
per domain pass. It now keeps per-batch counts only and computes rows on demand (``native.feistel``).

Cases (each in a fresh subprocess, so that peak RSS is its own):

* ``big``: 200k steps x 1024 rows x 8 ranks over domains of 1e9 / 3e7 / 1e6 rows (DomainUpsampling, last 10 %),
  lazy sampler only: construction, O(1) resume to step 150,000, time per 1000 batches, peak memory.
* ``scaled``: the same mixture at 2,000 steps over 1e7 / 3e6 / 1e5 rows, lazy vs the materialised plan
  (the previous implementation, kept here as the baseline a user would otherwise have).

The materialised plan's memory for ``big`` is projected (not run: it does not fit) from the measured bytes per
planned row of ``scaled`` plus the domain permutations.

    .venv/bin/python benchmarks/bench_mixture.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mixtures.schedules import DomainUpsampling
from native.rng import mix_seed, permutation, shuffle_segments
from samplers import MixtureBatchSampler
from samplers.base import BatchSamplerBase, Plan

BASE = {"web": 0.7, "code": 0.2, "math": 0.1}
UP = {"web": 0.3, "code": 0.4, "math": 0.3}
CASES = {
    "big": {"sizes": {"web": 10**9, "code": 3 * 10**7, "math": 10**6}, "total_steps": 200_000},
    "scaled": {"sizes": {"web": 10**7, "code": 3 * 10**6, "math": 10**5}, "total_steps": 2_000},
}
BATCH, WORLD, RANK = 1024, 8, 3


class Materialised(MixtureBatchSampler):
    """The previous implementation: the whole run's plan and every domain pass's permutation in memory."""

    def _build_plan(self, epoch):
        counts = self.counts(epoch)
        nb = len(counts)
        rows_parts, batch_parts = [], []
        for d in range(len(self.domains)):
            need = int(counts[:, d].sum())
            size = int(self.sizes[d])
            stream = np.concatenate([permutation(size, mix_seed(self.seed, epoch, d, p))
                                     for p in range(-(-need // size))])
            rows_parts.append(stream[:need] + self.offsets[d])
            batch_parts.append(np.repeat(np.arange(nb, dtype=np.int64), counts[:, d]))
        rows = np.concatenate(rows_parts)
        which = np.concatenate(batch_parts)
        rows = rows[np.argsort(which, kind="stable")]
        offsets = np.arange(nb + 1, dtype=np.int64) * self.batch_size
        rows = shuffle_segments(rows, offsets, self.epoch_seed(epoch, 0xBA7C4))
        return Plan(rows, offsets)

    __iter__ = BatchSamplerBase.__iter__
    __len__ = BatchSamplerBase.__len__
    global_plan = BatchSamplerBase.global_plan


def make(kind, case):
    c = CASES[case]
    cls = Materialised if kind == "materialised" else MixtureBatchSampler
    return cls(c["sizes"], DomainUpsampling(BASE, UP, final_fraction=0.1), batch_size=BATCH,
               total_steps=c["total_steps"], world_size=WORLD, rank=RANK, seed=1)


def run_case(kind, case, repeats):
    """Child process: construct, resume in the middle, time 1000-batch blocks; report as JSON."""
    total = CASES[case]["total_steps"]
    cls = Materialised if kind == "materialised" else MixtureBatchSampler
    warm = cls({"a": 5000, "b": 300}, DomainUpsampling({"a": 0.5, "b": 0.5}, {"a": 0.2, "b": 0.8}), batch_size=BATCH,
               total_steps=4, world_size=WORLD, rank=RANK, seed=1)
    next(iter(warm))  # warm-up: numba kernels loaded (same dtypes), imports done
    del warm
    base_rss = _rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    s = make(kind, case)
    construct = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = s.state_dict()
    state["batches_yielded"] = total * 3 // 4
    s.load_state_dict(state)
    it = iter(s)
    next(it)
    first = time.perf_counter() - t0
    block = min(1000, total // 4 - 1)
    per_1000 = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(block):
            next(it)
        per_1000.append((time.perf_counter() - t0) * 1000 / block)
        state["batches_yielded"] = total * 3 // 4
        s.load_state_dict(state)
        it = iter(s)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"construct_s": construct, "resume_first_s": first, "per_1000_s": statistics.median(per_1000),
                      "peak_traced_mb": peak / 2**20,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss}))


def _rss_mb():
    """Current resident set size (MB), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(kind, case, repeats):
    out = subprocess.run([sys.executable, __file__, "--child", kind, case, "--repeats", str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def projected_materialised_gb(bytes_per_row, case="big"):
    """Memory of the materialised plan for ``case`` (GiB): its rows, the peak at the measured bytes per planned row
    (six plan-sized int64 arrays are alive at once while it sorts and shuffles), and the largest domain's
    permutation passes alive together with their concatenation (an earlier, smaller peak)."""
    c = CASES[case]
    rows = c["total_steps"] * WORLD * BATCH
    s = MixtureBatchSampler(c["sizes"], DomainUpsampling(BASE, UP, final_fraction=0.1), batch_size=BATCH,
                            total_steps=c["total_steps"], world_size=WORLD, rank=RANK, seed=1)
    need = s.stats()["full_passes"]
    perms = max(2 * need[d] * n * 8 for d, n in c["sizes"].items())
    return rows * 8 / 2**30, bytes_per_row * rows / 2**30, perms / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat per case")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    if args.child:
        return run_case(*args.child, repeats)
    res = {(k, c): child(k, c, repeats) for k, c in [("lazy", "big"), ("lazy", "scaled"), ("materialised", "scaled")]}
    sc = CASES["scaled"]
    scaled_rows = sc["total_steps"] * WORLD * BATCH
    per_row = res["materialised", "scaled"]["peak_traced_mb"] * 2**20 / scaled_rows
    plan_gb, proj_gb, perm_gb = projected_materialised_gb(per_row)
    print(f"repeats={repeats} (medians of 1000-batch blocks); batch_size={BATCH}, world_size={WORLD}, rank={RANK}\n")
    print("| case | sampler | construct (s) | resume + 1st batch (s) | per 1000 batches (s) | peak traced (MB) |"
          " peak RSS growth (MB) |")
    print("|---|---|---|---|---|---|---|")
    for (k, c), r in res.items():
        print(f"| {c} ({CASES[c]['total_steps']:,} steps) | {k} | {r['construct_s']:.3f} | {r['resume_first_s']:.3f} | "
              f"{r['per_1000_s']:.3f} | {r['peak_traced_mb']:.1f} | {r['rss_growth_mb']:.0f} |")
    lz, mt = res["lazy", "scaled"], res["materialised", "scaled"]
    print(f"\nscaled, materialised / lazy: construct+resume {(mt['construct_s'] + mt['resume_first_s']) / (lz['construct_s'] + lz['resume_first_s']):.1f}x, "
          f"peak traced {mt['peak_traced_mb'] / lz['peak_traced_mb']:.1f}x, per 1000 batches "
          f"{mt['per_1000_s'] / lz['per_1000_s']:.2f}x")
    print(f"materialised peak per planned row (scaled, measured): {per_row:.1f} bytes")
    print(f"big, materialised (projected, not run): the plan's rows alone {plan_gb:.1f} GiB; peak at the measured "
          f"{per_row:.1f} B/row {proj_gb:.1f} GiB (earlier, transiently, {perm_gb:.1f} GiB for the 1e9-row domain's "
          f"permutation passes and their concatenation); lazy measured {res['lazy', 'big']['peak_traced_mb']:.1f} MB "
          f"traced, {res['lazy', 'big']['rss_growth_mb']:.0f} MB RSS growth")


if __name__ == "__main__":
    main()
