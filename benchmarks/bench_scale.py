"""bench_scale: plan memory and time of the samplers at 1e7, 1e8 and 1e9 rows (issue 15), batch quality of the
windowed token-budget and duration-bucket plans vs the exact ones, and the shard-local shuffle's shards per batch
and mixing.

Every size case runs in a fresh subprocess (``--case``) that measures its own anonymous memory (``RssAnon`` of
``/proc/self/status``, polled every 20 ms for the peak) and times construction, the first batch, and a resume:
a second sampler built the same way, then ``load_state_dict`` of the state after 100 batches and its first
batch (the 101st), checked equal to the uninterrupted run's. Metadata is a memory-mapped ``.npy`` of int32
lengths (log-normal, median ~400 tokens) or float32 durations written under ``--tmp`` and deleted at the end.
World size 8, rank 3, as in the issue's table.

    python benchmarks/bench_scale.py                       # 1e7 and 1e8 rows + quality (a few minutes)
    python benchmarks/bench_scale.py --sizes 1e7,1e8,1e9   # also 1e9 (writes 4 GB files under /tmp)
    python benchmarks/bench_scale.py --duration-section --sizes 1e7,1e8,1e9   # only DurationBucketSampler's section
    python benchmarks/bench_scale.py --decompose-section --sizes 1e7,1e8,1e9  # only the streaming decompose section
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
sys.path.insert(0, str(HERE))

from scale_common import Peak, anon_kb, case_row, fresh, metadata_file, replace_section  # noqa: E402
from scale_decompose import DECOMPOSE_HEADING, decompose_case, run_decompose_section  # noqa: E402
from scale_ngame import make_ngame  # noqa: E402
from scale_topic_pairs import make_topic_pairs  # noqa: E402
from scale_more import MORE_HEADING, MORE_KINDS, write_more_section  # noqa: E402
from scale_warmup import SHAPED_SHARES, warm_up  # noqa: E402

#: the issue's table (main before issue 15): (first batch s, peak) at 1e8, and 1e9
OLD = {
    "random": ("4 s / 1.2 GiB", "36 s, 10.4 GiB"),
    "token_budget": ("50 s / 6.9 GiB", "~60 GiB (MemoryError in lexsort at 3e8)"),
    "duration": ("48 s / 7.8 GiB", "~69 GiB"),
    "packed": ("27-47 s / 5-7 GiB", "48-61 GiB"),
    "topic": ("27-47 s / 5-7 GiB", "48-61 GiB"),
    "decomposed": ("24 s / 9.1 GiB", "~56 B/sequence (decompose_lengths: ~128 GiB)"),
}


#: bucket k = 8..13 of the synthetic decomposed index (``decomposed`` kind): short sequences most frequent
DECOMPOSED_P = (0.40, 0.24, 0.15, 0.10, 0.07, 0.04)


def decomposed_index(n: int, tmp: Path):
    """A decomposed index of ``n`` sequences for DecomposedBatchSampler: ``sequence_log2`` (int8, k = 8..13 drawn
    with ``DECOMPOSED_P``) as a memory-mapped ``.npy`` written in chunks under ``tmp`` (deleted with the others)."""
    from types import SimpleNamespace

    path = tmp / f"bench_scale_log2_{n}.npy"
    if not path.exists():
        part = path.with_suffix(".part.npy")
        mm = np.lib.format.open_memmap(part, mode="w+", dtype=np.int8, shape=(n,))
        rng = np.random.default_rng(0)
        cdf = np.cumsum(DECOMPOSED_P)
        for a in range(0, n, 1 << 24):
            k = min(n, a + (1 << 24)) - a
            mm[a:a + k] = 8 + np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right").astype(np.int8)
        mm.flush()
        del mm
        part.rename(path)
    return SimpleNamespace(sequence_log2=np.load(path, mmap_mode="r"), max_log2=13)


def cluster_ids_file(n: int, tmp: Path) -> Path:
    """Memory-mapped int32 cluster ids of ``n`` queries over 10,000 clusters (the ``topic`` kind), written in chunks."""
    path = tmp / f"bench_scale_clusters_{n}.npy"
    if not path.exists():
        part = path.with_suffix(".part.npy")
        mm = np.lib.format.open_memmap(part, mode="w+", dtype=np.int32, shape=(n,))
        rng = np.random.default_rng(0)
        for a in range(0, n, 1 << 24):
            mm[a:a + min(n, a + (1 << 24)) - a] = rng.integers(0, 10_000, min(n, a + (1 << 24)) - a, dtype=np.int32)
        mm.flush()
        del mm
        part.rename(path)
    return path




def shaped_lengths(n: int, tmp: Path) -> list:
    """Memory-mapped int32 lengths of the ``shaped`` kind's domains (``SHAPED_SHARES`` of ``n`` rows; log-normal as
    ``metadata_file``, another seed per domain), written in chunks under ``tmp`` (deleted with the others)."""
    out = []
    for d, share in enumerate(SHAPED_SHARES.values()):
        m, path = int(n * share), tmp / f"bench_scale_shaped{d}_{n}.npy"
        if not path.exists():
            part = path.with_suffix(".part.npy")
            mm = np.lib.format.open_memmap(part, mode="w+", dtype=np.int32, shape=(m,))
            rng = np.random.default_rng(10 + d)
            for a in range(0, m, 1 << 24):
                k = min(m, a + (1 << 24)) - a
                mm[a:a + k] = np.minimum(rng.lognormal(6.0 - 0.3 * d, 1.0, k), 8192).astype(np.int32) + 1
            mm.flush()
            del mm
            part.rename(path)
        out.append(np.load(path, mmap_mode="r"))
    return out


def make(kind: str, n: int, tmp: Path):
    import samplers

    kw = dict(seed=1, rank=3, world_size=8)
    if kind.startswith("ngame"):  # ngame (a random epoch, no bank), ngame_clustered (a rows-by-cluster file)
        return make_ngame(kind, n, tmp)
    if kind == "shaped":  # issue 15 item 1: from_lengths over 3 memory-mapped domains, a constant mixture
        from mixtures.schedules import Constant

        lengths = shaped_lengths(n, tmp)
        return lambda: samplers.ShapedMixtureBatchSampler.from_lengths(
            lengths, Constant(SHAPED_SHARES), max_tokens=2**20, total_steps=max(100, n // 20_000), **kw)
    if kind == "decomposed":
        index = decomposed_index(n, tmp)
        return lambda: samplers.DecomposedBatchSampler(index, tokens_per_batch=2**17, **kw)
    if kind == "random":
        return lambda: samplers.RandomBatchSampler(n, 1024, **kw)
    if kind == "token_budget":
        lengths = np.load(metadata_file("lengths", n, tmp), mmap_mode="r")
        return lambda: samplers.TokenBudgetBatchSampler(lengths, max_tokens=2**20, **kw)
    if kind == "topic_pairs":  # TopicAware WITH a memory-mapped pair table (scale_topic_pairs.py)
        return make_topic_pairs(n, tmp, cluster_ids_file(n, tmp), kw)
    if kind == "topic":
        ids = np.load(cluster_ids_file(n, tmp), mmap_mode="r")
        return lambda: samplers.TopicAwareBatchSampler(ids, batch_size=1024, **kw)
    durations = np.load(metadata_file("durations", n, tmp), mmap_mode="r")
    if kind == "packed":
        return lambda: samplers.PackedDurationSampler(durations, max_duration=600.0, **kw)
    if kind == "duration2d":  # 2D buckets: int32 output tokens beside the durations (bench_duration2d_scale.py)
        from bench_duration2d_scale import output_lengths_file

        tokens = np.load(output_lengths_file(n, tmp), mmap_mode="r")
        return lambda: samplers.DurationBucketSampler(durations, max_duration=600.0, num_buckets=30,
                                                      output_lengths=tokens, **kw)
    return lambda: samplers.DurationBucketSampler(durations, max_duration=600.0, num_buckets=30, **kw)


def run_case(kind: str, n: int, tmp: Path) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    build = make(kind, n, tmp)  # writes the metadata file when missing (not timed)
    warm_up(kind)
    base = anon_kb()
    peak = Peak()
    t0, c0 = time.perf_counter(), time.process_time()
    s = build()
    t1, c1 = time.perf_counter(), time.process_time()
    it = iter(s)
    first = next(it)
    t2 = time.perf_counter()
    for _ in range(99):
        next(it)
    state = s.state_dict()
    want = next(it)
    t3 = time.perf_counter()
    with open(tmp / f"bench_scale_state_{kind}_{n}.json", "w") as f:  # for the fresh-process resume (resume_case)
        json.dump({"state": state, "want": np.asarray(want).tolist()}, f)
    s2 = build()
    t4 = time.perf_counter()
    s2.load_state_dict(state)
    got = next(iter(s2))
    t5 = time.perf_counter()
    assert np.array_equal(got, want), "resumed batch differs"
    top = peak.done()
    return {"kind": kind, "rows": n, "construct_s": t1 - t0, "construct_cpu_s": c1 - c0, "first_batch_s": t2 - t0,
            "first_alone_s": t2 - t1,
            "next_100_s": t3 - t2, "construct2_s": t4 - t3, "resume_s": t5 - t4, "batches_per_rank": len(s),
            "first_rows": len(first), "peak_anon_mib": (top - base) / 1024, "end_anon_mib": (anon_kb() - base) / 1024}


def resume_case(kind: str, n: int, tmp: Path) -> dict:
    """A restarted job: in a fresh process, build the sampler, ``load_state_dict`` the state run_case saved after
    100 batches, take the 101st batch (checked equal). The counting pass comes from the disk cache the first
    process wrote (``samplers.plan_cache``); the kernels' machine code from numba's cache (counted)."""
    import warnings

    warnings.simplefilter("ignore")
    saved = json.load(open(tmp / f"bench_scale_state_{kind}_{n}.json"))
    build = make(kind, n, tmp)
    base = anon_kb()
    peak = Peak()
    t0 = time.perf_counter()
    s = build()
    t1 = time.perf_counter()
    s.load_state_dict(saved["state"])
    got = next(iter(s))
    t2 = time.perf_counter()
    assert np.asarray(got).tolist() == saved["want"], "fresh-process resume gave another batch"
    return {"fresh_construct_s": t1 - t0, "fresh_resume_s": t2 - t1, "fresh_total_s": t2 - t0,
            "fresh_peak_anon_mib": (peak.done() - base) / 1024}


# ---- quality: windowed vs exact token-budget plans, shard-local vs global shuffles (1e6 rows) -----------------
def mates_overlap(bid0: np.ndarray, bid1: np.ndarray, anchors: np.ndarray) -> float:
    """Mean share of an anchor row's epoch-0 batch-mates that are again its batch-mates in epoch 1."""
    order0 = np.argsort(bid0, kind="stable")
    starts = np.searchsorted(bid0[order0], np.arange(bid0.max() + 2))
    out = []
    for a in anchors:
        if bid0[a] < 0:
            continue
        mates = order0[starts[bid0[a]]:starts[bid0[a] + 1]]
        mates = mates[mates != a]
        if len(mates):
            out.append(float(np.mean(bid1[mates] == bid1[a])))
    return float(np.mean(out))


