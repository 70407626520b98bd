"""bench_packing_scale: PackedDurationSampler's windowed plan (above 2**22 cuts) vs the exact plan, and its memory and
time at 1e7-1e9 memory-mapped cuts (issue 15).

Quality (``quality()``): the same 1e6 durations (float32, log-normal, median ~6 s, clipped to [0.5, 40] s: the
durations of ``bench_scale.py``) planned by both paths (``samplers.packing.EXACT_MAX_ROWS`` set either way),
``max_duration=600``, the default ``window_packs=64``, world size 8: packs, cuts per pack, pack fill (seconds per
pack / max_duration), and randomness: the mean share of an anchor cut's epoch-0 pack-mates that are again its
pack-mates in epoch 1 (3,000 anchors; "chance" is what independent random packs of that size would give).

Scale (``--sizes``): ``bench_scale.py --case packed N`` and ``--resume-case packed N`` in fresh processes (anonymous
memory growth, first batch, ``load_state_dict`` after 100 batches; then a restarted process's resume from the
counting pass kept on disk), rank 3 of 8.

    python benchmarks/bench_packing_scale.py                     # quality at 1e6 cuts (~1 min)
    python benchmarks/bench_packing_scale.py --sizes 1e7,1e8,1e9 # also the scale cases (1e9: a 4 GB file in --tmp)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def pack_ids(plan, n: int) -> np.ndarray:
    """Pack of each cut in a materialised plan (-1: not in the epoch)."""
    out = np.full(n, -1, dtype=np.int64)
    out[plan.indices] = np.repeat(np.arange(plan.num_batches), plan.sizes)
    return out


def mates_overlap(p0: np.ndarray, p1: np.ndarray, anchors: np.ndarray) -> float:
    """Mean share of an anchor cut's epoch-0 pack-mates that are again its pack-mates in epoch 1."""
    order = np.argsort(p0, kind="stable")
    starts = np.searchsorted(p0[order], np.arange(p0.max() + 2))
    out = []
    for a in anchors:
        if p0[a] < 0:
            continue
        mates = order[starts[p0[a]]:starts[p0[a] + 1]]
        mates = mates[mates != a]
        if len(mates):
            out.append(float(np.mean(p1[mates] == p1[a])))
    return float(np.mean(out))


def quality(n: int = 10**6, seeds=(1, 2)) -> list[dict]:
    """Windowed vs exact plans of the same ``n`` durations (see the module docstring)."""
    import samplers
    import samplers.packing as sp

    d = np.clip(np.random.default_rng(0).lognormal(1.8, 0.6, n), 0.5, 40.0).astype(np.float32)
    anchors = np.random.default_rng(1).choice(n, 3000, replace=False)
    rows = []
    saved = sp.EXACT_MAX_ROWS
    try:
        for name, limit in (("exact (as before)", 1 << 62), ("windowed", 0)):
            sp.EXACT_MAX_ROWS = limit
            for seed in seeds:
                t0 = time.perf_counter()
                s = samplers.PackedDurationSampler(d, max_duration=600.0, seed=seed, world_size=8)
                st = s.stats()
                p0 = s.global_plan()
                t1 = time.perf_counter()
                secs = np.add.reduceat(d[p0.indices].astype(np.float64), p0.offsets[:-1])
                s.set_epoch(1)
                p1 = s.global_plan()
                rows.append({"plan": name, "seed": seed, "packs": st["num_batches"],
                             "cuts_per_pack": st["mean_batch_size"], "fill": st["fill_fraction"],
                             "p10_fill": float(np.percentile(secs, 10)) / 600.0, "max_pack_s": float(secs.max()),
                             "overlap": mates_overlap(pack_ids(p0, n), pack_ids(p1, n), anchors),
                             "chance": float(st["mean_batch_size"]) / n, "plan_s": t1 - t0})
    finally:
        sp.EXACT_MAX_ROWS = saved
    return rows


