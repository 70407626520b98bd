"""Benchmark: immiscible noise assignment (Li et al. 2024; Improved Immiscible Diffusion, 2025).

Side by side in one run, per batch size B and flattened image size D: plain ``torch.randn`` (the floor),
linear assignment (scipy ``linear_sum_assignment`` on fp32 L2 costs, the 2024 paper), brute-force KNN
(k candidates per image, the 2025 paper) and the exact k-independent KNN sampler, each timed (median of
repeats) with its mean distance reduction: ``1 - mean|x - noise| / mean|x - randn|``.

Images: scikit-learn's 8x8 digits upsampled (bilinear) to 3x32x32 (D = 3072, CIFAR-sized pixels) and
4x64x64 (D = 16384, a latent-sized tensor), scaled to [-1, 1].

Run: ``.venv/bin/python benchmarks/bench_immiscible.py [--quick] [--threads 1] [--write PATH]``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# On a shared, oversubscribed machine, OpenMP threads that spin after each parallel region steal the core
# from the main thread: with 2 threads every op then costs ~10 ms extra (measured here). Sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datapipe.immiscible import assign_linear, knn_noise, knn_noise_exact  # noqa: E402

K_SET = (4, 16, 64)
K_MATCH = (256, 1024, 4096)  # extra k for the exact sampler, to find the k matching LA


def images(B: int, D: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images.astype(np.float32)) / 8.0 - 1.0  # [1797, 8, 8] in [-1, 1]
    c, side = {3072: (3, 32), 16384: (4, 64)}[D]
    idx = torch.from_numpy(np.random.default_rng(seed).choice(len(digits), size=B, replace=B > len(digits)))
    up = torch.nn.functional.interpolate(digits[idx, None], size=(side, side), mode="bilinear", align_corners=False)
    gains = torch.linspace(0.8, 1.0, c)[None, :, None, None]  # channels differ a little, as in RGB
    return (up * gains).contiguous()


def mean_dist(x: torch.Tensor, n: torch.Tensor) -> float:
    return float((x.flatten(1).double() - n.flatten(1).double()).norm(dim=1).mean())


def measure(x: torch.Tensor, fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median time and mean distance (over repeats, each a fresh draw) per method, methods interleaved.

    Interleaving spreads the load of the shared machine evenly over the methods being compared.
    """
    times: dict[str, list[float]] = {m: [] for m in fns}
    dists: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t0)
            dists[name].append(mean_dist(x, n))
    return {m: (statistics.median(times[m]), statistics.fmean(dists[m])) for m in fns}


def run(bs: list[int], ds: list[int], ks: tuple[int, ...], repeats: int, brute_max: float) -> list[dict]:
    rows = []
    for D in ds:
        for B in bs:
            x = images(B, D, seed=B + D)
            g = torch.Generator().manual_seed(0)
            fns = {"randn": lambda: torch.randn(x.shape, generator=g), "LA": lambda: assign_linear(x, generator=g)}
            fns |= {f"exact k={k}": (lambda k=k: knn_noise_exact(x, k, generator=g)) for k in ks + K_MATCH}
            res = measure(x, fns, repeats)
            # brute force is O(B k D): fewer repeats for the big ones, none beyond brute_max draws
            for k in ks:
                if B * k * D <= brute_max:
                    r = min(repeats, 3) if B * k * D < 2e8 else 1
                    res |= measure(x, {f"knn k={k}": lambda k=k: knn_noise(x, k, generator=g)}, r)
            base = res["randn"][1]
            for name, (t, d) in res.items():
                rows.append({"D": D, "B": B, "method": name, "time_s": t, "x_randn": t / res["randn"][0],
                             "mean_dist": d, "reduction": 1.0 - d / base})
            print(f"  done D={D} B={B}", file=sys.stderr, flush=True)
    return rows


