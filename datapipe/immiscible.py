"""Immiscible noise assignment for diffusion and flow-matching training.

Implements "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment" (Li et al., NeurIPS
2024) and "Improved Immiscible Diffusion: Accelerate Diffusion Training by Reducing Its Miscibility" (2025):
instead of pairing each training image with an independent Gaussian noise, pair it with a *nearby* one.

- :func:`assign_linear` (LA, the 2024 paper): draw B noises and permute them to minimise the summed L2
  distance to the B images (``scipy.optimize.linear_sum_assignment`` on an fp32 cost matrix). The noise stays
  an exact N(0, I) multiset. Cost: a B x B x D GEMM plus an O(B^3) serial solve.
- :func:`knn_noise` (the 2025 paper): for each image draw k candidate noises and keep the nearest one.
  Purely local (works at B = 1); brute force costs B * k * D Gaussian draws.
- :func:`knn_noise_exact`: the same distribution as :func:`knn_noise`, at about the cost of one randn. For x of
  dimension D with unit direction u, a candidate n ~ N(0, I) splits into a = u.n ~ N(0, 1) and
  r^2 = |n - a u|^2 ~ chi2(D - 1), independent, with the direction of n - a u uniform on the sphere
  orthogonal to u. Since |x - n|^2 = |x|^2 - 2 a |x| + a^2 + r^2, the nearest of k candidates depends only on
  the k pairs (a, r^2): draw them (B * k scalars), pick the minimiser, then draw a single g ~ N(0, I) and return
  a* u + r* g_perp / |g_perp|. For x = 0 every direction u gives the same law, so u = e_0 is used.
- :class:`ImmiscibleCollate`: wraps a collate function and adds a ``noise`` tensor aligned with the batch,
  so a training loop changes one line.

This module is a collate-side tool (torch noise, no batch plan), so it lives in ``datapipe``; it was
``samplers.immiscible`` before, which still works for one release with a ``DeprecationWarning``.

Per-rank assignment: the reference gathers every rank's images on rank 0 and solves one global LA problem.
Here each rank (each loader worker, in fact) solves its own B x B problem: the global solve costs
O((W B)^3) serially, blocks every rank on a gather/scatter of full images each step, and ties the noise to
the global batch composition; per-rank LA keeps the exact-Gaussian multiset guarantee and needs no
communication. It gives a smaller distance reduction than the global problem would (the pool is B, not W B);
where more reduction is wanted, raise k in :func:`knn_noise_exact`, which is local and costs one
``randn(B, D)`` plus O(B k) scalar draws (flat in k while k is well below D / 4).

All distances are accumulated in fp32 (fp64 for the per-candidate scalars and for the CUDA cost GEMM, which
would otherwise be subject to TF32), for fp16/bf16 inputs too; the noise is returned in the input's dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import xxhash

from datapipe.immiscible_noise import assign_linear, check_k, check_x, knn_noise, knn_noise_exact, plain_noise
from native.rng import mix_seed

__all__ = ["ImmiscibleCollate", "METHODS", "assign_linear", "knn_noise", "knn_noise_exact", "plain_noise"]


def _knn_exact_method(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return knn_noise_exact(x, k, generator=generator)


def _knn_method(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return knn_noise(x, k, generator=generator)


def _linear_method(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return assign_linear(x, generator=generator)


def _plain_method(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return plain_noise(x, generator=generator)


#: method name -> fn(x, k, generator) -> noise; ``k`` is ignored by "linear" and "plain".
METHODS: dict[str, Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]] = {
    "knn-exact": _knn_exact_method,
    "knn": _knn_method,
    "linear": _linear_method,
    "plain": _plain_method,
}


def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


class ImmiscibleCollate:
    """Collate wrapper adding immiscible ``noise`` aligned with ``batch[key]``.

    ``noise[i]`` is the noise for ``batch[key][i]``, same shape and dtype. Each call draws from a fresh
    generator whose seed is a pure function of (seed, rank, epoch, the rows of the batch), never of torch's
    global RNG, of the worker or of how many calls came before, so the noise is the same whatever
    ``num_workers`` is, in whatever order batches are collated, and after a ``DataLoader`` resume:

    - when the samples carry their row indices (``samples.indices``, as the ``Batch`` that
      ``ArrowDataset.__getitems__`` returns does): ``mix_seed(seed, rank, epoch, 1, hash(indices))``;
    - otherwise the rows are known by their content: ``mix_seed(seed, rank, epoch, 0, hash(batch[key]))``
      (xxh3 of the values, dtype and shape). Two calls on the same rows in one epoch give the same noise.

    Call ``set_epoch`` before each epoch (or let the loader do it) so epochs draw new noise; with shuffled
    batches the row-keyed seed changes anyway. The rank is read when the object is built (in the training
    process, where torch.distributed is initialised), not in workers, which may not see the process group.

    Example:
        >>> collate = ImmiscibleCollate(default_collate, key="pixel_values", method="knn-exact", k=64)
        >>> loader = DataLoader(ds, batch_size=256, collate_fn=collate)
        >>> for batch in loader:
        ...     loss = model.loss(batch["pixel_values"], noise=batch["noise"])

    Args:
        base_collate: function from the loader's samples to a Mapping holding ``key``; None uses
            ``torch.utils.data.default_collate`` (for an ``ArrowDataset`` pass ``datapipe.collate.default``).
        key: the batch entry to draw noise for: a float tensor or numpy array [B, ...], or a list of equally
            shaped rows (stacked; the stacked tensor replaces the list in the output).
        method: one of ``METHODS``: "knn-exact" (default), "knn", "linear" or "plain".
        k: candidates per row for the KNN methods, ``>= 1`` (the papers use 4 for CIFAR-10 pixels and 64
            for Stable Diffusion latents).
        seed: base seed.
        rank: rank to mix into the seed; None reads torch.distributed (0 when not initialised).
        shape: per-row shape to view ``batch[key]`` as (e.g. ``(1, 8, 8)`` for images stored flat).
        noise_key: name of the added entry.
    """

    def __init__(
        self,
        base_collate: Callable[[Any], Mapping[str, Any]] | None = None,
        key: str = "pixel_values",
        method: str = "knn-exact",
        k: int = 4,
        seed: int = 0,
        *,
        rank: int | None = None,
        shape: tuple[int, ...] | None = None,
        noise_key: str = "noise",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)} (got {method=})")
        self.k = check_k(k)
        if base_collate is None:
            from torch.utils.data import default_collate

            base_collate = default_collate
        self.base_collate = base_collate
        self.key = key
        self.method = method
        self.seed = int(seed)
        self.rank = _dist_rank() if rank is None else int(rank)
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (got rank={self.rank})")
        self.shape = None if shape is None else tuple(int(d) for d in shape)
        self.noise_key = noise_key
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: the noise of every batch is drawn anew."""
        self.epoch = int(epoch)

    def _seed(self, samples: Any, x: torch.Tensor) -> int:
        indices = getattr(samples, "indices", None)
        if isinstance(indices, np.ndarray) and indices.dtype.kind in "iu":
            digest = hashlib.blake2b(np.ascontiguousarray(indices, dtype=np.int64).tobytes(), digest_size=8)
            return mix_seed(self.seed, self.rank, self.epoch, 1, int.from_bytes(digest.digest(), "little"))
        return mix_seed(self.seed, self.rank, self.epoch, 0, _content_key(x))

    def __call__(self, samples: Any) -> dict[str, Any]:
        batch = self.base_collate(samples)
        if not isinstance(batch, Mapping):
            raise TypeError(f"base_collate must return a Mapping holding {self.key!r} (got {type(batch).__name__})")
        if self.key not in batch:
            raise KeyError(f"batch has no entry {self.key!r} (entries: {sorted(batch)}); set key=")
        if self.noise_key in batch:
            raise ValueError(f"batch already has an entry {self.noise_key!r}; pick another noise_key")
        x = _as_tensor(batch[self.key], self.key)
        if self.shape is not None:
            if x.numel() != x.shape[0] * math.prod(self.shape):
                raise ValueError(f"batch[{self.key!r}] rows of shape {tuple(x.shape[1:])} cannot be viewed as "
                                 f"shape={self.shape}")
            x = x.reshape(x.shape[0], *self.shape)
        check_x(x, f"batch[{self.key!r}]")
        g = torch.Generator(device=x.device)
        g.manual_seed(self._seed(samples, x))
        out = dict(batch)
        out[self.key] = x
        out[self.noise_key] = METHODS[self.method](x, self.k, g)
        return out


def _content_key(x: torch.Tensor) -> int:
    """64-bit hash of a tensor's values, dtype and shape: identifies a batch by its rows."""
    h = xxhash.xxh3_64(f"{x.dtype}{tuple(x.shape)}".encode())
    flat = x.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).cpu().numpy().data)
    return h.intdigest()


def _as_tensor(v: Any, key: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    if isinstance(v, (list, tuple)) and v:
        rows = [r if isinstance(r, torch.Tensor) else torch.as_tensor(np.asarray(r)) for r in v]
        if len({tuple(r.shape) for r in rows}) != 1:
            raise ValueError(f"batch[{key!r}] rows differ in shape ({sorted({tuple(r.shape) for r in rows})[:3]}); "
                             "noise needs equally shaped rows")
        return torch.stack(rows)
    return v  # check_x reports what it is
