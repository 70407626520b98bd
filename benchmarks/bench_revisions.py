"""The plan samplers of two revisions side by side, in one process: is a change to the kernels within noise?

A refactor of ``native/`` or ``samplers/`` (one kernel for several plans, a shared primitive) must keep plans and
speed. This script imports the ``native`` and ``samplers`` packages of a base revision under other names
(``native_base``, ``samplers_base``: ``git archive``, imports rewritten; ``native`` and ``samplers`` import nothing
else of the project; module names in strings are renamed too) beside the working tree's, then times each case on both, interleaved (the order alternates
between repeats), on the same arrays, and checks that both give the same batches.

Cases (what a user constructs and iterates): the exact and the windowed plans of ``TokenBudgetBatchSampler``,
``DurationBucketSampler`` (1D and 2D buckets) and ``PackedDurationSampler``; *windowed* forces the windowed path
(``EXACT_MAX_ROWS = 0``) and times construction (the counting pass) plus the first batch, with the disk plan cache
off; *exact* times construction plus a whole epoch.

usage: python benchmarks/bench_revisions.py --base HEAD [--rows 4e6] [--repeats 9] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

os.environ["DATAPIPE_PLAN_CACHE"] = "0"  # every construction runs its counting pass

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACKAGES = ("native", "samplers")


def import_base(rev: str, into: Path):
    """``(native_base, samplers_base)``: the packages of revision ``rev``, renamed."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *PACKAGES], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    names = "|".join(PACKAGES)
    statement = re.compile(r"^(\s*)(from|import) (" + names + r")\b", re.M)
    string = re.compile(r"""(["'])(""" + names + r")([.\"'])")  # module names in strings (lazy import tables)
    for pkg in PACKAGES:
        (into / pkg).rename(into / f"{pkg}_base")
        for f in (into / f"{pkg}_base").rglob("*.py"):
            f.write_text(string.sub(r"\1\2_base\3", statement.sub(r"\1\2 \3_base", f.read_text())))
    sys.path.insert(0, str(into))
    import native_base  # noqa: F401
    import samplers_base

    return samplers_base


def data(n: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    lengths = (np.minimum(rng.lognormal(6, 1, n), 20000) + 1).astype(np.int32)
    durations = np.clip(rng.lognormal(1.8, 0.7, n), 0.5, 40).astype(np.float32)
    tokens = np.maximum(1, (durations * rng.uniform(2, 6, n))).astype(np.int32)
    return {"lengths": lengths, "durations": durations, "tokens": tokens}


def cases(n_windowed: int, n_exact: int) -> dict:
    """name -> (sampler class name, module forced windowed or None, data key, kwargs, rows, whole epoch)."""
    return {
        "token_budget exact": ("TokenBudgetBatchSampler", None, "lengths", {"max_tokens": 65536}, n_exact, True),
        "token_budget windowed": ("TokenBudgetBatchSampler", "token_budget", "lengths", {"max_tokens": 65536},
                                  n_windowed, False),
        "duration exact": ("DurationBucketSampler", None, "durations", {"max_duration": 600.0}, n_exact, True),
        "duration windowed": ("DurationBucketSampler", "duration", "durations", {"max_duration": 600.0},
                              n_windowed, False),
        "duration 2D windowed": ("DurationBucketSampler", "duration", "durations",
                                 {"max_duration": 600.0, "output_lengths": "tokens"}, n_windowed, False),
        "packed exact": ("PackedDurationSampler", None, "durations", {"max_duration": 600.0}, n_exact, True),
        "packed windowed": ("PackedDurationSampler", "packing", "durations", {"max_duration": 600.0}, n_windowed,
                            False),
    }


def forget_passes(pkg) -> None:
    """Empty the in-process memos of the package's modules (``samplers.plan_cache.PlanCache`` memos of counting
    passes, module-level ``OrderedDict`` caches such as shared arrangements; the disk cache is off), so every
    construction counts; a revision without them has nothing to empty."""
    prefix = pkg.__name__ + "."
    for name, module in list(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        for value in vars(module).values():
            if type(value).__name__ == "PlanCache" and isinstance(getattr(value, "_mem", None), dict):
                value._mem.clear()
            elif isinstance(value, OrderedDict):
                value.clear()


def run_case(pkg, case: tuple, arrays: dict) -> tuple[float, float, str]:
    """``(wall s, CPU s, digest of the batches)`` of one construction and its epoch (or first batch)."""
    cls_name, windowed, key, kwargs, rows, epoch = case
    forget_passes(pkg)
    module = getattr(pkg, windowed) if windowed else None
    saved = module.EXACT_MAX_ROWS if module else None
    if module:
        module.EXACT_MAX_ROWS = 0
    kw = {k: (arrays[v][:rows] if isinstance(v, str) else v) for k, v in kwargs.items()}
    digest = hashlib.sha256()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        sampler = getattr(pkg, cls_name)(arrays[key][:rows], seed=3, rank=1, world_size=4, **kw)
        it = iter(sampler)
        for b in (it if epoch else [next(it)]):
            digest.update(np.asarray(b, dtype=np.int64).tobytes())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if module:
            module.EXACT_MAX_ROWS = saved
    return wall, cpu, digest.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="the revision to compare the working tree with")
    ap.add_argument("--rows", type=float, default=4e6, help="rows of the windowed cases")
    ap.add_argument("--exact-rows", type=float, default=1e6, help="rows of the exact cases")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--out", default="", help="write the table to this markdown file")
    args = ap.parse_args()
    import samplers

    all_cases = cases(int(args.rows), int(args.exact_rows))
    chosen = {k: v for k, v in all_cases.items() if not args.only or k in args.only.split(",")}
    arrays = data(int(max(args.rows, args.exact_rows)))
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"base": import_base(args.base, Path(tmp)), "tree": samplers}
        for case in chosen.values():  # compile (or load) every kernel once, untimed
            for pkg in sides.values():
                run_case(pkg, case[:4] + (min(case[4], 200_000), case[5]), arrays)
        times: dict = {(c, s): [] for c in chosen for s in sides}
        digests: dict = {}
        for rep in range(args.repeats):
            for c, case in chosen.items():
                for s in (("base", "tree") if rep % 2 == 0 else ("tree", "base")):
                    wall, cpu, dig = run_case(sides[s], case, arrays)
                    times[c, s].append((wall, cpu))
                    digests[c, s] = dig
            print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
    lines = [
        f"Command: `python benchmarks/bench_revisions.py --base {args.base} --rows {args.rows:g} "
        f"--exact-rows {args.exact_rows:g} --repeats {args.repeats}` (base `{short(args.base)}` vs the working tree "
        f"on `{short('HEAD')}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{os.getloadavg()[0]:.1f} at the end). Medians of {args.repeats} interleaved repeats; *ratio* is tree / "
        "base (below 1: the tree is faster); *same batches*: both sides yield the same batches.",
        "",
        "| case | rows | base wall (s) | tree wall (s) | wall ratio | base CPU (s) | tree CPU (s) | CPU ratio | "
        "same batches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, case in chosen.items():
        b = np.median(np.array(times[c, "base"]), axis=0)
        t = np.median(np.array(times[c, "tree"]), axis=0)
        lines.append(f"| {c} | {case[4]:.3g} | {b[0]:.3f} | {t[0]:.3f} | {t[0] / b[0]:.3f} | {b[1]:.3f} | {t[1]:.3f} "
                     f"| {t[1] / b[1]:.3f} | {'yes' if digests[c, 'base'] == digests[c, 'tree'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text("# bench_revisions: the plan samplers of two revisions side by side\n\n" + text)


def short(rev: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    main()