def tables(rows: list[dict], ks: tuple[int, ...]) -> str:
    methods = ["randn", "LA"] + [f"knn k={k}" for k in ks] + [f"exact k={k}" for k in ks + K_MATCH]
    keys = sorted({(r["D"], r["B"]) for r in rows})
    by = {(r["D"], r["B"], r["method"]): r for r in rows}
    out = []
    for title, fmt in [("Time, ms (median of repeats; x randn in brackets)",
                        lambda r: f"{r['time_s'] * 1e3:.1f} ({r['x_randn']:.1f}x)"),
                       ("Mean distance reduction vs plain randn, %", lambda r: f"{100 * r['reduction']:.2f}")]:
        out.append(f"\n**{title}**\n")
        out.append("| D | B | " + " | ".join(methods) + " |")
        out.append("|---|---|" + "---|" * len(methods))
        for D, B in keys:
            cells = [fmt(by[(D, B, m)]) if (D, B, m) in by else "-" for m in methods]
            out.append(f"| {D} | {B} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def goals(rows: list[dict], ks: tuple[int, ...]) -> str:
    by = {(r["D"], r["B"], r["method"]): r for r in rows}
    out = ["\n**Goals**\n"]
    for label, kset in ((f"k in {ks}", ks), (f"extra k in {K_MATCH}, O(B k) scalars (information)", K_MATCH)):
        names = {f"exact k={k}" for k in kset}
        worst = max((r for r in rows if r["method"] in names), key=lambda r: r["x_randn"])
        verdict = ("MET" if worst["x_randn"] <= 3 else "NOT MET") if kset == ks else "-"
        out.append(f"- exact KNN cost vs one randn(B, D), {label}: worst {worst['x_randn']:.2f}x "
                   f"(D={worst['D']}, B={worst['B']}, {worst['method']}); goal <= 3x: {verdict}")
    for D in sorted({r["D"] for r in rows}):
        B = max(r["B"] for r in rows if r["D"] == D)
        la = by[(D, B, "LA")]
        for family, kset in (("exact", ks + K_MATCH), ("knn", ks)):
            cands = [by[(D, B, f"{family} k={k}")] for k in kset if (D, B, f"{family} k={k}") in by]
            match = [r for r in cands if r["reduction"] >= la["reduction"]]
            if not match:
                out.append(f"- D={D}, B={B}: no {family} k in {kset} reaches LA's reduction "
                           f"({100 * la['reduction']:.2f} %)")
                continue
            m = match[0]
            speed = la["time_s"] / m["time_s"]
            verdict = ("MET" if speed >= 8 else "NOT MET") if family == "exact" else "(for comparison)"
            out.append(f"- D={D}, B={B}: LA reduces by {100 * la['reduction']:.2f} % in {la['time_s'] * 1e3:.0f} ms; "
                       f"{m['method']} reduces by {100 * m['reduction']:.2f} % in {m['time_s'] * 1e3:.1f} ms: "
                       f"{speed:.1f}x faster than LA (goal >= 8x) {verdict}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B in {128, 1024}, D = 3072, k in {4, 64}")
    ap.add_argument("--repeats", type=int, default=15, help="repeats (brute KNN: at most 3, 1 above 2e8 draws)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see the notes)")
    ap.add_argument("--brute-max", type=float, default=1.1e9, help="skip brute KNN beyond B*k*D draws")
    ap.add_argument("--write", type=Path, default=None, help="also write the markdown to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        bs, ds, ks = [128, 1024], [3072], (4, 64)
    else:
        bs, ds, ks = [128, 256, 512, 1024], [3072, 16384], K_SET
    rows = run(bs, ds, ks, args.repeats, args.brute_max)
    cmd = "python benchmarks/bench_immiscible.py " + " ".join(sys.argv[1:])
    md = ["# bench_immiscible\n",
          f"Command: `{cmd.strip()}`, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"{args.threads} thread(s), CPU. Times: medians of {args.repeats} repeats, methods interleaved (brute KNN: "
          f"{min(args.repeats, 3)}, and 1 above 2e8 draws); reductions: means over the repeats' draws. "
          "A shared, busy 2-core machine: read ratios, not absolute times.",
          tables(rows, ks), goals(rows, ks)]
    text = "\n".join(md) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
