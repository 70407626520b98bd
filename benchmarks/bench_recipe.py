"""Dry run of a recipe (``datapipe plan``): a 1e5-step, 8-domain decomposed run with domain up-sampling, planned
from metadata only, vs. what a user would otherwise do to learn the same figures (run the samplers of every rank
over the whole run and count).

The domains are real dataset directories holding only a ``length`` column (the dry run reads nothing else: no
token is read, and the decompositions are computed in memory, not written). Each case runs in a fresh
subprocess so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_recipe.py [--docs 500000] [--steps 100000] [--world-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NAMES = ["web", "books", "code", "math", "wiki", "papers", "forums", "news"]
BASE = [0.35, 0.15, 0.15, 0.05, 0.1, 0.08, 0.07, 0.05]
UP = [0.15, 0.1, 0.2, 0.2, 0.1, 0.15, 0.05, 0.05]


def write_domains(root: Path, docs: int) -> None:
    import pyarrow as pa

    import datapipe

    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        lengths = np.clip(rng.lognormal(5.6 + 0.15 * i, 1.1, docs), 1, 200_000).astype(np.int64)
        datapipe.write_dataset(pa.table({"length": lengths}), root / name, shard_rows=1 << 20)


def store_decompositions(root: Path, rec: dict) -> None:
    import datapipe

    b = rec["batching"]
    for n in NAMES:
        datapipe.decompose(root / n, min_log2=b["min_log2"], max_log2=b["max_log2"])


def recipe(root: Path, steps: int) -> dict:
    return {"domains": {n: {"path": str(root / n)} for n in NAMES},
            "schedule": {"kind": "domain_upsampling", "base": dict(zip(NAMES, BASE)), "upsampled": dict(zip(NAMES, UP)),
                         "final_fraction": 0.2},
            "batching": {"kind": "decomposed", "tokens_per_batch": 8192, "min_log2": 6, "max_log2": 11,
                         "curriculum": "grow-p2"},
            "total_steps": steps, "seed": 0}


def _warm() -> None:
    """Load every kernel the dry run and the samplers use, on a tiny problem."""
    from types import SimpleNamespace

    import datapipe.dataset  # noqa: F401  (torch: the dry run opens dataset directories)
    import datapipe.decomposition  # noqa: F401
    from mixtures.schedules import Constant
    from native.decompose import decompose_lengths
    from samplers.shaped_mixture import ShapedMixtureBatchSampler

    arr = decompose_lengths(np.array([100, 3000, 70]), min_log2=6, max_log2=11)
    ix = SimpleNamespace(sequence_log2=arr["sequence_log2"], sequence_tokens=arr["sequence_tokens"], max_log2=11)
    s = ShapedMixtureBatchSampler.from_decomposed([ix], Constant({"a": 1.0}), tokens_per_batch=2048, total_steps=4,
                                                  rank=0, world_size=1, max_passes=1e9)
    next(iter(s))


def case(args) -> dict:
    from datapipe.recipe import Recipe

    rec = Recipe.from_dict(json.loads(Path(args.recipe).read_text()))
    warnings.simplefilter("ignore")
    _warm()  # load the kernels first (numba cache), so the figures are the plan's own
    if args.case == "warmup":
        return {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.trace:
        tracemalloc.start()
    t = time.perf_counter()
    if args.case == "plan":
        plan = rec.plan(world_size=args.world_size)
        out = {"tokens": sum(plan["tokens"].values()), "passes_max": max(plan["passes"].values())}
    else:  # run every rank's sampler over the first `--iter-steps` steps and count tokens (projected to the run)
        from types import SimpleNamespace

        from datapipe.dataset import ArrowDataset
        from native.decompose import decompose_lengths
        from samplers.shaped_mixture import ShapedMixtureBatchSampler

        b = rec.batching
        indexes = []  # decomposed once (in memory, as the dry run does), shared by the ranks
        for p in rec.paths():
            arr = decompose_lengths(ArrowDataset.open(p).index["length"], min_log2=b["min_log2"],
                                    max_log2=b["max_log2"])
            indexes.append(SimpleNamespace(sequence_log2=arr["sequence_log2"], sequence_tokens=arr["sequence_tokens"],
                                           max_log2=b["max_log2"]))
        build, tok, steady = time.perf_counter() - t, 0, 0.0
        for r in range(args.world_size):
            t0 = time.perf_counter()
            s = ShapedMixtureBatchSampler.from_decomposed(
                indexes, rec.build_schedule(), tokens_per_batch=b["tokens_per_batch"], curriculum=b["curriculum"],
                total_steps=rec.total_steps, seed=rec.seed, rank=r, world_size=args.world_size, max_passes=1e9)
            it = iter(s)
            tok += len(next(it))  # the first batch builds the rank's row ids by group
            t1 = time.perf_counter()
            build += t1 - t0
            for _ in range(args.iter_steps - 1):
                tok += len(next(it))
            steady += time.perf_counter() - t1
        out = {"build_s": build, "steady_s": steady, "rows": tok}
    secs = time.perf_counter() - t
    peak = 0
    if args.trace:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**out, "seconds": secs, "peak_traced_mb": peak / 2**20, "rss_growth_mb": (rss - rss0) / 1024}


def run_case(name: str, recipe_path: Path, a, trace: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--case", name, "--recipe", str(recipe_path), "--world-size", str(a.world_size),
           "--iter-steps", str(a.iter_steps), *(["--trace"] if trace else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=500_000, help="documents per domain")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--iter-steps", type=int, default=2_000, help="steps iterated per rank by the baseline")
    p.add_argument("--case", default=None)
    p.add_argument("--recipe", default=None)
    p.add_argument("--trace", action="store_true", help="(case) trace Python allocations (slows the run)")
    a = p.parse_args()
    if a.case:
        print(json.dumps(case(a)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_domains(root, a.docs)
        write_s = time.perf_counter() - t
        rp = root / "recipe.json"
        rp.write_text(json.dumps(recipe(root, a.steps)))
        run_case("warmup", rp, a)
        plans = [run_case("plan", rp, a) for _ in range(3)]
        traced = run_case("plan", rp, a, trace=True)
        it = run_case("iterate", rp, a)
        it_traced = run_case("iterate", rp, a, trace=True)
        t = time.perf_counter()
        store_decompositions(root, recipe(root, a.steps))
        store_s = time.perf_counter() - t
        stored = sorted((run_case("plan", rp, a) for _ in range(3)), key=lambda r: r["seconds"])[1]
        stored["peak_traced_mb"] = run_case("plan", rp, a, trace=True)["peak_traced_mb"]
    plans.sort(key=lambda r: r["seconds"])
    med = plans[1]
    med["peak_traced_mb"] = traced["peak_traced_mb"]
    it["peak_traced_mb"] = it_traced["peak_traced_mb"]
    per_step = it["steady_s"] / ((a.iter_steps - 1) * a.world_size)
    projected = it["build_s"] + per_step * a.steps * a.world_size
    lines = [
        "# bench_recipe: the dry run of a 1e5-step, 8-domain recipe",
        "",
        "Command: `.venv/bin/python benchmarks/bench_recipe.py` "
        f"(run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        "2-core machine shared with ~7 other jobs: wall times are noisy; median of 3 runs, each in a fresh "
        "subprocess that first loads the numba kernels from cache; peak traced memory from one more run under "
        "tracemalloc, peak RSS growth from the timed runs).",
        "",
        f"Recipe: 8 domain directories of {a.docs:,} documents each (lognormal lengths, only a `length` column on "
        f"disk; written in {write_s:.1f} s), `domain_upsampling` (last 20 %), `decomposed` batching "
        f"(`tokens_per_batch=8192`, buckets 2^6..2^11, `grow-p2`), {a.steps:,} steps x {a.world_size} ranks "
        f"({med['tokens']:,} tokens planned; the most-read domain is read {med['passes_max']:.2f} times).",
        "",
        "| what | seconds | peak traced (MB) | peak RSS growth (MB) |",
        "|---|---|---|---|",
        f"| `recipe.plan(world_size={a.world_size})` (decompositions in memory + whole-run plan + report) | "
        f"{med['seconds']:.2f} | {med['peak_traced_mb']:.0f} | {med['rss_growth_mb']:.0f} |",
        f"| `recipe.plan(world_size={a.world_size})` with the decompositions stored beside the datasets (after "
        f"`datapipe decompose` or a first `recipe.loader()`; storing them took {store_s:.1f} s) | "
        f"{stored['seconds']:.2f} | "
        f"{stored['peak_traced_mb']:.0f} | {stored['rss_growth_mb']:.0f} |",
        f"| baseline: decompose once, build every rank's sampler, iterate {a.iter_steps:,} steps each (measured) | "
        f"{it['seconds']:.2f} | {it['peak_traced_mb']:.0f} | {it['rss_growth_mb']:.0f} |",
        f"| baseline projected to the whole run ({a.steps:,} steps x {a.world_size} ranks) | {projected:.0f} | | |",
        "",
        "- All plan runs (s): " + ", ".join(f"{r['seconds']:.2f}" for r in plans) + "; the baseline's steady state: "
        f"{1e6 * per_step:.1f} us per batch (Feistel rows), plus {it['build_s']:.1f} s of decomposition and "
        "per-rank set-up.",
        "- The dry run computes each step's bucket and per-domain counts for the whole run once "
        "(`native.shaped_counts`, int64 `[steps, domains]` twice), and reports tokens, passes, shares per phase, "
        "buckets over steps and padding from them; it never computes a row id. The baseline is what one would do "
        "without it: run the samplers (rows computed by Feistel streams) and count.",
    ]
    out = Path(ROOT) / "benchmarks" / "results" / "bench_recipe.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
