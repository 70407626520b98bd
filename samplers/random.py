"""Random (or sequential) fixed-size batches: the plain sampler, and the first user of the plan helpers."""

from __future__ import annotations

import numpy as np

from native.batching import fixed_sizes
from native.rng import permutation
from samplers.base import BatchSamplerBase, Plan


class RandomBatchSampler(BatchSamplerBase):
    """Batches of ``batch_size`` rows of a shuffled (or ordered) ``range(num_rows)``, sharded over ranks.

    Without ``drop_last`` every row appears exactly once per epoch across ranks; when the rows do not fill
    ``world_size`` full batches at the last step, the last batches are shortened (each keeps >= 1 row) so every
    rank yields the same number of batches (when even that is impossible, e.g. 3 rows in batches of 1 over 2
    ranks, the rows past the last whole step are dropped and counted). With ``drop_last`` every batch is full and the remainder is
    dropped and counted (``stats()["dropped"]["incomplete_batch"]``).

    Args:
        num_rows: rows in the dataset.
        batch_size: rows per batch, ``>= 1``.
        shuffle: permute rows each epoch (seeded by ``seed`` and the epoch); else rows in order.
        seed: integer seed, the same on every rank.
        rank, world_size: this process's rank; default to torch.distributed, else 0 and 1.
        drop_last: drop the rows that do not fill a full step of ``world_size`` batches.
        strict: raise ``ValueError`` instead of a ``PlanWarning`` when the plan drops rows unasked.
    """

    def __init__(self, num_rows: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        if not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
            raise ValueError(f"num_rows must be an integer >= 0 (got {num_rows=})")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 (got {batch_size=})")
        if not drop_last and 0 < num_rows < self.world_size:
            raise ValueError(
                f"world_size={self.world_size} is larger than num_rows={num_rows}: some rank would get no rows; "
                "use fewer ranks or more data"
            )
        self.num_rows = int(num_rows)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)

    def _options(self) -> dict:
        return {"num_rows": self.num_rows, "batch_size": self.batch_size, "shuffle": self.shuffle}

    def _build_plan(self, epoch: int) -> Plan:
        n = self.num_rows
        order = permutation(n, self.epoch_seed(epoch)) if self.shuffle else np.arange(n, dtype=np.int64)
        sizes = fixed_sizes(n, self.batch_size, self.world_size, self.drop_last)
        kept = int(sizes.sum())
        reason = "incomplete_batch" if self.drop_last else "uneven_tail_too_few_rows_to_split"
        dropped = {reason: n - kept} if kept < n else {}
        return Plan.from_sizes(order, sizes, dropped=dropped)
