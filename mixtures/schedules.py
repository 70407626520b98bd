"""Domain-weight schedules over training steps: constant, piecewise, linear, and domain up-sampling at the end.

Domain up-sampling follows "Does your data spark joy? Performance gains from domain upsampling at the end of
training" (Blakeney et al., 2024): train on a base mixture, then switch the last 10-20 % of steps to a mixture
that up-samples small, high-quality domains. Mixtures found by RegMix (Liu et al., ICLR 2025) plug in as dicts.

Every schedule has ``.domains`` (a tuple of names) and a pure ``weights_at(step, total_steps)`` returning a
float64 array in ``.domains`` order that sums to 1. A sampler uses nothing else.

Step rule: a phase that starts at fraction ``f`` of training starts at step ``ceil(f * total_steps)`` (steps are
0-based), so with ``total_steps=100`` and ``final_fraction=0.1`` steps 90..99 use the up-sampled mixture; a
phase whose start step is ``>= total_steps`` never runs. ``Linear`` interpolates on ``progress = step /
total_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["Constant", "DomainUpsampling", "Linear", "Piecewise", "Schedule", "plot", "start_step"]

SUM_TOL = 1e-6


def start_step(fraction: float, total_steps: int) -> int:
    """The first step of a phase starting at ``fraction`` of ``total_steps``: ``ceil(fraction * total_steps)``
    (a relative tolerance of 1e-9 keeps ``0.9 * 100`` at 90, not 91)."""
    x = fraction * total_steps
    return int(math.ceil(x - 1e-9 * max(1.0, abs(x))))


def _check_steps(step: int, total_steps: int) -> None:
    if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1 (got {total_steps=})")
    if not isinstance(step, (int, np.integer)) or not 0 <= step < total_steps:
        raise ValueError(f"step must be an integer in [0, total_steps) (got {step=}, {total_steps=})")


def _as_weights(weights: Mapping, domains: Sequence[str] | None, name: str) -> tuple[tuple[str, ...], NDArray]:
    """Validate a dict domain -> weight; returns (domains, float64 vector in that order).

    With ``domains`` given, the dict may omit domains (weight 0) but must not name others.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"{name} must be a non-empty dict domain -> weight (got {type(weights).__name__})")
    for k in weights:
        if not isinstance(k, str):
            raise TypeError(f"{name}: domain names must be strings (got {k!r})")
    if domains is None:
        domains = tuple(weights)
    else:
        unknown = [k for k in weights if k not in domains]
        if unknown:
            raise ValueError(f"{name} names unknown domains {unknown}; the schedule's domains are {list(domains)}")
    vec = np.zeros(len(domains), dtype=np.float64)
    for i, d in enumerate(domains):
        v = weights.get(d, 0.0)
        try:
            vec[i] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{d!r}] must be a number (got {v!r})") from None
        if not np.isfinite(vec[i]) or vec[i] < 0:
            raise ValueError(f"{name}[{d!r}] must be finite and >= 0 (got {v!r})")
    total = vec.sum()
    if abs(total - 1.0) > SUM_TOL:
        raise ValueError(f"{name} must sum to 1 (got {total:.8g}); divide by the sum if these are proportions")
    return tuple(domains), vec / total


class Schedule:
    """Base of the schedules: ``.domains`` and a pure ``weights_at(step, total_steps)``."""

    domains: tuple[str, ...]
    #: True when the weights change only at ``phase_starts(total_steps)`` (lets samplers compute them per phase);
    #: a subclass that overrides ``weights_at`` with weights varying inside a phase must set it to False
    piecewise_constant: bool = False

    def weights_at(self, step: int, total_steps: int) -> NDArray[np.float64]:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights_dict(self, step: int, total_steps: int) -> dict[str, float]:
        """``weights_at`` as a dict domain -> weight."""
        return dict(zip(self.domains, self.weights_at(step, total_steps).tolist()))

    def phase_starts(self, total_steps: int) -> list[int]:
        """Steps at which the weights change abruptly (empty for smooth schedules)."""
        return []


