"""Tables in the column conventions of RegMix's authors (sail-sg/regmix, ``data/*.csv``).

RegMix: "Data Mixture as Regression for Language Model Pre-training" (Liu et al., ICLR 2025). Their tables are
CSV files with an ``index`` column that joins a mixture file to its loss file:

* mixtures: ``index, train_the_pile_arxiv, train_the_pile_freelaw, ...`` (one weight column per domain),
* losses: ``index, metric/the_pile_arxiv_val_loss, ...`` (one validation loss per target).

This module reads and joins such pairs (with a clear error when the index columns do not join), turns inputs
given as numpy arrays or pandas frames into float64 matrices, and resolves short target/domain names
(``pile_cc``) to the authors' column names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.typing import NDArray

__all__ = ["MIXTURE_PREFIX", "TARGET_PREFIX", "TARGET_SUFFIX", "as_matrix", "as_targets", "domain_key", "plot_mixture",
           "plot_predictions", "read_pair", "read_shares", "read_table", "resolve_target", "select_targets",
           "shares_vector", "short_names", "write_mixtures"]

MIXTURE_PREFIX = "train_the_pile_"
TARGET_PREFIX = "metric/the_pile_"
TARGET_SUFFIX = "_val_loss"
INDEX = "index"
MIX_SUM_TOL = 0.02  # the authors' CSVs round weights to 3 decimals: their rows sum to 0.996-1.003


def _where(path, row: int) -> str:
    """``file: row R (line L)``: rows are data rows counted from 0 in each file; the line is the file's (the
    header is line 1)."""
    return f"{os.fspath(path)}: row {row} (line {row + 2})"


def read_table(path: str | os.PathLike, *, index_column: str = INDEX) -> pd.DataFrame:
    """Read one CSV of the authors' layout; the index column must exist and be unique, every other cell a number.

    Raises:
        ValueError: naming the file, the row (data rows from 0, and the file's line) and the column when the file
            is empty or not a CSV, the index column is missing or repeats a value, or a cell is not a number.
    """
    name = os.fspath(path)
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{name}: empty file: expected a CSV with a header line ({index_column}, ...) "
                         "and rows") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not a text CSV file (it does not decode as UTF-8)") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{name}: not a CSV file in the RegMix layout ({str(e).strip()})") from None
    if index_column not in df.columns:
        hint = " (is it a CSV file?)" if len(df.columns) < 2 else ""
        raise ValueError(f"{name}: no index column {index_column!r}{hint} (columns: {list(df.columns)[:5]}...)")
    if len(df) == 0:
        raise ValueError(f"{name}: a header line but no rows")
    dup = df[index_column].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        value = df[index_column].iloc[row]
        value = value.item() if hasattr(value, "item") else value
        first = int(np.flatnonzero((df[index_column] == value).to_numpy())[0])
        raise ValueError(f"{_where(path, row)}: index {value!r} appears twice (first at row {first})")
    for col in df.columns:
        if col != index_column and not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            row = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
            raise ValueError(f"{_where(path, row)}, column {col!r}: not a number ({str(df[col].iloc[row])!r})")
        vals = df[col].to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(vals))
        if len(bad):
            raise ValueError(f"{_where(path, int(bad[0]))}, column {col!r}: empty, NaN or inf "
                             f"({len(bad)} such rows in the column)")
    return df


def _mixture_problem(df: pd.DataFrame, path) -> str | None:
    """Why ``df`` (index column set aside) is not a mixture table, or None: weights in [0, 1], rows sum to 1."""
    if any(str(c).startswith("metric/") for c in df.columns):
        return f"{os.fspath(path)} has loss columns ({str(df.columns[0])!r}, ...)"
    W = df.to_numpy(dtype=np.float64)
    bad = np.flatnonzero((W < 0).any(axis=1) | (W > 1).any(axis=1) | (np.abs(W.sum(axis=1) - 1.0) > MIX_SUM_TOL))
    if len(bad):
        r = int(bad[0])
        return (f"{_where(path, r)} is not a mixture: its weights sum to {W[r].sum():.6g} "
                f"(each row of a mixture file holds weights in [0, 1] summing to 1)")
    return None


def read_pair(mixtures_path: str | os.PathLike, losses_path: str | os.PathLike, *,
              index_column: str = INDEX) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a mixture CSV and its loss CSV and join them on the index column.

    Returns:
        ``(mixtures, losses)``: two frames with the same rows in the same order (the mixture file's order),
        without the index column (it becomes the frames' index).

    Raises:
        ValueError: when the index columns do not join (names the files and the first unmatched values), when
            the mixture file's rows are not weights summing to 1 (saying so when the two files look swapped),
            or as :func:`read_table`.
    """
    mix = read_table(mixtures_path, index_column=index_column).set_index(index_column)
    loss = read_table(losses_path, index_column=index_column).set_index(index_column)
    problem = _mixture_problem(mix, mixtures_path)
    if problem is not None:
        if _mixture_problem(loss, losses_path) is None:
            raise ValueError(f"the mixture and loss files look swapped: {os.fspath(losses_path)} holds mixture "
                             f"weights (rows summing to 1) and {problem}; swap the two files")
        raise ValueError(f"{problem}; pass the file of mixture weights as the mixtures")
    only_mix = mix.index.difference(loss.index)
    only_loss = loss.index.difference(mix.index)
    if len(only_mix) or len(only_loss):
        raise ValueError(
            f"the {index_column!r} columns of {os.fspath(mixtures_path)} and {os.fspath(losses_path)} do not join: "
            f"{len(only_mix)} mixture rows have no loss (e.g. {list(only_mix[:3])}), {len(only_loss)} loss rows "
            f"have no mixture (e.g. {list(only_loss[:3])}); pair the mixture file with the loss file of the same runs"
        )
    return mix, loss.loc[mix.index]


def as_matrix(x, name: str = "mixtures",
              columns: Sequence[str] | None = None) -> tuple[NDArray[np.float64], list | None]:
    """A float64 ``[N, D]`` matrix from a numpy array or a pandas frame, and the frame's column names.

    With ``columns`` (the names a model was fitted on) a frame's columns are selected and ordered by name.
    A frame's ``index`` column, if present, is left out.
    """
    names = None
    if isinstance(x, pd.DataFrame):
        if INDEX in x.columns:
            x = x.drop(columns=[INDEX])
        if columns is not None:
            if any(c not in x.columns for c in columns):  # the same domains under their short names (`propose`)
                by_short = {domain_key(str(c)): c for c in x.columns}
                x = x.rename(columns={by_short[domain_key(c)]: c for c in columns if domain_key(c) in by_short})
            missing = [c for c in columns if c not in x.columns]
            if missing:
                raise ValueError(f"{name} lacks the columns the model was fitted on: {missing[:5]}")
            x = x[list(columns)]
        names = [str(c) for c in x.columns]
        arr = x.to_numpy(dtype=np.float64)
    elif isinstance(x, pd.Series):
        arr = x.to_numpy(dtype=np.float64)[:, None] if name != "mixtures" else x.to_numpy(dtype=np.float64)[None, :]
        names = [str(x.name)] if name != "mixtures" else [str(i) for i in x.index]
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1 and name == "mixtures":
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, columns] (got shape {arr.shape})")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        r, c = bad[0]
        raise ValueError(f"{name} has NaN/inf at row {r}, column {names[c] if names else c}")
    return arr, names


