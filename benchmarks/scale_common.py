"""Helpers shared by ``bench_scale.py`` and its decompose section: anonymous-memory polling, the memory-mapped
metadata files, and replacing one section of a results file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["Peak", "anon_kb", "fresh", "metadata_file", "replace_section"]


def anon_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class Peak:
    """Polls RssAnon in a thread: the peak anonymous memory while a case runs."""

    def __init__(self) -> None:
        self.peak = anon_kb()
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, anon_kb())
            time.sleep(0.02)

    def done(self) -> int:
        self.stop = True
        self.t.join()
        return max(self.peak, anon_kb())


def metadata_file(kind: str, n: int, tmp: Path) -> Path:
    path = tmp / f"bench_scale_{kind}_{n}.npy"
    if path.exists():
        return path
    dtype = np.int32 if kind == "lengths" else np.float32
    part = path.with_suffix(".part.npy")
    mm = np.lib.format.open_memmap(part, mode="w+", dtype=dtype, shape=(n,))
    rng = np.random.default_rng(0)
    step = 1 << 24
    for a in range(0, n, step):
        k = min(n, a + step) - a
        if kind == "lengths":
            mm[a:a + k] = np.minimum(rng.lognormal(6.0, 1.0, k), 8192).astype(np.int32) + 1
        else:
            mm[a:a + k] = np.clip(rng.lognormal(1.8, 0.6, k), 0.5, 40.0).astype(np.float32)
    mm.flush()
    del mm
    part.rename(path)
    return path


def replace_section(out: Path, heading: str, lines: list[str], before: str | None = None) -> None:
    """Write ``lines`` (a section starting with ``heading``) into ``out`` in place of the old section (up to the next
    heading), else before the heading ``before`` when present, else at the end."""
    text = out.read_text() if out.exists() else ""
    start = text.find(heading)
    if start >= 0:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + text[nxt + 1:] if nxt >= 0 else text[:start]
    section = "\n".join(lines) + "\n\n"
    at = text.find(before) if before else -1
    text = text[:at] + section + text[at:] if at >= 0 else text.rstrip("\n") + "\n\n" + section
    out.write_text(text.rstrip("\n") + "\n")


def fresh(r: dict) -> str:
    if "fresh_error" in r:
        return f"failed: {r['fresh_error']}"
    return f"{r['fresh_construct_s']:.2f} / {r['fresh_resume_s']:.3f}" if "fresh_construct_s" in r else ""


def case_row(r: dict, *tail: str) -> str:
    """One case's row of the scale tables (construct [CPU], first batch, next 100, resume, 2nd construct, fresh
    process, peak anon, batches/rank), then the ``tail`` columns; a failed case names its error."""
    if "error" in r:
        failed = f"| {r['kind']} | {r['rows']:.0e} | failed: {r['error']} | | | | | | | |"
        return failed + "".join(f" {t} |" for t in tail)
    cpu = f" [{r['construct_cpu_s']:.1f}]" if "construct_cpu_s" in r else ""
    cells = [r["kind"], f"{r['rows']:.0e}", f"{r['construct_s']:.2f}{cpu}", f"{r['first_batch_s']:.2f}",
             f"{r['next_100_s']:.3f}", f"{r['resume_s']:.3f}", f"{r['construct2_s']:.2f}", fresh(r),
             f"{r['peak_anon_mib']:.0f}", str(r["batches_per_rank"]), *tail]
    return "| " + " | ".join(cells) + " |"
