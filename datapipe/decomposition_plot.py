"""Show the bucket histogram of a stored dataset decomposition: text lines (``datapipe inspect``) and a bar chart.

The buckets ``D_k`` of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum"
(Pouransari et al., NeurIPS 2024), read from the index :class:`datapipe.decomposition_index.DecomposedIndex` opens.
"""

from __future__ import annotations

import os

from datapipe.decomposition_index import DecomposedIndex

__all__ = ["bucket_histogram_lines", "plot_buckets"]


def bucket_histogram_lines(dataset_dir: str | os.PathLike) -> list[str]:
    """The bucket histogram of the decomposition stored in ``dataset_dir``; ``[]`` when there is none."""
    if not DecomposedIndex.exists(dataset_dir):
        return []
    return DecomposedIndex.open(dataset_dir).histogram_lines()


def plot_buckets(dataset_dir: str | os.PathLike, ax=None):
    """Bar chart of tokens per bucket on a matplotlib axis (a new figure when ``ax`` is None); returns the axis.

    Does nothing (returns ``ax``) when the dataset has no decomposition. A new figure is a bare
    ``matplotlib.figure.Figure`` (save it with ``ax.figure.savefig``): the process's pyplot backend is left alone.
    """
    if not DecomposedIndex.exists(dataset_dir):
        return ax
    idx = DecomposedIndex.open(dataset_dir)
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(6, 3.5)).subplots()
    ks = sorted(idx.bucket_tokens)
    ax.bar([str(1 << k) for k in ks], [idx.bucket_tokens[k] for k in ks], color="tab:blue")
    ax.set_xlabel("sequence length (tokens), bucket D_k")
    ax.set_ylabel("tokens")
    c = idx.counts
    ax.set_title(f"decomposition ({idx.remainder}): {100 * c['kept_tokens'] / max(c['tokens'], 1):.2f} % tokens "
                 "kept", fontsize=9)
    return ax
