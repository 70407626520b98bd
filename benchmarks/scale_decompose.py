"""The streaming-decompose section of ``bench_scale.py`` (``--decompose-section``): ``datapipe.decompose``'s engine
on 1e7-1e9 documents' lengths, in memory per block, beside the in-memory path it replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scale_common import Peak, anon_kb, metadata_file, replace_section

HERE = Path(__file__).parent
ROOT = HERE.parent
BENCH = HERE / "bench_scale.py"


DECOMPOSE_HEADING = "## Streaming decompose at scale"
DECOMPOSE_KW = {"min_log2": 8, "max_log2": 13, "remainder": "pack", "seed": 0}


def decompose_case(mode: str, n: int, tmp: Path) -> dict:
    """One decomposition of ``n`` memory-mapped lengths in this (fresh) process: ``stream`` (plan_stream +
    write_stream into a temp dir, deleted after), ``stream-nowrite`` (the same two passes, each block's outputs
    computed and dropped) or ``memory`` (``decompose_lengths`` + pyarrow's writer, the path before streaming)."""
    import shutil

    import pyarrow as pa

    from datapipe.decomposition_stream import iter_blocks, plan_stream, write_stream
    from datapipe.format import file_checksum
    from native.decompose import decompose_lengths

    lengths = np.load(metadata_file("lengths", n, tmp), mmap_mode="r")
    out = tmp / f"bench_scale_decompose_out_{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    warm = out / "warm"
    warm.mkdir()
    write_stream(lengths[:5000], warm, plan_stream(lengths[:5000], **DECOMPOSE_KW))  # kernels loaded, not timed
    decompose_lengths(lengths[:5000], **DECOMPOSE_KW)
    shutil.rmtree(warm)
    base = anon_kb()
    peak = Peak()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        if mode == "memory":
            arrays = decompose_lengths(lengths, **DECOMPOSE_KW)
            t1 = time.perf_counter()
            tables = {"pieces": {k: arrays[k] for k in ("row", "start", "length", "sequence")},
                      "sequences": {"log2": arrays["sequence_log2"], "tokens": arrays["sequence_tokens"],
                                    "first_piece": arrays["sequence_offsets"][:-1]}}
            nbytes = 0
            for name, cols in tables.items():
                table = pa.table({k: pa.array(v) for k, v in cols.items()})
                with pa.OSFile(str(out / f"{name}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                    w.write_table(table, max_chunksize=max(1, table.num_rows))
                file_checksum(out / f"{name}.arrow")
                nbytes += (out / f"{name}.arrow").stat().st_size
            pieces, seqs = len(arrays["row"]), len(arrays["sequence_log2"])
        else:
            plan = plan_stream(lengths, **DECOMPOSE_KW)
            t1 = time.perf_counter()
            pieces, seqs = plan.num_pieces, plan.num_sequences
            if mode == "stream":
                res = write_stream(lengths, out, plan)
                nbytes = sum(f["bytes"] for f in res["files"].values())
            else:
                nbytes = 0  # what the two tables' columns would hold
                for blk in iter_blocks(lengths, plan):
                    nbytes += sum(v.nbytes for _, cols in blk.pieces + blk.sequences for v in cols.values())
                    del blk  # one block held at a time, as write_stream does
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"mode": mode, "rows": n, "wall_s": wall, "first_pass_s": t1 - t0, "cpu_s": cpu,
                "peak_anon_mib": (peak.done() - base) / 1024, "bytes": nbytes, "pieces": pieces, "sequences": seqs}
    finally:
        peak.stop = True
        shutil.rmtree(out, ignore_errors=True)


def run_decompose_section(args) -> None:
    """Each (mode, size) of the decompose section in a fresh process; replaces only that section of ``--out``."""
    import shutil

    tmp = Path(args.tmp)
    results = []
    for n in (int(float(x)) for x in args.sizes.split(",")):
        made = not (tmp / f"bench_scale_lengths_{n}.npy").exists()  # delete only what this run writes
        metadata_file("lengths", n, tmp)
        fits = n * 110 * 1.2 < shutil.disk_usage(tmp).free  # the files: ~110 bytes per document
        modes = (["stream"] if fits else []) + (["stream-nowrite"] if not fits or n <= 10**8 else []) + (
            ["memory"] if n <= 10**8 else [])  # in memory: ~120 bytes per document of RAM
        for mode in modes:
            cmd = [sys.executable, str(BENCH), "--decompose-case", mode, str(n), "--tmp", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                results.append({"mode": mode, "rows": n, "error": proc.stderr.strip().splitlines()[-1][:200]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        if made:
            (tmp / f"bench_scale_lengths_{n}.npy").unlink(missing_ok=True)
    write_decompose_section(results, args)


def write_decompose_section(results: list[dict], args) -> None:
    """Replace (or append at the end) the streaming-decompose section of ``--out``, leaving the rest."""
    load = os.getloadavg()[0]
    what = {"stream": "streaming, files written", "stream-nowrite": "streaming, outputs dropped",
            "memory": "in memory (`decompose_lengths`) + write"}
    lines = [DECOMPOSE_HEADING, "",
             f"Command: `.venv/bin/python benchmarks/bench_scale.py --decompose-section --sizes {args.sizes}` (run "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, shared 2-core machine, load average {load:.0f} "
             "at the end). Memory-mapped int32 lengths (log-normal, as above), "
             f"`{', '.join(f'{k}={v!r}' for k, v in DECOMPOSE_KW.items())}`, each run in a fresh process: "
             "*streaming* is `datapipe.decomposition_stream.plan_stream` + `write_stream` (what `datapipe.decompose` "
             "runs, blocks of 2^20 rows) writing `pieces.arrow` / `sequences.arrow` into a temp dir under `--tmp`; "
             "*outputs dropped* runs the same two passes (`iter_blocks`) without the files (used where the files do "
             "not fit on the disk: ~110 bytes per document); *in memory* is `native.decompose.decompose_lengths` + "
             "pyarrow's writer + the checksum, the path `decompose` took before. *1st pass* is the scan (in "
             "memory: `decompose_lengths`, before the write); *peak anon* the growth of `RssAnon` while it ran; "
             "*bytes* the two tables (files, or the columns of the dropped outputs).", "",
             "| rows | engine | wall (s) | 1st pass or decompose_lengths (s) | CPU (s) | peak anon (MiB) | "
             "bytes (GB) | pieces | sequences |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['rows']:.0e} | {what[r['mode']]} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['rows']:.0e} | {what[r['mode']]} | {r['wall_s']:.1f} | {r['first_pass_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['peak_anon_mib']:.0f} | {r['bytes'] / 1e9:.2f} | {r['pieces']:,} | "
                     f"{r['sequences']:,} |")
    replace_section(Path(args.out), DECOMPOSE_HEADING, lines)
    print(f"wrote {args.out}")
