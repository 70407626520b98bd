"""The index orders of torch's default samplers, reproduced so that a ``datapipe.DataLoader`` can resume them.

``torch.utils.data.RandomSampler`` draws a fresh order each pass from a seed it takes from the global RNG (or from
its ``generator``); nothing about it can be saved. :func:`epoch_order` draws the *same* indices with the *same* RNG
consumption as torch (so ``torch.manual_seed`` before an epoch, or the same ``generator`` seed, gives the order
plain torch gives) and returns, beside the order, the small record (the drawn seed, or the generator's state at the
start of the epoch) that redraws it exactly after a restart.

:class:`SeededRandomSampler` is the order ``DataLoader(..., shuffle=True, seed=s)`` uses: a pure function of
``(seed, epoch)`` that consumes no RNG at all.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.utils.data as tud
from numpy.typing import NDArray

from native.feistel import mix_prefix, shard_window_rows
from native.rng import mix_seed, permutation

__all__ = ["SeededRandomSampler", "epoch_order", "generator_state", "is_reproducible", "set_generator_state"]


class SeededRandomSampler(tud.Sampler[int]):
    """A random order of ``range(len(data_source))`` that is a pure function of ``(seed, epoch)``.

    What ``datapipe.DataLoader(dataset, shuffle=True, seed=s)`` shuffles with (``loader.sampler`` is this object):
    no global RNG is consumed, every epoch is reshuffled (the loader sets the epoch), and a restart redraws the
    same order from the seed alone. The length follows ``len(data_source)`` at each pass.

    With ``shard_offsets`` the order is *shard-local* (Mosaic streaming's ``py1b``): the shards are permuted, cut
    into windows of ``shard_window`` shards, and the rows of each window permuted among themselves, so a batch
    reads the shards of one window (two at a boundary) instead of nearly every shard. The loader uses it for
    datasets on object storage (``dataset.is_remote``), whose shards are downloaded through a bounded cache.

    Args:
        data_source: a sized dataset.
        seed: integer seed; ``None`` (shard-local only): each epoch's seed is drawn from torch's global RNG when the
            epoch starts, as ``torch.utils.data.RandomSampler`` draws its own (the loader records it for resume).
        shard_offsets: int64 ``[S + 1]`` first row of each shard, then ``len(data_source)``.
        shard_window: shards whose rows are shuffled together (``>= 1``).
    """

    def __init__(self, data_source, seed: int | None, *, shard_offsets=None, shard_window: int = 8) -> None:
        if seed is None and shard_offsets is None:
            raise TypeError("seed must be an int (None only with shard_offsets)")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int (got {type(seed).__name__})")
        if not isinstance(shard_window, (int, np.integer)) or shard_window < 1:
            raise ValueError(f"shard_window must be an integer >= 1 (got {shard_window=})")
        self.data_source = data_source
        self.seed = None if seed is None else int(seed)
        self.shard_offsets = None if shard_offsets is None else np.asarray(shard_offsets, dtype=np.int64)
        self.shard_window = int(shard_window)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None, seed: int | None = None) -> NDArray[np.int64]:
        """The order of ``epoch`` (default the current one); ``seed`` is the epoch's drawn seed when ``self.seed``
        is None."""
        epoch = self.epoch if epoch is None else epoch
        if self.seed is None and seed is None:
            raise ValueError("this sampler draws each epoch's seed from torch's RNG: pass the drawn seed")
        s = mix_seed(self.seed, epoch) if self.seed is not None else int(seed)
        n = len(self.data_source)
        off = self.shard_offsets
        if off is None:
            return permutation(n, s)
        if len(off) < 2 or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
            raise ValueError(f"shard_offsets must rise from 0 to len(data_source)={n} (got {off[:1]}..{off[-1:]})")
        shards = permutation(len(off) - 1, s)
        return shard_window_rows(0, n, np.diff(off)[shards], off[:-1][shards], self.shard_window, mix_prefix(s))

    def __iter__(self) -> Iterator[int]:
        seed = None if self.seed is not None else int(torch.empty((), dtype=torch.int64).random_().item())
        return iter(self.order(seed=seed).tolist())

    def __len__(self) -> int:
        return len(self.data_source)


def is_reproducible(sampler) -> bool:
    """Whether :func:`epoch_order` reproduces ``sampler``'s order (torch's own Sequential/Random samplers, exactly
    those classes, and :class:`SeededRandomSampler`)."""
    return type(sampler) in (tud.SequentialSampler, tud.RandomSampler, SeededRandomSampler)


def generator_state(g: torch.Generator) -> str:
    """A generator's state as text (base64), for a JSON checkpoint."""
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def set_generator_state(g: torch.Generator, text: str) -> None:
    g.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy()))


def epoch_order(sampler, epoch: int, record: Mapping | None = None) -> tuple[NDArray[np.int64], dict]:
    """The indices ``sampler`` yields in one pass, and the record that redraws them.

    Args:
        sampler: a sampler for which :func:`is_reproducible` is true.
        epoch: the loader's epoch (used by :class:`SeededRandomSampler` only).
        record: the record returned when this epoch was first drawn (a restart), or None to draw afresh, consuming
            the RNG exactly as torch's sampler does.

    Returns:
        ``(int64 indices, record)``; the record is small and JSON-serialisable.
    """
    if isinstance(sampler, SeededRandomSampler):
        if sampler.seed is not None:
            return sampler.order(epoch), {}
        record = dict(record or {})
        if "seed" not in record:  # drawn when the epoch starts, as torch's RandomSampler draws its seed
            record["seed"] = int(torch.empty((), dtype=torch.int64).random_().item())
        return sampler.order(epoch, seed=record["seed"]), record
    if isinstance(sampler, tud.SequentialSampler):
        return np.arange(len(sampler.data_source), dtype=np.int64), {}
    n, num = len(sampler.data_source), sampler.num_samples
    record = dict(record or {})
    if sampler.generator is None:
        if "seed" not in record:
            record["seed"] = int(torch.empty((), dtype=torch.int64).random_().item())
        g = torch.Generator()
        g.manual_seed(record["seed"])
    else:
        g = sampler.generator
        if "generator_state" in record:
            set_generator_state(g, record["generator_state"])
        else:
            record["generator_state"] = generator_state(g)
    parts = []
    if sampler.replacement:
        for _ in range(num // 32):
            parts.append(torch.randint(high=n, size=(32,), dtype=torch.int64, generator=g))
        parts.append(torch.randint(high=n, size=(num % 32,), dtype=torch.int64, generator=g))
    else:
        for _ in range(num // n):
            parts.append(torch.randperm(n, generator=g))
        parts.append(torch.randperm(n, generator=g)[: num % n])
    return torch.cat(parts).numpy().astype(np.int64, copy=False), record