def batch_ids(plan, n: int) -> np.ndarray:
    bid = np.full(n, -1, dtype=np.int64)
    bid[plan.indices] = np.repeat(np.arange(plan.num_batches), plan.sizes)
    return bid


def quality_token_budget(n: int = 10**6, max_tokens: int = 2**16) -> list[dict]:
    import samplers
    import samplers.token_budget as tb

    lengths = np.minimum(np.random.default_rng(0).lognormal(6.0, 1.0, n), 8192).astype(np.int32) + 1
    anchors = np.random.default_rng(1).choice(n, 3000, replace=False)
    rows = []
    saved = tb.EXACT_MAX_ROWS
    try:
        for name, limit in (("exact (<= 0.2 plan)", 1 << 62), ("windowed", 0)):
            tb.EXACT_MAX_ROWS = limit
            for seed in (1, 2):
                s = samplers.TokenBudgetBatchSampler(lengths, max_tokens=max_tokens, seed=seed)
                st0 = s.stats()
                b0 = batch_ids(s.global_plan(), n)
                s.set_epoch(1)
                b1 = batch_ids(s.global_plan(), n)
                # rows of one 16-row block: how often two of them share a batch (the windowed plan's weak spot)
                same_block = float(np.mean(b0[anchors] == b0[anchors ^ 1]))
                rows.append({"plan": name, "seed": seed, "batches": st0["num_batches"],
                             "mean_rows": st0["mean_batch_size"], "padding": st0["padding_fraction"],
                             "overlap": mates_overlap(b0, b1, anchors), "same_block": same_block,
                             "expected": float(np.mean(st0["mean_batch_size"])) / n})
    finally:
        tb.EXACT_MAX_ROWS = saved
    return rows