def as_targets(y) -> tuple[NDArray[np.float64], list | None, bool]:
    """Targets as float64 ``[N, T]``, their names, and whether a single 1-D target was given."""
    if isinstance(y, pd.Series):
        return as_matrix(y, "targets")[0], [str(y.name)], True
    if isinstance(y, pd.DataFrame):
        arr, names = as_matrix(y, "targets")
        return arr, names, False
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim == 1:
        return as_matrix(arr[:, None], "targets")[0], None, True
    return as_matrix(arr, "targets")[0], None, False


def domain_key(name: str) -> str:
    """The short domain name of a mixture column: ``train_the_pile_pile_cc`` -> ``pile_cc``.

    Short names are the one naming of the outputs: ``propose`` writes them as columns, ``search`` as the keys of
    ``best.json``, and :meth:`mixtures.Constant.from_json` reads them as the schedule's domains."""
    return name[len(MIXTURE_PREFIX):] if name.startswith(MIXTURE_PREFIX) else name


def short_names(domains) -> list[str]:
    """:func:`domain_key` of every domain, refusing two that become one (``a`` and ``train_the_pile_a``)."""
    names = [domain_key(str(d)) for d in domains]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"domains {[d for d in domains if domain_key(str(d)) == dup]} are one domain {dup!r} under "
                         "two names; keep one")
    return names


def resolve_target(columns: Sequence[str], target: str) -> str:
    """Find a target column by its exact name or by a short domain name (``pile_cc`` ->
    ``metric/the_pile_pile_cc_val_loss``).

    Raises:
        ValueError: when no column (or more than one) matches, listing the columns.
    """
    cols = [str(c) for c in columns]
    if target in cols:
        return target
    full = f"{TARGET_PREFIX}{target}{TARGET_SUFFIX}"
    if full in cols:
        return full
    hits = [c for c in cols if target in c]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"target {target!r} matches {len(hits)} columns; pick one of {cols}")


