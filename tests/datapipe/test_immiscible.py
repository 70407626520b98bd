"""Tests for datapipe.immiscible (Immiscible Diffusion noise assignment: LA, KNN, exact KNN, collate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from scipy.stats import ks_2samp

from datapipe.immiscible import (
    ImmiscibleCollate,
    assign_linear,
    knn_noise,
    knn_noise_exact,
    plain_noise,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rows(x0: torch.Tensor, n: int) -> torch.Tensor:
    """n copies of the row x0 [D] as a batch [n, D]."""
    return x0[None, :].expand(n, -1).contiguous()


def _stats(x0: torch.Tensor, noise: torch.Tensor, v: torch.Tensor) -> dict[str, np.ndarray]:
    """Projection on u = x0/|x0|, on a fixed v orthogonal to u, and distance to x0, per sample."""
    u = x0 / x0.norm() if x0.norm() > 0 else torch.eye(len(x0))[0]
    return {
        "a": (noise.double() @ u.double()).numpy(),
        "v": (noise.double() @ v.double()).numpy(),
        "dist": (noise.double() - x0.double()).norm(dim=1).numpy(),
    }


def _orth(x0: torch.Tensor) -> torch.Tensor:
    v = torch.zeros_like(x0)
    v[-1] = 1.0
    if x0.norm() > 0:
        u = x0 / x0.norm()
        v = v - (v @ u) * u
    return v / v.norm()


# ---------------------------------------------------------------- statistical equivalence (the core claim)

N_KS = 4000


@pytest.mark.parametrize(
    ("D", "k", "scale"),
    [(8, 4, 2.0), (8, 16, 0.7), (3, 8, 1.5), (2, 4, 1.0), (32, 8, 5.0)],
)
def test_exact_matches_brute_force_ks(D: int, k: int, scale: float) -> None:
    x0 = torch.linspace(-1.0, 1.0, D) + 0.3
    x0 = x0 / x0.norm() * scale
    x = _rows(x0, N_KS)
    v = _orth(x0)
    exact = _stats(x0, knn_noise_exact(x, k, generator=_gen(1)), v)
    brute = _stats(x0, knn_noise(x, k, generator=_gen(2)), v)
    for name in ("a", "v", "dist"):
        p = ks_2samp(exact[name], brute[name]).pvalue
        assert p > 1e-3, f"{name}: exact vs brute KS p={p:.2e} (D={D}, k={k})"
    # both are really pulled toward x: the mean projection on u is clearly positive
    assert exact["a"].mean() > 0.2 and brute["a"].mean() > 0.2


@pytest.mark.parametrize(("k_exact", "k_brute"), [(4, 16), (2, 1)])
def test_ks_negative_control_rejects_wrong_k(k_exact: int, k_brute: int) -> None:
    """The KS check above has the power to reject a sampler with the wrong law."""
    D = 8
    x0 = torch.full((D,), 0.5)
    x = _rows(x0, N_KS)
    v = _orth(x0)
    exact = _stats(x0, knn_noise_exact(x, k_exact, generator=_gen(1)), v)
    brute = _stats(x0, knn_noise(x, k_brute, generator=_gen(2)), v)
    assert ks_2samp(exact["dist"], brute["dist"]).pvalue < 1e-6
    assert ks_2samp(exact["a"], brute["a"]).pvalue < 1e-6


def test_ks_negative_control_rejects_plain_noise() -> None:
    D = 8
    x0 = torch.full((D,), 0.5)
    x = _rows(x0, N_KS)
    exact = _stats(x0, knn_noise_exact(x, 4, generator=_gen(1)), _orth(x0))
    plain = _stats(x0, plain_noise(x, generator=_gen(2)), _orth(x0))
    assert ks_2samp(exact["dist"], plain["dist"]).pvalue < 1e-6


@pytest.mark.parametrize("D", [1, 2, 8])
def test_zero_rows_match_brute_force(D: int) -> None:
    x = torch.zeros(N_KS, D)
    exact = knn_noise_exact(x, 8, generator=_gen(3)).double()
    brute = knn_noise(x, 8, generator=_gen(4)).double()
    assert torch.isfinite(exact).all()
    assert ks_2samp(exact.norm(dim=1).numpy(), brute.norm(dim=1).numpy()).pvalue > 1e-3
    # no preferred direction: coordinate 0 (the stand-in u) and the last coordinate have the same law
    for j in {0, D - 1}:
        assert ks_2samp(exact[:, j].numpy(), brute[:, j].numpy()).pvalue > 1e-3


def test_zero_rows_mixed_with_nonzero_rows() -> None:
    x = torch.randn(64, 3, 4, 4, generator=_gen(0))
    x[::3] = 0.0
    n = knn_noise_exact(x, 16, generator=_gen(1))
    assert torch.isfinite(n).all() and n.shape == x.shape


def test_k1_is_standard_normal() -> None:
    x = torch.randn(N_KS, 6, generator=_gen(0)) * 3
    n = knn_noise_exact(x, 1, generator=_gen(1)).double()
    ref = torch.randn(N_KS * 6, generator=_gen(2)).double()
    assert ks_2samp(n.flatten().numpy(), ref.numpy()).pvalue > 1e-3


def _reference_nearest_of_k_sqnorm(k: int, D: int, s: float, n: int, seed: int) -> float:
    """numpy model of the selected candidate: E|n|^2 for the nearest of k, with |x| = s (independent code)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, k))
    r2 = rng.chisquare(D - 1, (n, k))
    j = ((a - s) ** 2 + r2).argmin(axis=1)
    return float((a[np.arange(n), j] ** 2 + r2[np.arange(n), j]).mean())