def quality_duration(n: int = 10**6) -> list[dict]:
    """Windowed vs exact DurationBucketSampler plans over the same 1e6 durations: padding, batch sizes, buckets."""
    import samplers
    import samplers.duration as sd

    d = np.clip(np.random.default_rng(0).lognormal(1.8, 0.6, n), 0.5, 40.0).astype(np.float32)
    anchors = np.random.default_rng(1).choice(n, 3000, replace=False)
    rows = []
    saved = sd.EXACT_MAX_ROWS
    try:
        for name, limit in (("exact (<= 0.2 plan)", 1 << 62), ("windowed", 0)):
            sd.EXACT_MAX_ROWS = limit
            for seed in (1, 2):
                s = samplers.DurationBucketSampler(d, max_duration=600.0, num_buckets=30, seed=seed, world_size=8)
                st0 = s.stats()
                p0 = s.global_plan()
                sizes = p0.sizes
                b0 = batch_ids(p0, n)
                s.set_epoch(1)
                b1 = batch_ids(s.global_plan(), n)
                rows.append({"plan": name, "seed": seed, "batches": st0["num_batches"],
                             "mean_rows": st0["mean_batch_size"], "p10": float(np.percentile(sizes, 10)),
                             "p50": float(np.percentile(sizes, 50)), "p90": float(np.percentile(sizes, 90)),
                             "min": int(sizes.min()), "max": int(sizes.max()),
                             "padding": st0["padding_fraction"], "overlap": mates_overlap(b0, b1, anchors),
                             "expected": float(st0["mean_batch_size"]) / n})
    finally:
        sd.EXACT_MAX_ROWS = saved
    return rows