class Constant(Schedule):
    """The same mixture at every step.

    Args:
        weights: dict domain -> weight, non-negative, summing to 1.
    """

    piecewise_constant = True

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.domains, self._w = _as_weights(weights, None, "weights")

    @classmethod
    def from_json(cls, path) -> Constant:
        """The mixture of a JSON file: ``best.json`` of ``datapipe regmix search`` (``{"weights": {domain:
        weight}, "target": ..., ...}``) or a bare object domain -> weight.

        Weights summing to 1 within 1e-3 (rounded by hand or by a tool) are renormalised; others are refused.

        Raises:
            ValueError: naming the file when it is not JSON, holds no weights object, or the weights are invalid.
        """
        import json
        import os

        name = os.fspath(path)
        try:
            with open(path) as f:
                doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: line {e.lineno}: not JSON ({e.msg})") from None
        weights = doc.get("weights") if isinstance(doc, dict) and isinstance(doc.get("weights"), dict) else doc
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"{name}: expected a JSON object domain -> weight, or {{\"weights\": {{...}}}} as "
                             "written by `datapipe regmix search`")
        try:
            vals = {str(k): float(v) for k, v in weights.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{name}: every weight must be a number (got {weights})") from None
        total = sum(vals.values())
        if abs(total - 1.0) <= 1e-3 and total > 0:
            vals = {k: v / total for k, v in vals.items()}
        try:
            return cls(vals)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None

    def weights_at(self, step: int, total_steps: int) -> NDArray[np.float64]:
        _check_steps(step, total_steps)
        return self._w.copy()

    def __repr__(self) -> str:
        return f"Constant({dict(zip(self.domains, self._w.tolist()))})"


class Piecewise(Schedule):
    """Phases of constant mixtures: ``[(start_fraction, weights), ...]``.

    The first phase starts at 0; start fractions strictly increase and lie in ``[0, 1)``. The domains are those
    of the first phase's dict, in its order; later phases may omit domains (weight 0) but not add new ones.
    Phase ``i`` covers steps ``[ceil(f_i * T), ceil(f_{i+1} * T))``.
    """

    piecewise_constant = True

    def __init__(self, phases: Sequence[tuple[float, Mapping[str, float]]]) -> None:
        phases = list(phases)
        if not phases:
            raise ValueError("phases must hold at least one (start_fraction, weights) pair")
        starts = []
        for i, ph in enumerate(phases):
            if not isinstance(ph, (tuple, list)) or len(ph) != 2:
                raise TypeError(f"phases[{i}] must be a (start_fraction, weights) pair (got {ph!r})")
            starts.append(float(ph[0]))
        if starts[0] != 0.0:
            raise ValueError(f"the first phase must start at 0.0 (got {starts[0]})")
        for i in range(1, len(starts)):
            if not starts[i - 1] < starts[i] < 1.0:
                raise ValueError(f"start fractions must increase strictly within [0, 1) (phase {i} starts at "
                                 f"{starts[i]} after {starts[i - 1]})")
        self.domains, first = _as_weights(phases[0][1], None, "phases[0] weights")
        self._w = [first] + [_as_weights(w, self.domains, f"phases[{i}] weights")[1]
                             for i, (_, w) in enumerate(phases[1:], 1)]
        self.starts = tuple(starts)

    def phase_starts(self, total_steps: int) -> list[int]:
        return [start_step(f, total_steps) for f in self.starts]

    def phase_at(self, step: int, total_steps: int) -> int:
        """Index of the phase that step ``step`` belongs to."""
        _check_steps(step, total_steps)
        return int(np.searchsorted(np.asarray(self.phase_starts(total_steps)), step, side="right") - 1)

    def weights_at(self, step: int, total_steps: int) -> NDArray[np.float64]:
        return self._w[self.phase_at(step, total_steps)].copy()

    def __repr__(self) -> str:
        return f"Piecewise({[(f, dict(zip(self.domains, w.tolist()))) for f, w in zip(self.starts, self._w)]})"


class DomainUpsampling(Piecewise):
    """Blakeney et al. (2024): ``base`` for the first ``1 - final_fraction`` of training, then ``upsampled``.

    Args:
        base: dict domain -> weight for most of training (defines ``.domains``).
        upsampled: dict domain -> weight for the end of training; may omit domains (weight 0).
        final_fraction: fraction of steps at the end on ``upsampled``, in ``(0, 1)`` (the paper: 0.1-0.2).
    """

    def __init__(self, base: Mapping[str, float], upsampled: Mapping[str, float], final_fraction: float = 0.1):
        if not isinstance(final_fraction, (int, float)) or not 0.0 < final_fraction < 1.0:
            raise ValueError(f"final_fraction must be in (0, 1) (got {final_fraction=})")
        self.final_fraction = float(final_fraction)
        super().__init__([(0.0, base), (1.0 - self.final_fraction, upsampled)])
        # check the upsampled dict with its own name for a clearer error
        _as_weights(upsampled, self.domains, "upsampled")

    def __repr__(self) -> str:
        b, u = (dict(zip(self.domains, w.tolist())) for w in self._w)
        return f"DomainUpsampling(base={b}, upsampled={u}, final_fraction={self.final_fraction})"


class Linear(Schedule):
    """Linear interpolation from ``start`` to ``end`` between two fractions of training.

    ``weights = start`` while ``progress <= start_fraction``, ``end`` once ``progress >= end_fraction``,
    linear in between, where ``progress = step / total_steps``. Convex combinations of two mixtures sum to 1.
    """

    def __init__(self, start: Mapping[str, float], end: Mapping[str, float], *, start_fraction: float = 0.0,
                 end_fraction: float = 1.0) -> None:
        if not 0.0 <= start_fraction < end_fraction <= 1.0:
            raise ValueError(f"need 0 <= start_fraction < end_fraction <= 1 (got {start_fraction=}, {end_fraction=})")
        self.domains, self._a = _as_weights(start, None, "start")
        self._b = _as_weights(end, self.domains, "end")[1]
        self.start_fraction, self.end_fraction = float(start_fraction), float(end_fraction)

    def weights_at(self, step: int, total_steps: int) -> NDArray[np.float64]:
        _check_steps(step, total_steps)
        p = step / total_steps
        t = min(1.0, max(0.0, (p - self.start_fraction) / (self.end_fraction - self.start_fraction)))
        w = (1.0 - t) * self._a + t * self._b
        return w / w.sum()


def plot(schedule: Schedule, total_steps: int, path, *, title: str | None = None) -> None:
    """Stacked area plot of the weights over training, saved to ``path`` (PNG, PDF, SVG by extension)."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it was

    if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1 (got {total_steps=})")
    steps = np.unique(np.linspace(0, total_steps - 1, min(total_steps, 1000)).astype(np.int64))
    steps = np.union1d(steps, [s for s in schedule.phase_starts(total_steps) if s < total_steps])
    W = np.stack([schedule.weights_at(int(s), total_steps) for s in steps])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.stackplot(steps, W.T, labels=schedule.domains, step="post")
    ax.set_xlim(0, total_steps - 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("domain weight")
    ax.set_title(title or type(schedule).__name__)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.savefig(path)
