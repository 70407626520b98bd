"""Summaries of a dataset directory for ``datapipe inspect`` and the demo."""

from __future__ import annotations

import importlib
import os

import numpy as np

from datapipe.dataset import ArrowDataset
from datapipe.format import DatasetError


def _decomposition_lines(path) -> list[str]:
    # the decomposition module is optional here: inspect shows its buckets when a decomposition exists
    try:
        mod = importlib.import_module("datapipe.decomposition")
    except ImportError:
        return []
    fn = getattr(mod, "bucket_histogram_lines", None)
    if fn is None:
        return []
    try:
        return list(fn(path))
    except (FileNotFoundError, DatasetError):
        return []


def summarize(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """Rows, tokens, length quantiles and histogram, shards and checksum status, as a dict with ``text`` lines.

    With ``verify``, ``checksums`` is ``"ok"`` or ``"FAILED: ..."`` (and ``bad_files`` names every bad file, as
    ``datapipe verify`` does); ``datapipe inspect`` exits 1 then.
    """
    ds = ArrowDataset.open(path)
    m = ds.manifest
    out: dict = {"path": str(ds.path), "rows": len(ds), "shards": ds.num_shards,
                 "bytes": sum(s["bytes"] for s in m["shards"]), "columns": m["columns"],
                 "index_columns": m["index_columns"], "params": m.get("params", {})}
    text = [f"dataset   {ds.path}", f"rows      {len(ds):,}",
            f"shards    {ds.num_shards} ({out['bytes'] / 2**20:.1f} MiB, compression={m.get('compression')})",
            "columns   " + ", ".join(f"{c['name']}: {c['type']}" for c in m["columns"])]
    lengths = ds.index.get("length")
    if lengths is not None and len(lengths):
        q = np.percentile(lengths, [0, 50, 90, 99, 100])
        out.update(tokens=int(lengths.sum()), length_quantiles=dict(zip(["min", "p50", "p90", "p99", "max"], q.tolist())))
        text.append(f"tokens    {int(lengths.sum()):,}  (length min {q[0]:.0f}, p50 {q[1]:.0f}, p90 {q[2]:.0f}, "
                    f"p99 {q[3]:.0f}, max {q[4]:.0f})")
        edges = 2 ** np.arange(0, int(np.ceil(np.log2(max(2, lengths.max())))) + 1)
        hist, _ = np.histogram(lengths, bins=np.r_[0, edges])
        out["length_histogram"] = {f"<={int(e)}": int(h) for e, h in zip(edges, hist) if h}
        peak = max(hist.max(), 1)
        text.append("lengths   (power-of-two bins)")
        for e, h in zip(edges, hist):
            if h:
                text.append(f"  <= {int(e):>8} {int(h):>9}  " + "#" * int(round(40 * h / peak)))
    for k in ("duration",):
        if k in ds.index:
            v = ds.index[k]
            out[f"total_{k}"] = float(v.sum())
            text.append(f"{k:<9} total {v.sum():.1f}, min {v.min():.2f}, max {v.max():.2f}")
    if verify:
        from datapipe.integrity import verify_tree

        rep = verify_tree(ds.path)
        if rep["ok"]:
            out["checksums"] = "ok"
            text.append(f"checksums ok ({rep['files']} files)")
        else:
            out["checksums"] = "FAILED: " + "; ".join(msg for _, msg in rep["problems"])
            out["bad_files"] = [f for f, _ in rep["problems"]]
            text.extend(f"checksums FAILED: {msg}" for _, msg in rep["problems"])
    else:
        out["checksums"] = "not checked"
    dec = _decomposition_lines(ds.path)
    if dec:
        text.extend(dec)
    out["text"] = text
    return out


def plot_summary(path: str | os.PathLike, png: str | os.PathLike) -> None:
    """Length histogram (log-spaced bins; a duration histogram for speech datasets without lengths) and, if a
    decomposition exists, its bucket histogram, as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it was

    ds = ArrowDataset.open(path)
    lengths = ds.index.get("length")
    plot_buckets = None
    try:
        plot_buckets = getattr(importlib.import_module("datapipe.decomposition"), "plot_buckets", None)
    except ImportError:
        pass
    has_dec = plot_buckets is not None and os.path.isdir(os.path.join(ds.path, "decomposition"))
    fig = Figure(figsize=(11 if has_dec else 6, 4))
    axes = fig.subplots(1, 2 if has_dec else 1, squeeze=False)
    ax = axes[0, 0]
    if lengths is not None and len(lengths):
        bins = np.unique(np.logspace(0, np.log10(max(2, lengths.max())), 50).astype(int))
        ax.hist(np.maximum(lengths, 1), bins=bins, color="#3b75af")
        ax.set_xscale("log")
        ax.set_xlabel("tokens per row")
        ax.set_ylabel("rows")
    elif ds.index.get("duration") is not None and len(ds.index["duration"]):  # speech: durations in seconds
        ax.hist(ds.index["duration"], bins=50, color="#3b75af")
        ax.set_xlabel("duration per cut (s)")
        ax.set_ylabel("cuts")
    ax.set_title(f"{os.path.basename(str(ds.path))}: {len(ds):,} rows")
    if has_dec:
        plot_buckets(ds.path, axes[0, 1])
    fig.tight_layout()
    fig.savefig(png, dpi=110)
