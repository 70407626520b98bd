"""Per-bucket batch sizes found by searching for the out-of-memory edge (NeMo's OOMptimizer).

From "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025): with a
batch size calibrated per duration bucket, short-utterance buckets take far larger batches than a single
``max_duration`` allows (5x larger batches for Canary-1B). For each bucket, from the largest shape down, the
search doubles the batch size until the probe runs out of memory, then bisects between the largest size that
fitted and the smallest that did not, until they are within ``tolerance`` of each other. A smaller bucket
starts from the size found for the larger one (it needs no more memory per example).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["BatchShape", "BatchShape2D", "calibrate_batch_sizes", "is_oom"]


class BatchShape(NamedTuple):
    """A synthetic batch to probe: ``batch_size`` cuts of ``duration`` seconds (unpacks as a tuple)."""

    batch_size: int
    duration: float


class BatchShape2D(NamedTuple):
    """A synthetic 2D batch: ``batch_size`` cuts of ``duration`` seconds with ``tokens`` output tokens."""

    batch_size: int
    duration: float
    tokens: float


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means out of memory: ``MemoryError``, ``torch.cuda.OutOfMemoryError`` (or
    ``torch.OutOfMemoryError``), or a ``RuntimeError`` whose message says so (older CUDA/MPS builds)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
        if types and isinstance(exc, types):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release_memory() -> None:
    """Free what a failed probe left on the GPU (tensors kept alive by the traceback, the caching allocator's
    blocks), so the next probe sees the true free memory. Without CUDA there is nothing to return."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def calibrate_batch_sizes(probe: Callable[[tuple], object], bins: Sequence, *, start: int = 32,
                          tolerance: float = 0.05, max_batch_size: int = 1 << 20,
                          on_progress: Callable[[int, int, bool], None] | None = None) -> list[int]:
    """Largest batch size per bucket that ``probe`` runs without running out of memory (OOMptimizer).

    ``probe(shape)`` runs one real training step (forward, backward, optimizer step) on a synthetic batch of
    ``shape`` and returns; it raises ``torch.cuda.OutOfMemoryError`` or ``MemoryError`` when the batch does not
    fit. Any other exception propagates. Buckets are searched from the largest shape down: double from
    ``start`` until out of memory, then bisect until ``(too_big - fits) / too_big <= tolerance`` (or they are
    adjacent). Hence the size found is at least ``(1 - tolerance)`` times the true limit, and never above it.

    Args:
        probe: callable taking a :class:`BatchShape` ``(batch_size, duration)`` for a 1D bin, or a
            :class:`BatchShape2D` ``(batch_size, duration, tokens)`` for a 2D bin.
        bins: each bucket's largest shape, ascending: a ``max_duration`` per bucket (1D; NeMo's
            ``bucket_duration_bins`` or ``DurationBucketSampler.bucket_shapes``) or ``(max_duration,
            max_tokens)`` pairs (2D).
        start: first batch size tried on the largest bucket, ``>= 1``.
        tolerance: relative gap at which the bisection stops, in ``(0, 1)``.
        max_batch_size: the doubling stops here (a bucket that never runs out of memory gets this).
        on_progress: optional ``f(bucket, batch_size, fitted)`` called after every probe (progress bars).

    Returns:
        One batch size per bin, in the order of ``bins`` (``>= 1`` each; pass as ``bucket_batch_sizes``).

    Raises:
        ValueError: bad arguments, or a batch of one cut does not fit (the bucket cannot be trained as is).

    Example (a real GPU; ``model`` an encoder-decoder ASR model on CUDA)::

        import torch
        from samplers import DurationBucketSampler, calibrate_batch_sizes

        opt = torch.optim.AdamW(model.parameters())

        def probe(shape):
            frames = int(shape.duration * 100)               # 10 ms feature frames
            x = torch.randn(shape.batch_size, frames, 80, device="cuda")
            y = torch.randint(0, 1024, (shape.batch_size, int(shape.tokens)), device="cuda")
            loss = model(x, y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()

        sampler = DurationBucketSampler(ds.index["duration"], max_duration=None,
                                        output_lengths=ds.index["num_tokens"], num_buckets=30,
                                        bucket_batch_sizes=[1] * 60)   # any caps: only for the shapes
        sizes = calibrate_batch_sizes(probe, sampler.bucket_shapes, start=32, tolerance=0.05)
        sampler = DurationBucketSampler(ds.index["duration"], max_duration=None,
                                        output_lengths=ds.index["num_tokens"], bucket_bins=sampler.bins,
                                        bucket_batch_sizes=sizes)
    """
    if not isinstance(start, int) or start < 1:
        raise ValueError(f"start must be an integer >= 1 (got {start=})")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1) (got {tolerance=})")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1 (got {max_batch_size=})")
    shapes = [_shape_maker(b, i) for i, b in enumerate(bins)]
    if not shapes:
        return []

    out = [0] * len(shapes)
    guess = min(start, max_batch_size)
    for k in range(len(shapes) - 1, -1, -1):
        make = shapes[k]

        def fits(bs: int, k: int = k, make=make) -> bool:
            try:
                probe(make(bs))
                ok = True
            except BaseException as exc:  # noqa: BLE001 - only out-of-memory is swallowed
                if not is_oom(exc):
                    raise
                ok = False
            if not ok:
                _release_memory()
            if on_progress is not None:
                on_progress(k, bs, ok)
            return ok

        lo, hi = 0, None  # lo: largest size known to fit; hi: smallest known not to
        bs = guess
        while True:  # grow (or shrink from a failed first guess) until both ends are known
            if fits(bs):
                lo = bs
                if hi is not None or bs >= max_batch_size:
                    break
                bs = min(bs * 2, max_batch_size)
            else:
                hi = bs
                if lo > 0 or bs == 1:
                    break
                bs = max(1, bs // 2)
        if lo == 0:
            raise ValueError(f"bucket {k} (shape {make(1)}): even a batch of 1 runs out of memory; "
                             "shorten the longest cuts or reduce the model's memory use")
        while hi is not None and hi - lo > 1 and (hi - lo) / hi > tolerance:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        out[k] = lo
        guess = lo  # a smaller bucket fits at least as many
    return out


def _shape_maker(b, i: int) -> Callable[[int], tuple]:
    if isinstance(b, (int, float)) or (hasattr(b, "ndim") and getattr(b, "ndim", 1) == 0):
        d = float(b)
        if not d > 0:
            raise ValueError(f"bins[{i}] must be a duration > 0 (got {b!r})")
        return lambda bs: BatchShape(int(bs), d)
    try:
        vals = [float(v) for v in b]
    except TypeError:
        raise TypeError(f"bins[{i}] must be a duration or a (duration, tokens) pair (got {b!r})") from None
    if len(vals) == 1:
        return _shape_maker(vals[0], i)
    if len(vals) != 2 or not vals[0] > 0 or vals[1] < 0:
        raise ValueError(f"bins[{i}] must be (duration > 0, tokens >= 0) (got {b!r})")
    return lambda bs: BatchShape2D(int(bs), vals[0], vals[1])
