"""Counter-based randomness for kernels: SplitMix64 and seeded permutations.

Randomness enters a kernel as an integer seed, never as a numpy Generator (house style), so a plan is a pure
function of ``(seed, epoch, ...)``. SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", 2014) passes BigCrush and costs a few instructions per draw.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit

__all__ = ["MASK63", "SPLITMIX_GAMMA", "SPLITMIX_M1", "SPLITMIX_M2", "fmix64", "mix_prefix", "mix_seed",
           "mix_step", "permutation", "rand_below", "rand_uniform", "shuffle_from", "shuffle_inplace",
           "shuffle_segments", "splitmix64", "splitmix64_at", "splitmix64_at_many", "splitmix64_next"]

# The one home of SplitMix64's constants: every kernel of ``native/`` that needs a hash or a stream imports them
# (or the functions below) from here. The Python ints serve the pure-Python seed fold (:func:`mix_prefix`),
# which must not depend on numpy's overflow warnings; the uint64 copies serve the kernels.
_GAMMA_INT = 0x9E3779B97F4A7C15
_M1_INT = 0xBF58476D1CE4E5B9
_M2_INT = 0x94D049BB133111EB
_U64 = 0xFFFFFFFFFFFFFFFF
_MIX_INIT = 0x243F6A8885A308D3
#: SplitMix64's increment (the golden-ratio "gamma").
SPLITMIX_GAMMA = np.uint64(_GAMMA_INT)
#: The two multipliers of SplitMix64's finaliser (Stafford's Mix13).
SPLITMIX_M1 = np.uint64(_M1_INT)
SPLITMIX_M2 = np.uint64(_M2_INT)
#: Keeps the low 63 bits: seeds handed to kernels are non-negative int64-safe.
MASK63 = np.uint64((1 << 63) - 1)
_MASK63 = (1 << 63) - 1


@njit(inline="always")
def fmix64(z: np.uint64) -> np.uint64:
    """SplitMix64's output finaliser: a bijective 64-bit mix of ``z``."""
    z = (z ^ (z >> np.uint64(30))) * SPLITMIX_M1
    z = (z ^ (z >> np.uint64(27))) * SPLITMIX_M2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def splitmix64_next(s: np.uint64) -> tuple[np.uint64, np.uint64]:
    """One SplitMix64 step with the state in a register: returns ``(new_state, output)``."""
    s = s + SPLITMIX_GAMMA
    return s, fmix64(s)


@njit(inline="always")
def splitmix64_at(seed: np.uint64, k: np.uint64) -> np.uint64:
    """Output ``k`` (from 0) of the SplitMix64 stream started at ``seed``, computed on its own (counter-based)."""
    return fmix64(seed + (k + np.uint64(1)) * SPLITMIX_GAMMA)


@njit
def _splitmix64_at_many(seed: np.uint64, keys: np.ndarray) -> np.ndarray:
    out = np.empty(keys.shape[0], dtype=np.uint64)
    for i in range(keys.shape[0]):
        out[i] = splitmix64_at(seed, np.uint64(keys[i]))
    return out


def splitmix64_at_many(seed: int, keys: NDArray[np.int64]) -> NDArray[np.uint64]:
    """:func:`splitmix64_at` for every key: uint64 ``[len(keys)]``, a pure function of ``(seed, key)``.

    Args:
        seed: any integer (taken modulo 2**64).
        keys: 1-D integer array (taken modulo 2**64).

    Returns:
        uint64 array of ``keys``' shape.
    """
    k = np.ascontiguousarray(keys, dtype=np.int64)
    if k.ndim != 1:
        raise ValueError(f"keys must be 1-D (got shape {k.shape})")
    return _splitmix64_at_many(np.uint64(int(seed) & _U64), k)


@njit
def splitmix64(state: np.ndarray) -> np.uint64:
    """Advance ``state[0]`` (a uint64 array of length 1) and return the next 64-bit output."""
    s, z = splitmix64_next(state[0])
    state[0] = s
    return z


