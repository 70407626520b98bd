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

from native.rng import mix_seed

__all__ = ["ImmiscibleCollate", "METHODS", "assign_linear", "knn_noise", "knn_noise_exact", "plain_noise"]

_PAIR_BLOCK = 1 << 14  # (a, r^2) candidate pairs per block in knn_noise_exact on the CPU
_DOT_BLOCK = 1 << 18  # fp32 values per block of row-wise dot products on the CPU
_DEFAULT_CHUNK = 1 << 22  # candidate values materialised at once by knn_noise (fp32: 16 MiB, ~32 MiB peak)


def _check_x(x: Any, name: str = "x") -> torch.Tensor:
    """Validate a float tensor [B, ...] with B >= 1 and return it flattened to [B, D] (a view when possible)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, ...] (got {type(x).__name__})")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64; got {x.dtype}); "
            f"convert with {name}.float()"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape [B, ...] with a batch dimension (got a 0-d tensor)")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one row (got an empty batch, shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} must have at least one value per row (got shape {tuple(x.shape)})")
    return x.reshape(x.shape[0], -1)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int >= 1 (got {type(k).__name__} {k!r})")
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k=})")
    return int(k)


def _check_finite(norms: torch.Tensor, name: str = "x") -> None:
    # The row norms are computed anyway; a NaN or inf anywhere in a row makes its norm non-finite.
    bad = torch.nonzero(~torch.isfinite(norms)).flatten()
    if bad.numel():
        raise ValueError(f"{name} has non-finite values (NaN or inf) in row(s) {bad[:5].tolist()}")


def plain_noise(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent N(0, I) noise shaped like ``x`` (the baseline every method is compared against).

    Args:
        x: float tensor [B, ...].
        generator: torch generator on ``x.device`` (None: the global one).

    Returns:
        Tensor of ``x``'s shape, dtype and device (drawn in fp32, then cast).
    """
    _check_x(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)


