"""Token-budget batches: as many rows as fit ``len(batch) * max(length) <= max_tokens``.

Rows are shuffled, cut into chunks of ``sort_window`` rows, each chunk sorted by length, then cut greedily
under the budget, and the batch order shuffled: random batch-mates each epoch, yet little padding (the
"random yet tight" technique of DESIGN.md). ``sort_window=1`` gives plain random order.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from native.batching import budget_cuts
from native.rng import permutation
from samplers.base import (BatchSamplerBase, Plan, check_budget, check_lengths, digest_array,
                           take_batches)


class TokenBudgetBatchSampler(BatchSamplerBase):
    """Batches whose padded size ``len(batch) * max(length)`` stays within ``max_tokens``.

    Args:
        lengths: int array ``[N]`` of token counts per row (``ArrowDataset.index["length"]``).
        max_tokens: padded token budget per batch.
        max_rows: optional cap on rows per batch.
        sort_window: rows sorted together before cutting (``>= 1``); larger means less padding, less mixing.
        shuffle: shuffle rows and batches each epoch (else rows in index order, cut in order).
        seed, rank, world_size, drop_last: as in every sampler. Rows longer than ``max_tokens`` are dropped
            and counted under ``dropped["longer_than_max_tokens"]``, with a ``PlanWarning`` (set
            ``on_long="error"`` or ``strict=True`` to raise instead).
    """

    def __init__(self, lengths: ArrayLike, max_tokens: int, *, max_rows: int | None = None, sort_window: int = 1024,
                 shuffle: bool = True, on_long: str = "drop", seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        self.lengths = check_lengths(lengths)
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 (got {max_tokens=})")
        if sort_window < 1:
            raise ValueError(f"sort_window must be >= 1 (got {sort_window=})")
        if on_long not in ("drop", "error"):
            raise ValueError(f"on_long must be 'drop' or 'error' (got {on_long=})")
        if max_rows is not None and (not isinstance(max_rows, (int, np.integer)) or max_rows < 1):
            raise ValueError(f"max_rows must be an integer >= 1 or None (got {max_rows=})")
        check_budget(self.lengths, max_tokens, "max_tokens")
        self.max_tokens = int(max_tokens)
        self.max_rows = None if max_rows is None else int(max_rows)
        self.sort_window = int(sort_window)
        self.shuffle = bool(shuffle)
        self.num_rows = len(self.lengths)
        too_long = np.flatnonzero(self.lengths > self.max_tokens)
        if len(too_long) and on_long == "error":
            raise ValueError(
                f"row {int(too_long[0])} has length {int(self.lengths[too_long[0]])} > max_tokens={max_tokens} "
                f"({len(too_long)} rows in all); raise max_tokens or use on_long='drop'"
            )
        if len(too_long) and strict:
            raise ValueError(
                f"{len(too_long)} rows are longer than max_tokens={max_tokens} (first: row {int(too_long[0])}, "
                f"{int(self.lengths[too_long[0]])} tokens) and would be dropped (strict=True); raise max_tokens")
        self._keep = np.flatnonzero(self.lengths <= self.max_tokens)
        if not drop_last and 0 < len(self._keep) < self.world_size:
            raise ValueError(f"world_size={self.world_size} is larger than the {len(self._keep)} usable rows")

    def _options(self) -> dict:
        return {"max_tokens": self.max_tokens, "max_rows": self.max_rows, "sort_window": self.sort_window,
                "shuffle": self.shuffle}

    def _metadata(self) -> dict:
        return {"rows": self.num_rows, "lengths": digest_array(self.lengths)}

    def _lost_share(self, plan: Plan) -> str:
        total = float(self.lengths.sum())
        return f" ({1 - float(self.lengths[plan.indices].sum()) / total:.1%} of tokens)" if total else ""

    def _build_plan(self, epoch: int) -> Plan:
        rows = self._keep
        seed = self.epoch_seed(epoch)
        if self.shuffle:
            rows = rows[permutation(len(rows), seed)]
        if self.sort_window > 1:
            # sort within windows of the shuffled order (stable: ties keep the shuffled order)
            w = self.sort_window
            win = np.arange(len(rows)) // w
            rows = rows[np.lexsort((self.lengths[rows], win))]
        cuts = budget_cuts(self.lengths[rows], self.max_tokens, self.max_rows)
        plan = Plan(rows.astype(np.int64), cuts)
        if self.shuffle:
            plan = take_batches(plan, permutation(plan.num_batches, seed ^ 0x5A5A5A5A))
        dropped = self.num_rows - len(self._keep)
        if dropped:
            plan.dropped["longer_than_max_tokens"] = int(dropped)
        return plan

    def stats(self) -> dict:
        out = super().stats()
        plan = self.global_plan()
        real, padded = (int(x) for x in plan.padding(self.lengths))
        out.update(
            tokens=real,
            padded_tokens=padded,
            padding_fraction=1.0 - real / padded if padded else 0.0,
            mean_tokens_per_batch=real / plan.num_batches if plan.num_batches else 0.0,
        )
        return out
