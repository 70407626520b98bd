"""bench_scale's ``--more-section``: the samplers made bounded last (NGAME, TopicAware with pairs, 2D duration
buckets, shaped mixtures) at 1e9 rows, written as their own section of ``results/bench_scale.md``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scale_common import case_row, replace_section

MORE_HEADING = "## NGAME, TopicAware with pairs, 2D duration buckets and shaped mixtures at scale"
#: the kinds of MORE_HEADING: what each builds
MORE_KINDS = {
    "ngame": "`NGAMEBatchSampler(n, batch_size=1024)`: a random epoch (before the first clustering; no bank)",
    "ngame_clustered": "`NGAMEBatchSampler` in a clustered epoch (clusters of 16) from a rows-by-cluster file the "
                       "benchmark writes and loads with `load_clusters` (a real 1e9 x d bank does not fit the disk)",
    "topic_pairs": "`TopicAwareBatchSampler(ids, batch_size=1024, pairs=PairTable(...))`: 10,000 clusters, a "
                   "memory-mapped pair table (`scale_topic_pairs.py`; pairs per query from "
                   "`$DATAPIPE_BENCH_PAIRS_PER_QUERY`; denser tables at 1e8-3e8 queries are in `bench_tas_scale.md`)",
    "duration2d": "`DurationBucketSampler(durations, max_duration=600.0, num_buckets=30, output_lengths=tokens)`: "
                  "2D buckets over memory-mapped float32 durations and int32 output tokens",
    "shaped": "`ShapedMixtureBatchSampler.from_lengths(...)`: three memory-mapped int32 length files (0.4 / 0.4 / 0.2 "
              "of the rows), a constant mixture, `max_tokens=2**20`",
}


def pairs_env() -> str:
    v = os.environ.get("DATAPIPE_BENCH_PAIRS_PER_QUERY")
    return f"DATAPIPE_BENCH_PAIRS_PER_QUERY={v} " if v else ""


def write_more_section(results: list[dict], args) -> None:
    """Replace (or insert before '## Reading') the section of the MORE_KINDS samplers in ``--out``."""
    load = os.getloadavg()[0]
    lines = [MORE_HEADING, "",
             f"Command: `{pairs_env()}.venv/bin/python benchmarks/bench_scale.py --more-section --sizes {args.sizes}` (run "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, shared 2-core machine, load average {load:.0f} "
             "at the end); world_size 8, rank 3; columns as in the first table.", ""]
    lines += [f"- `{k}`: {v}" for k, v in MORE_KINDS.items()]
    lines += ["", "| sampler | rows | construct (s) [CPU s] | first batch (s) | next 100 (s) | resume to batch 101 (s) | "
              "2nd construct (s) | fresh process: construct / resume (s) | peak anon (MiB) | batches/rank |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [case_row(r) for r in results]
    replace_section(Path(args.out), MORE_HEADING, lines, before="## Reading")
    print(f"wrote {args.out}")