@torch.no_grad()
def assign_linear(
    x: torch.Tensor, noise: torch.Tensor | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Permute a batch of Gaussian noise to minimise the summed L2 distance to ``x`` (Immiscible Diffusion LA).

    The cost matrix ``C[i, j] = |x_i - noise_j|`` is computed in fp32 (fp64 GEMM on CUDA, so TF32 settings do
    not apply) and solved with ``scipy.optimize.linear_sum_assignment`` on the CPU. The result is a
    permutation of ``noise``'s rows, so as a multiset it is exactly the noise that was drawn. This solves one
    problem per call (per rank, per worker), not the reference's global problem across ranks (see the
    module docstring).

    Args:
        x: float tensor [B, ...] (images or latents), any float dtype, CPU or CUDA.
        noise: optional tensor of ``x``'s shape to permute; drawn as N(0, I) with ``generator`` if None.
            It is cast to ``x``'s dtype and device.
        generator: torch generator on ``x.device`` used when ``noise`` is None.

    Returns:
        Tensor of ``x``'s shape, dtype and device: ``noise[perm]`` for the optimal permutation ``perm``.

    Raises:
        TypeError: ``x`` or ``noise`` is not a floating-point tensor.
        ValueError: empty batch, non-finite values, or ``noise.shape != x.shape``.
    """
    from scipy.optimize import linear_sum_assignment

    xf = _check_x(x)
    if noise is None:
        noise = plain_noise(x, generator=generator)
    else:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            got = getattr(noise, "dtype", type(noise).__name__)
            raise TypeError(f"noise must be a floating-point torch.Tensor or None (got {got})")
        if tuple(noise.shape) != tuple(x.shape):
            raise ValueError(
                f"noise must have the shape of x (got noise.shape={tuple(noise.shape)}, x.shape={tuple(x.shape)})"
            )
        noise = noise.to(device=x.device, dtype=x.dtype)
    nf = noise.reshape(noise.shape[0], -1)
    # fp32 costs from the values actually returned; the GEMM in fp64 on CUDA (TF32 would cost ~3 digits).
    work = torch.float64 if x.device.type == "cuda" else torch.float32
    xw = xf.to(work)
    nw = nf.to(work)
    x2 = torch.linalg.vector_norm(xw, dim=1)
    n2 = torch.linalg.vector_norm(nw, dim=1)
    _check_finite(x2)
    _check_finite(n2, "noise")
    if xf.shape[0] == 1:
        return noise.clone()
    x2, n2 = x2.square_(), n2.square_()
    d2 = torch.addmm(x2[:, None] + n2[None, :], xw, nw.T, beta=1.0, alpha=-2.0)
    cost = d2.clamp_min_(0.0).sqrt_().to(torch.float32).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    perm = torch.from_numpy(cols.astype(np.int64)).to(x.device)
    return noise.index_select(0, perm)


@torch.no_grad()
def knn_noise(
    x: torch.Tensor, k: int, *, generator: torch.Generator | None = None, chunk: int = _DEFAULT_CHUNK
) -> torch.Tensor:
    """For each row of ``x``, draw ``k`` N(0, I) candidates and return the nearest one (brute force).

    Candidates are drawn in fp32 in blocks of at most ``chunk`` values (rows x candidates x D), so peak extra
    memory is about ``8 * chunk`` bytes whatever B, k and D are; distances ``|x_i - n|^2`` are summed in fp32
    from the exact differences (no matmul, so no TF32 on CUDA). The result for a given generator state depends
    on ``chunk`` (the draw order does), its law does not.

    Args:
        x: float tensor [B, ...], any float dtype, CPU or CUDA.
        k: candidates per row, ``>= 1`` (k = 1 is plain Gaussian noise).
        generator: torch generator on ``x.device`` (None: the global one).
        chunk: upper bound on candidate values materialised at once, ``>= 1``.

    Returns:
        Tensor of ``x``'s shape, dtype and device.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``k`` not an int.
        ValueError: ``k < 1``, ``chunk < 1``, empty batch or non-finite values.
    """
    xf = _check_x(x)
    k = _check_k(k)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1 (got {chunk=})")
    B, D = xf.shape
    x32 = xf.to(torch.float32)
    _check_finite(torch.linalg.vector_norm(x32, dim=1))
    out = torch.empty((B, D), dtype=torch.float32, device=x.device)
    k_step = max(1, min(k, chunk // D))
    rows = max(1, chunk // (k_step * D)) if k_step == k else 1
    for i0 in range(0, B, rows):
        xb = x32[i0 : i0 + rows, None, :]
        b = xb.shape[0]
        best_d = torch.full((b,), math.inf, dtype=torch.float32, device=x.device)
        best = out[i0 : i0 + b]
        for j0 in range(0, k, k_step):
            kc = min(k_step, k - j0)
            cand = torch.randn((b, kc, D), generator=generator, dtype=torch.float32, device=x.device)
            d = (cand - xb).square_().sum(dim=2)
            dmin, jmin = d.min(dim=1)
            if j0 == 0:
                best.copy_(cand[torch.arange(b, device=x.device), jmin])
                best_d = dmin
            else:
                better = dmin < best_d
                best.copy_(torch.where(better[:, None], cand[torch.arange(b, device=x.device), jmin], best))
                best_d = torch.minimum(dmin, best_d)
    return out.view(x.shape).to(x.dtype)


def _chi2(df: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Exact chi-square(df) draws, fp64 (Marsaglia and Tsang's gamma sampler, 2000), from ``generator``.

    torch's own gamma sampler takes no generator; this one does, so results are reproducible. The normal
    and uniform inputs are fp32 draws (as are brute-force candidates), the acceptance test is fp64 (it
    cancels badly in fp32 for large df). Only the few rejected entries (< 5 % for any df) are redrawn. For
    shape < 1, Gamma(a) is drawn as Gamma(a + 1) * U^(1/a).
    """
    if df == 0:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    alpha = df / 2.0
    a = alpha + 1.0 if alpha < 1.0 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)

    def propose(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(m, generator=generator, dtype=torch.float32, device=device).double()
        u = torch.rand(m, generator=generator, dtype=torch.float32, device=device).double()
        v = (1.0 + c * z).pow_(3)
        pos = v > 0
        logv = torch.where(pos, v, 1.0).log_()
        ok = pos & (u.log_() < 0.5 * z * z + d - d * v + d * logv)
        return v.mul_(d), ok

    n = math.prod(shape)
    out, ok = propose(n)
    todo = torch.nonzero(~ok).flatten()
    while todo.numel():
        val, ok = propose(todo.numel())
        out[todo[ok]] = val[ok]
        todo = todo[~ok]
    if alpha < 1.0:
        out *= torch.rand(n, generator=generator, dtype=torch.float64, device=device) ** (1.0 / alpha)
    return out.mul_(2.0).view(shape)


def _select_pairs(
    s: torch.Tensor, k: int, D: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, draw k pairs (a ~ N(0, 1), r^2 ~ chi2(D - 1)) and keep the one minimising (a - s)^2 + r^2.

    Rows go in blocks of about ``_PAIR_BLOCK`` candidates: small temporaries stay in cache and avoid the
    page faults that fresh multi-MB allocations cost on every call.

    Args:
        s: fp64 [B] row norms.

    Returns:
        (a*, r*): two fp64 [B] tensors, the selected projection and the selected orthogonal radius.
    """
    B = s.shape[0]
    a_sel = torch.empty(B, dtype=torch.float64, device=s.device)
    r_sel = torch.empty(B, dtype=torch.float64, device=s.device)
    rows = B if s.device.type == "cuda" else max(1, _PAIR_BLOCK // k)
    for i0 in range(0, B, rows):
        b = min(rows, B - i0)
        a = torch.randn((b, k), generator=generator, dtype=torch.float32, device=s.device).double()
        r2 = _chi2(D - 1, (b, k), generator, s.device)
        j = ((a - s[i0 : i0 + b, None]).square_() + r2).argmin(dim=1, keepdim=True)
        a_sel[i0 : i0 + b] = a.gather(1, j).squeeze(1)
        r_sel[i0 : i0 + b] = r2.gather(1, j).squeeze(1).sqrt_()
    return a_sel, r_sel


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two fp32 [B, D] tensors, as fp32 [B].

    CUDA: elementwise, so a TF32 matmul setting cannot touch it. CPU: in cache-sized blocks of at least two
    rows. A torch reduction with two or more outputs sums each output serially (threads split the outputs),
    so the result is bitwise the same for any thread count (loader workers run 1 thread, the main process
    several); a single-output reduction may be split across threads, hence no one-row blocks, and B = 1
    goes through a matmul. One whole-batch product would instead cost a B x D temporary and its page faults.
    """
    if a.device.type != "cpu":
        return torch.linalg.vecdot(a, b, dim=1)
    B, D = a.shape
    if B == 1:
        return (a @ b.T).view(1)
    out = torch.empty(B, dtype=torch.float32)
    rows = max(2, _DOT_BLOCK // D)
    starts = list(range(0, B, rows))
    if B - starts[-1] < 2:  # a one-row tail joins the previous block
        starts.pop()
    for i0, i1 in zip(starts, starts[1:] + [B]):
        torch.linalg.vecdot(a[i0:i1], b[i0:i1], dim=1, out=out[i0:i1])
    return out


@torch.no_grad()
def knn_noise_exact(x: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nearest-of-k Gaussian noise with the law of :func:`knn_noise`, at a cost independent of ``k``.

    Draws, per row, k pairs (a ~ N(0, 1), r^2 ~ chi2(D - 1)) in fp64, picks the pair minimising
    ``(a - |x|)^2 + r^2`` (the squared distance up to the constant), then builds the noise from one
    fp32 draw g ~ N(0, I): ``a* u + r* g_perp / |g_perp|`` with ``u = x / |x|`` (``e_0`` for rows x = 0,
    where the law is the same for every u). Cost: one ``randn(B, D)``, four memory passes and O(B k) scalars.

    Args:
        x: float tensor [B, ...], any float dtype, CPU or CUDA; rows may be zero.
        k: candidates per row, ``>= 1`` (k = 1 gives exactly N(0, I)).
        generator: torch generator on ``x.device`` (None: the global one).

    Returns:
        Tensor of ``x``'s shape, dtype and device.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``k`` not an int.
        ValueError: ``k < 1``, empty batch or non-finite values.
    """
    xf = _check_x(x)
    k = _check_k(k)
    B, D = xf.shape
    dev = x.device
    x32 = xf.to(torch.float32)
    s = torch.linalg.vector_norm(x32, dim=1)  # [B] fp32
    _check_finite(s)
    a_sel, r_sel = _select_pairs(s.to(torch.float64), k, D, generator)
    g = torch.randn((B, D), generator=generator, dtype=torch.float32, device=dev)
    zero = s == 0
    if bool(zero.any()):
        x32 = x32.clone() if x32 is xf else x32
        x32[zero] = 0.0
        x32[zero, 0] = 1.0
        s = torch.where(zero, torch.ones_like(s), s)
    # n = a* u + r* (g - (g.u) u) / |g - (g.u) u|, with u = x / s, written as alpha g + beta x in one pass.
    s64 = s.to(torch.float64)
    p = _rowdot(g, x32).to(torch.float64) / s64  # g.u
    g2 = torch.linalg.vector_norm(g, dim=1).to(torch.float64).square()
    gperp = (g2 - p * p).clamp_min(0.0).sqrt()
    alpha = torch.where(gperp > 0, r_sel / gperp.clamp_min(1e-300), torch.zeros_like(gperp))
    beta = (a_sel - alpha * p) / s64
    out = g.mul_(alpha.to(torch.float32)[:, None]).addcmul_(x32, beta.to(torch.float32)[:, None])
    return out.view(x.shape).to(x.dtype)


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
        self.k = _check_k(k)
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
        _check_x(x, f"batch[{self.key!r}]")
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
    return v  # _check_x reports what it is