@pytest.mark.parametrize("fn", ["exact", "brute"])
def test_per_coordinate_variance_band_isotropic_data(fn: str) -> None:
    """With isotropic x the noise is isotropic: every coordinate has variance E|n|^2 / D and mean 0."""
    D, k, N, s = 16, 8, 6000, 4.0
    x = torch.randn(N, D, generator=_gen(5))
    x = x / x.norm(dim=1, keepdim=True) * s
    f = knn_noise_exact if fn == "exact" else knn_noise
    n = f(x, k, generator=_gen(6)).double()
    expected = _reference_nearest_of_k_sqnorm(k, D, s, 400_000, 0) / D
    assert expected < 0.97  # the band below really excludes plain N(0, I)
    var = n.var(dim=0).numpy()
    band = 5 * expected * np.sqrt(2 / N)
    assert np.all(np.abs(var - expected) < band), (var, expected, band)
    assert np.all(np.abs(n.mean(dim=0).numpy()) < 5 * np.sqrt(expected / N))


def test_la_per_coordinate_variance_band() -> None:
    B, D = 800, 12
    x = torch.randn(B, D, generator=_gen(7)) * 0.5 + 0.2
    noise = torch.randn(B, D, generator=_gen(8))
    out = assign_linear(x, noise)
    # a permutation leaves every coordinate's batch statistics unchanged ...
    torch.testing.assert_close(out.var(dim=0), noise.var(dim=0))
    # ... which are those of N(0, 1)
    var = assign_linear(x, generator=_gen(9)).var(dim=0).numpy()
    assert np.all(np.abs(var - 1) < 5 * np.sqrt(2 / B))


# ---------------------------------------------------------------- linear assignment

@pytest.mark.parametrize("dtype", FLOATS)
def test_la_returns_permutation_of_given_noise_and_is_optimal(dtype: torch.dtype) -> None:
    B = 40
    x = torch.randn(B, 2, 3, 4, generator=_gen(0)).to(dtype)
    noise = torch.randn(B, 2, 3, 4, generator=_gen(1)).to(dtype)
    out = assign_linear(x, noise)
    assert out.dtype == dtype and out.shape == x.shape
    flat_o, flat_n = out.reshape(B, -1).double(), noise.reshape(B, -1).double()
    match = (flat_o[:, None, :] == flat_n[None, :, :]).all(dim=2)
    perm = match.float().argmax(dim=1)
    assert match.any(dim=1).all() and sorted(perm.tolist()) == list(range(B))
    # optimal against an fp64 numpy reference solve
    xd = x.reshape(B, -1).double().numpy()
    nd = flat_n.numpy()
    cost = np.linalg.norm(xd[:, None, :] - nd[None, :, :], axis=2)
    r, c = linear_sum_assignment(cost)
    got = cost[np.arange(B), perm.numpy()].sum()
    assert got <= cost[r, c].sum() * (1 + 1e-5)
    assert got < cost[np.arange(B), np.arange(B)].sum()


def test_la_batch_of_one_and_noise_on_other_dtype() -> None:
    x = torch.randn(1, 5)
    noise = torch.randn(1, 5, dtype=torch.float64)
    out = assign_linear(x, noise)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, noise.float())


# ---------------------------------------------------------------- brute force against a plain reference