@njit(inline="always")
def _below(z: np.uint64, n: np.int64) -> np.int64:
    # Lemire's multiply-shift on the high 32 bits of one output.
    return np.int64(((z >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@njit
def rand_below(state: np.ndarray, n: np.int64) -> np.int64:
    """Uniform integer in ``[0, n)`` (Lemire's multiply-shift; bias below 2**-32 for n < 2**32)."""
    return _below(splitmix64(state), n)


@njit
def rand_uniform(state: np.ndarray) -> np.float64:
    """Uniform float in ``[0, 1)`` with 53 random bits."""
    return np.float64(splitmix64(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit
def shuffle_from(a: np.ndarray, s: np.uint64) -> np.uint64:
    """Fisher-Yates shuffle of ``a`` in place, drawing from the SplitMix64 state ``s``; returns the new state.

    The one shuffle of ``native/``: ``shuffle_from(a, seed)`` is the same permutation as
    :func:`shuffle_inplace` with ``state[0] == seed``.
    """
    for i in range(a.shape[0] - 1, 0, -1):
        s, z = splitmix64_next(s)
        j = _below(z, i + 1)
        t = a[i]
        a[i] = a[j]
        a[j] = t
    return s


@njit
def shuffle_inplace(a: np.ndarray, state: np.ndarray) -> None:
    """Fisher-Yates shuffle of ``a`` in place, advancing ``state[0]`` (a uint64 array of length 1)."""
    state[0] = shuffle_from(a, state[0])


@njit
def _permutation(n: np.int64, seed: np.uint64) -> np.ndarray:
    out = np.arange(n)
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    shuffle_inplace(out, state)
    return out


@njit
def _shuffle_segments(a: np.ndarray, offsets: np.ndarray, seed: np.uint64) -> None:
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    for s in range(offsets.shape[0] - 1):
        shuffle_inplace(a[offsets[s] : offsets[s + 1]], state)


# ---- the one seed fold -------------------------------------------------------------------------------------
def mix_prefix(*parts: int) -> int:
    """The unmasked fold state of :func:`mix_seed`'s parts, to be continued in a kernel by :func:`mix_step`."""
    h = _MIX_INIT
    for p in parts:
        h ^= ((int(p) & _U64) + _GAMMA_INT + ((h << 6) & _U64) + (h >> 2)) & _U64
        z = (h + _GAMMA_INT) & _U64
        z = ((z ^ (z >> 30)) * _M1_INT) & _U64
        z = ((z ^ (z >> 27)) * _M2_INT) & _U64
        h = z ^ (z >> 31)
    return h


@njit
def mix_step(h: np.uint64, part: np.uint64) -> np.uint64:
    """One step of the fold in a kernel: ``mix_seed(*parts, p) == mix_step(mix_prefix(*parts), p) & (2**63-1)``."""
    h = h ^ (part + SPLITMIX_GAMMA + (h << np.uint64(6)) + (h >> np.uint64(2)))
    return fmix64(h + SPLITMIX_GAMMA)


def mix_seed(*parts: int) -> int:
    """Combine integers (seed, epoch, salt, ...) into one 63-bit seed, order-sensitive and well mixed."""
    return mix_prefix(*parts) & _MASK63


def permutation(n: int, seed: int) -> NDArray[np.int64]:
    """A seeded permutation of ``range(n)``.

    Args:
        n: number of elements, ``>= 0``.
        seed: any integer; the same seed gives the same permutation on every machine.

    Returns:
        int64 array of shape ``[n]``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n=})")
    return _permutation(np.int64(n), np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


def shuffle_segments(values: NDArray, offsets: NDArray[np.int64], seed: int) -> NDArray:
    """Shuffle each segment ``values[offsets[s]:offsets[s+1]]`` independently, returning a new array.

    Args:
        values: 1-D array.
        offsets: int64 array ``[S+1]``, non-decreasing, from 0 to ``len(values)``.
        seed: integer seed.

    Returns:
        array of ``values``' dtype and shape, each segment permuted.
    """
    out = np.array(values, copy=True)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(out):
        raise ValueError("offsets must be 1-D, start at 0 and end at len(values)")
    _shuffle_segments(out, offsets, np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    return out
