"""Immiscible noise draws (the functions behind :mod:`datapipe.immiscible`; see its docstring for the methods,
the papers and the per-rank design): :func:`assign_linear`, :func:`knn_noise`, :func:`knn_noise_exact`,
:func:`plain_noise`, and the input checks :func:`check_x` / :func:`check_k` the collate wrapper shares."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["assign_linear", "check_k", "check_x", "knn_noise", "knn_noise_exact", "plain_noise"]

_PAIR_BLOCK = 1 << 14  # (a, r^2) candidate pairs per block in knn_noise_exact on the CPU
_DOT_BLOCK = 1 << 18  # fp32 values per block of row-wise dot products on the CPU
_DEFAULT_CHUNK = 1 << 22  # candidate values materialised at once by knn_noise (fp32: 16 MiB, ~32 MiB peak)


def check_x(x: Any, name: str = "x") -> torch.Tensor:
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


def check_k(k: Any) -> int:
    """Validate a candidate count ``k`` (an int >= 1) and return it as an int."""
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
    check_x(x)
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

    xf = check_x(x)
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
    xf = check_x(x)
    k = check_k(k)
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
    xf = check_x(x)
    k = check_k(k)
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