@pytest.mark.parametrize("chunk", [1 << 22, 7 * 5, 1])
def test_knn_brute_matches_reference_loop(chunk: int) -> None:
    """knn_noise returns exactly the nearest of the candidates it drew (replayed from the same seed)."""
    B, k, D = 6, 5, 7
    x = torch.randn(B, D, generator=_gen(0))
    out = knn_noise(x, k, generator=_gen(1), chunk=chunk)
    g = _gen(1)
    k_step = max(1, min(k, chunk // D))
    rows = max(1, chunk // (k_step * D)) if k_step == k else 1
    expected = torch.empty(B, D)
    for i0 in range(0, B, rows):
        b = min(rows, B - i0)
        cands = torch.cat(
            [torch.randn((b, min(k_step, k - j0), D), generator=g) for j0 in range(0, k, k_step)], dim=1
        )
        d = ((cands.double() - x[i0 : i0 + b, None].double()) ** 2).sum(-1)
        expected[i0 : i0 + b] = cands[torch.arange(b), d.argmin(1)]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- shapes, dtypes, devices, determinism

ALL = {
    "linear": lambda x, g: assign_linear(x, generator=g),
    "knn": lambda x, g: knn_noise(x, 4, generator=g),
    "knn-exact": lambda x, g: knn_noise_exact(x, 4, generator=g),
    "plain": lambda x, g: plain_noise(x, generator=g),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (5, 7), (1, 10), (3,)])
@pytest.mark.parametrize("name", sorted(ALL))
def test_shape_dtype_device_preserved(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> None:
    x = torch.randn(shape, generator=_gen(0)).to(device=device, dtype=dtype)
    out = ALL[name](x, _gen(1, device))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", sorted(ALL))
def test_deterministic_under_generator(name: str) -> None:
    x = torch.randn(16, 3, 4, 4, generator=_gen(0))
    a, b, c = (ALL[name](x, _gen(s)) for s in (11, 11, 12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("shape", [(300, 3, 32, 32), (2, 65536), (5, 7)])
@pytest.mark.parametrize("name", sorted(ALL))
def test_bitwise_same_noise_on_one_or_several_threads(name: str, shape: tuple[int, ...]) -> None:
    """Loader workers run 1 thread, the main process several: the noise must not depend on it."""
    x = torch.randn(shape, generator=_gen(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ALL[name](x, _gen(1))
        torch.set_num_threads(2)
        two = ALL[name](x, _gen(1))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_collate_accepts_numpy_batches() -> None:
    col = ImmiscibleCollate(lambda s: {"pixel_values": np.stack(s)}, k=4, seed=0, rank=0)
    batch = col([np.ones((2, 4), dtype=np.float32) * i for i in range(3)])
    assert isinstance(batch["noise"], torch.Tensor) and batch["noise"].shape == (3, 2, 4)


def test_fp16_large_d_distances_do_not_overflow() -> None:
    """D = 16384 in fp16: squared norms reach ~3e4 and the reference's fp16 costs near overflow; ours do not."""
    x = (torch.rand(8, 4, 64, 64, generator=_gen(0)) * 2 - 1).half()
    for f in (lambda: assign_linear(x, generator=_gen(1)), lambda: knn_noise_exact(x, 64, generator=_gen(1))):
        n = f()
        assert torch.isfinite(n.float()).all() and n.dtype == torch.float16


def test_knn_reduces_distance_more_with_larger_k() -> None:
    x = torch.rand(256, 3, 16, 16, generator=_gen(0)) * 2 - 1
    d = [(x - knn_noise_exact(x, k, generator=_gen(1))).flatten(1).norm(dim=1).mean().item() for k in (1, 4, 64)]
    assert d[0] > d[1] > d[2]


# ---------------------------------------------------------------- property tests

@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 12),
    D=st.integers(1, 40),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 30.0]),
)
def test_property_exact_and_la(B: int, D: int, k: int, seed: int, scale: float) -> None:
    x = torch.randn(B, D, generator=_gen(seed)) * scale
    n = knn_noise_exact(x, k, generator=_gen(seed + 1))
    assert n.shape == x.shape and torch.isfinite(n).all()
    noise = torch.randn(B, D, generator=_gen(seed + 2))
    la = assign_linear(x, noise)
    assert torch.equal(torch.sort(la.flatten()).values, torch.sort(noise.flatten()).values)
    assert (x - la).norm(dim=1).sum() <= (x - noise).norm(dim=1).sum() * (1 + 1e-5)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("fn", [knn_noise, knn_noise_exact])
@pytest.mark.parametrize(
    ("k", "err", "match"),
    [(0, ValueError, "k must be >= 1"), (-3, ValueError, "k must be >= 1"),
     (2.5, TypeError, "k must be an int"), (True, TypeError, "k must be an int")],
)
def test_bad_k(fn, k, err, match) -> None:
    with pytest.raises(err, match=match):
        fn(torch.randn(2, 3), k)


@pytest.mark.parametrize("name", sorted(ALL))
def test_bad_x(name: str) -> None:
    f = ALL[name]
    with pytest.raises(TypeError, match="floating-point"):
        f(torch.ones(2, 3, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="at least one row"):
        f(torch.empty(0, 3), None)
    with pytest.raises(TypeError, match="torch.Tensor"):
        f(np.ones((2, 3), dtype=np.float32), None)
    if name != "plain":
        bad = torch.randn(3, 4)
        bad[1, 2] = float("nan")
        with pytest.raises(ValueError, match=r"non-finite.*\[1\]"):
            f(bad, None)


def test_bad_noise_and_chunk() -> None:
    with pytest.raises(ValueError, match="noise must have the shape of x"):
        assign_linear(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(TypeError, match="noise must be a floating-point"):
        assign_linear(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk must be"):
        knn_noise(torch.randn(4, 3), 2, chunk=0)