def shares_vector(token_shares, domains: Sequence[str] | None, name: str = "token_shares") -> NDArray[np.float64]:
    """Token counts (or shares) per domain as a float64 vector in ``domains`` order.

    ``token_shares`` is an array, or a mapping keyed by the domain names or their short names (``pile_cc`` for
    ``train_the_pile_pile_cc``). Every value must be finite and > 0.
    """
    if isinstance(token_shares, Mapping):
        if domains is None:
            vec = np.asarray(list(token_shares.values()), dtype=np.float64)
        else:
            by_short = {domain_key(str(k)): v for k, v in token_shares.items()}
            unknown = sorted(set(map(domain_key, map(str, token_shares))) - set(map(domain_key, domains)))
            if unknown:
                raise ValueError(f"{name} names unknown domains {unknown}; the domains are {list(domains)}")
            missing = [d for d in domains if domain_key(d) not in by_short]
            if missing:
                raise ValueError(f"{name} lacks domains {missing}")
            vec = np.asarray([by_short[domain_key(d)] for d in domains], dtype=np.float64)
    else:
        vec = np.asarray(token_shares, dtype=np.float64).ravel()
        if domains is not None and len(vec) != len(domains):
            raise ValueError(f"{name} has {len(vec)} entries but there are {len(domains)} domains")
    if len(vec) < 2:
        raise ValueError(f"{name} needs at least 2 domains (got {len(vec)})")
    if not np.all(np.isfinite(vec)) or np.any(vec <= 0):
        i = int(np.flatnonzero(~np.isfinite(vec) | (vec <= 0))[0])
        raise ValueError(f"{name} must be finite and > 0 (entry {i} is {vec[i]})")
    return vec


def select_targets(losses: pd.DataFrame, targets: Sequence[str] | None) -> pd.DataFrame:
    """The loss columns named by ``targets`` (exact or short names, see :func:`resolve_target`), or all."""
    if not targets:
        return losses
    return losses[[resolve_target(losses.columns, t) for t in targets]]


def read_shares(path: str | os.PathLike) -> dict[str, float]:
    """A JSON object domain -> tokens (or share), e.g. ``{"train_the_pile_pile_cc": 0.2369, ...}``."""
    import json

    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, dict) and "weights" in doc and isinstance(doc["weights"], dict):
        doc = doc["weights"]
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"{os.fspath(path)}: expected a JSON object domain -> tokens (got {type(doc).__name__})")
    for k, v in doc.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"{os.fspath(path)}: domain {k!r} has a non-numeric value {v!r}")
    return {str(k): float(v) for k, v in doc.items()}


def write_mixtures(path: str | os.PathLike, mixtures: NDArray[np.float64], domains: Sequence[str], *,
                   start: int = 1, decimals: int | None = None) -> None:
    """Write mixtures as the authors' CSV: ``index`` (from ``start``) then one column per domain."""
    df = pd.DataFrame(np.asarray(mixtures, dtype=np.float64), columns=list(domains))
    if decimals is not None:
        df = df.round(decimals)
    df.insert(0, INDEX, np.arange(start, start + len(df)))
    df.to_csv(path, index=False)


def _figure(**kwargs):
    # a bare Figure, not pyplot: saving a plot leaves the process's (a notebook's) backend as it was
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def plot_predictions(predicted: NDArray, actual: NDArray, path: str | os.PathLike, *, title: str = "") -> None:
    """Scatter of predicted vs actual loss with the Spearman rho in the legend, saved to ``path``."""
    from scipy.stats import spearmanr

    predicted, actual = np.asarray(predicted, np.float64).ravel(), np.asarray(actual, np.float64).ravel()
    fig = _figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter(predicted, actual, s=12, alpha=0.7, label=f"Spearman rho = {spearmanr(predicted, actual)[0]:.4f}")
    lo, hi = min(predicted.min(), actual.min()), max(predicted.max(), actual.max())
    ax.plot([lo, hi], [lo, hi], ls="--", lw=1, color="gray")
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("actual loss")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(True, ls=":")
    fig.savefig(path)


def plot_mixture(mixture: NDArray, domains: Sequence[str], path: str | os.PathLike, *,
                 prior: NDArray | None = None, title: str = "") -> None:
    """Bar chart of a mixture (and the token prior next to it, if given), saved to ``path``."""
    names = [domain_key(d) for d in domains]
    x = np.arange(len(names))
    fig = _figure(figsize=(max(6, 0.5 * len(names)), 4.5))
    ax = fig.subplots()
    width = 0.4 if prior is not None else 0.8
    ax.bar(x - (width / 2 if prior is not None else 0), mixture, width, label="searched mixture")
    if prior is not None:
        p = np.asarray(prior, np.float64)
        ax.bar(x + width / 2, p / p.sum(), width, label="token prior")
    ax.set_xticks(x, names, rotation=90)
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path)