def scale(sizes: list[int], tmp: Path) -> list[dict]:
    """``bench_scale.py``'s packed cases, each in fresh processes (its counting pass kept under ``tmp``)."""
    env = {**os.environ, "DATAPIPE_PLAN_CACHE": str(tmp / "bench_packing_plan_cache")}
    out = []
    for n in sizes:
        got: dict = {}
        for flag in ("--case", "--resume-case"):
            cmd = [sys.executable, str(HERE / "bench_scale.py"), flag, "packed", str(n), "--tmp", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode:
                got["error"] = proc.stderr.strip().splitlines()[-1][:200]
                break
            got.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        out.append(got)
        print(json.dumps(got), flush=True)
        for f in [*tmp.glob(f"bench_scale_durations_{n}.npy"), *tmp.glob(f"bench_scale_state_packed_{n}.json")]:
            f.unlink()
    return out


def write(q: list[dict], s: list[dict], out: Path, cmd: str) -> None:
    lines = ["# PackedDurationSampler at scale (issue 15)", "",
             f"Command: `{cmd}`. 2 CPU cores shared with other jobs (times are upper bounds).", ""]
    if s:
        lines += ["`PackedDurationSampler(durations, max_duration=600.0, seed=1, rank=3, world_size=8)` over "
                  "memory-mapped float32 durations (log-normal, median ~6 s, clipped to [0.5, 40]); anonymous memory "
                  "growth of the process (RssAnon, polled every 20 ms); resume = `load_state_dict` of the state after "
                  "100 batches, then the 101st batch (checked equal); fresh = the same in a restarted process "
                  "(counting pass from the disk cache). The peak of the first process includes the second sampler it "
                  "builds to resume (two sets of tables); the fresh peak is one sampler's.", "",
                  "| cuts | construct (counting pass) s | first batch s | next 100 s | resume s | fresh resume s "
                  "| batches/rank | peak anon MiB | fresh peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in s:
            if "error" in r:
                lines.append(f"| {r.get('rows', '?')} | failed: {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {r['rows']:.0e} | {r['construct_s']:.1f} | {r['first_batch_s']:.1f} | "
                         f"{r['next_100_s']:.2f} | {r['resume_s']:.2f} | {r.get('fresh_total_s', float('nan')):.2f} | "
                         f"{r['batches_per_rank']} | {r['peak_anon_mib']:.0f} | "
                         f"{r.get('fresh_peak_anon_mib', float('nan')):.0f} |")
        lines.append("")
    if q:
        lines += ["Windowed vs exact plan over the same 1e6 durations (`max_duration=600`, `window_packs=64`, world "
                  "size 8). fill: seconds / (packs x 600 s); p10 fill: 10th percentile of a pack's fill; overlap: "
                  "share of a cut's epoch-0 pack-mates again its pack-mates in epoch 1 (chance: mean pack size / "
                  "cuts; pack-mates of both plans meet again ~40x more often than chance, alike); plan s: construction "
                  "and the materialised plan (the first row includes compiling the kernels).", "",
                  "| plan | seed | packs | cuts/pack | fill | p10 fill | longest pack s | overlap | chance | plan s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in q:
            lines.append(f"| {r['plan']} | {r['seed']} | {r['packs']} | {r['cuts_per_pack']:.1f} | {r['fill']:.4f} | "
                         f"{r['p10_fill']:.4f} | {r['max_pack_s']:.2f} | {r['overlap']:.5f} | {r['chance']:.5f} | "
                         f"{r['plan_s']:.1f} |")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="", help="comma-separated cut counts for the scale cases, e.g. 1e7,1e8,1e9")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_packing_scale.md"))
    args = ap.parse_args()
    sizes = [int(float(x)) for x in args.sizes.split(",") if x]
    s = scale(sizes, Path(args.tmp)) if sizes else []
    q = [] if args.no_quality else quality()
    for r in q:
        print(json.dumps(r), flush=True)
    write(q, s, Path(args.out), "python benchmarks/bench_packing_scale.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