def quality_shard_local(n: int = 10**6, shard_rows: int = 1000, bs: int = 1024) -> list[dict]:
    import samplers

    off = np.arange(0, n + 1, shard_rows, dtype=np.int64)
    anchors = np.random.default_rng(1).choice(n, 3000, replace=False)
    out = []
    for name, kw in (("global", {}), ("shard_local, window 4", dict(shuffle="shard_local", shard_offsets=off,
                                                                     shard_window=4)),
                     ("shard_local, window 16", dict(shuffle="shard_local", shard_offsets=off, shard_window=16)),
                     ("shard_local, window 64", dict(shuffle="shard_local", shard_offsets=off, shard_window=64))):
        s = samplers.RandomBatchSampler(n, bs, seed=1, **kw)
        p0 = s.global_plan()
        touched = np.array([len(np.unique(p0.indices[a:b] // shard_rows))
                            for a, b in zip(p0.offsets[:-1], p0.offsets[1:])])
        s.set_epoch(1)
        b0, b1 = batch_ids(p0, n), batch_ids(s.global_plan(), n)
        same_shard = float(np.mean([np.mean(p0.indices[a:b] // shard_rows == p0.indices[a] // shard_rows)
                                    for a, b in zip(p0.offsets[:-1:50], p0.offsets[1::50])]))
        out.append({"shuffle": name, "touched_mean": float(touched.mean()), "touched_max": int(touched.max()),
                    "same_shard": same_shard, "overlap": mates_overlap(b0, b1, anchors)})
    return out


# ---- driver -----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e7,1e8")
    ap.add_argument("--kinds", default="random,token_budget,duration,packed,decomposed,topic")
    ap.add_argument("--duration-max", type=float, default=1e9, help="largest size run for DurationBucketSampler")
    ap.add_argument("--duration-section", action="store_true", help="run only DurationBucketSampler (the sizes "
                    "given, and its windowed-vs-exact quality at 1e6 rows) and replace only its section of --out")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--case", nargs=2, metavar=("KIND", "ROWS"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare-case", nargs=2, metavar=("KIND", "ROWS"), help=argparse.SUPPRESS)
    ap.add_argument("--resume-case", nargs=2, metavar=("KIND", "ROWS"), help=argparse.SUPPRESS)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_scale.md"))
    ap.add_argument("--decompose-section", action="store_true", help="run only the streaming decompose of the "
                    "sizes' lengths (and the in-memory path up to 1e8) and replace only its section of --out")
    ap.add_argument("--decompose-case", nargs=2, metavar=("MODE", "ROWS"), help=argparse.SUPPRESS)
    ap.add_argument("--more-section", action="store_true", help="run only the samplers of MORE_KINDS (the sizes "
                    "given) and replace only their section of --out")
    args = ap.parse_args()
    tmp = Path(args.tmp)
    if args.decompose_case:
        print(json.dumps(decompose_case(args.decompose_case[0], int(float(args.decompose_case[1])), tmp)))
        return
    if args.decompose_section:
        run_decompose_section(args)
        return
    if args.prepare_case:  # writes a case's input files in a process of its own: the case's memory baseline is clean
        make(args.prepare_case[0], int(float(args.prepare_case[1])), tmp)
        return
    if args.case:
        print(json.dumps(run_case(args.case[0], int(float(args.case[1])), tmp)))
        return
    if args.resume_case:
        print(json.dumps(resume_case(args.resume_case[0], int(float(args.resume_case[1])), tmp)))
        return
    # the counting passes the cases write for their fresh-process resumes: a directory of this run's own
    os.environ["DATAPIPE_PLAN_CACHE"] = str(tmp / "bench_scale_plan_cache")
    if args.duration_section:
        args.kinds = "duration"
    if args.more_section:
        args.kinds = ",".join(MORE_KINDS)
    results = []
    made = set()
    for n in (int(float(x)) for x in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            if kind == "duration" and n > args.duration_max:
                continue
            made.add((kind, n))
            subprocess.run([sys.executable, __file__, "--prepare-case", kind, str(n), "--tmp", str(tmp)], cwd=ROOT,
                           capture_output=True)  # its errors show in the case's own run
            cmd = [sys.executable, __file__, "--case", kind, str(n), "--tmp", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                results.append({"kind": kind, "rows": n, "error": proc.stderr.strip().splitlines()[-1][:200]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                cmd = [sys.executable, __file__, "--resume-case", kind, str(n), "--tmp", str(tmp)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    results[-1]["fresh_error"] = proc.stderr.strip().splitlines()[-1][:200]
                else:
                    results[-1].update(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        for f in [*tmp.glob(f"bench_scale_*_{n}.npy"), *tmp.glob(f"bench_scale_state_*_{n}.json"),
                  *tmp.glob(f"bench_scale_ngame_*_{n}.*")]:
            f.unlink()  # one size's files at a time (1e9: 4 GB each)
    import shutil

    shutil.rmtree(tmp / "bench_scale_plan_cache", ignore_errors=True)
    if args.duration_section:
        write_duration_section(results, None if args.no_quality else quality_duration(), args)
        return
    if args.more_section:
        write_more_section(results, args)
        return
    quality = None if args.no_quality else (quality_token_budget(), quality_shard_local())
    write(results, quality, args)


DURATION_HEADING = "## DurationBucketSampler at scale"
def write_duration_section(results: list[dict], quality, args) -> None:
    """Replace (or insert before '## Reading') the DurationBucketSampler section of ``--out``, leaving the rest."""
    load = os.getloadavg()[0]
    lines = [DURATION_HEADING, "",
             f"Command: `.venv/bin/python benchmarks/bench_scale.py --duration-section --sizes {args.sizes}` (run "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, shared 2-core machine, load average {load:.0f} "
             "at the end). `DurationBucketSampler(durations, max_duration=600.0, num_buckets=30, seed=1, rank=3, "
             "world_size=8)` over memory-mapped float32 durations (log-normal, median ~6 s, clipped to [0.5, 40]); "
             "columns as in the first table.", "",
             "| rows | construct (s) [CPU s] | first batch (s) | resume to batch 101 (s) | 2nd construct (s) | "
             "fresh process: construct / resume (s) | peak anon (MiB) | batches/rank |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['rows']:.0e} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['rows']:.0e} | {r['construct_s']:.2f} [{r['construct_cpu_s']:.1f}] | "
                     f"{r['first_batch_s']:.2f} | {r['resume_s']:.3f} | {r['construct2_s']:.2f} | {fresh(r)} | "
                     f"{r['peak_anon_mib']:.0f} | {r['batches_per_rank']} |")
    if quality:
        lines += ["", "Windowed vs exact plan over the same 1e6 durations (world size 8; batch sizes are rows per "
                  "batch of the global plan; *overlap* as in the token-budget table):", "",
                  "| plan | seed | batches | rows/batch | p10 / p50 / p90 | min / max | padding | overlap | "
                  "1/N x rows per batch |", "|---|---|---|---|---|---|---|---|---|"]
        for q in quality:
            lines.append(f"| {q['plan']} | {q['seed']} | {q['batches']} | {q['mean_rows']:.2f} | {q['p10']:.0f} / "
                         f"{q['p50']:.0f} / {q['p90']:.0f} | {q['min']} / {q['max']} | {q['padding']:.4f} | "
                         f"{q['overlap']:.5f} | {q['expected']:.6f} |")
    replace_section(Path(args.out), DURATION_HEADING, lines, before="## Reading")
    print(f"wrote {args.out}")


def write(results: list[dict], quality, args) -> None:
    load = os.getloadavg()[0]
    lines = ["# bench_scale: sampler plans at 1e7-1e9 rows (issue 15)", "",
             f"Command: `.venv/bin/python benchmarks/bench_scale.py --sizes {args.sizes}` (run "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2-core machine shared with other jobs, load "
             f"average {load:.0f} at the end: wall times are inflated and noisy, memory is not). world_size 8, rank 3; "
             "metadata: memory-mapped int32 lengths / float32 durations; each case in a fresh process.", "",
             "*first batch* counts construction; *resume* is `load_state_dict(state after 100 batches)` + the first "
             "batch of a second, freshly built sampler (its construction is listed apart); *fresh process* is a "
             "restarted job: a new interpreter builds the sampler (construct) then loads the state and takes batch 101 "
             "(resume), the counting pass read from the disk cache the first process wrote (`samplers.plan_cache`); "
             "*anon* is the growth of "
             "`RssAnon` (peak while the case ran), i.e. memory the plan holds, not the page cache of the memory map.",
             "*next 100* is batches 2-101 of the first sampler (the planning a rank does while it trains).",
             "", "| sampler | rows | construct (s) [CPU s] | first batch (s) | next 100 (s) | resume to batch 101 (s) | "
             "2nd construct (s) | fresh process: construct / resume (s) | peak anon (MiB) | batches/rank | "
             "before issue 15 (issue's table) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        old = OLD.get(r["kind"], ("", ""))
        before = old[0] if r["rows"] == 10**8 else old[1] if r["rows"] == 10**9 else ""
        lines.append(case_row(r, before))
    if quality:
        tbq, shq = quality
        lines += ["", "## Windowed token-budget plan vs the exact plan (1e6 rows, max_tokens 2**16, sort_window "
                  "1024)", "",
                  "*overlap*: mean share of a row's epoch-0 batch-mates that are its batch-mates again in epoch 1 "
                  "(3000 anchor rows); *same block*: share of anchors sharing a batch with the next row (same "
                  "16-row block of the windowed plan's block permutation); *1/N x rows per batch* is what a uniform "
                  "random batching gives for both.", "",
                  "| plan | seed | batches | rows/batch | padding | overlap | same block | 1/N x rows per batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for q in tbq:
            lines.append(f"| {q['plan']} | {q['seed']} | {q['batches']} | {q['mean_rows']:.1f} | {q['padding']:.4f} "
                         f"| {q['overlap']:.5f} | {q['same_block']:.4f} | {q['expected']:.6f} |")
        lines += ["", "## Shard-local shuffle (1e6 rows in 1000 shards of 1000 rows, batch 1024)", "",
                  "| shuffle | shards per batch (mean) | max | batch-mates from the first row's shard | overlap "
                  "across epochs |", "|---|---|---|---|---|"]
        for q in shq:
            lines.append(f"| {q['shuffle']} | {q['touched_mean']:.1f} | {q['touched_max']} | {q['same_shard']:.4f} | "
                         f"{q['overlap']:.5f} |")
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    for heading in (DURATION_HEADING, MORE_HEADING, DECOMPOSE_HEADING):  # sections other runs wrote stay
        start = old.find(heading)
        if start >= 0:
            nxt = old.find("\n## ", start + len(heading))
            lines += ["", old[start : nxt if nxt >= 0 else len(old)].rstrip("\n")]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
