"""Counter-based randomness for kernels: SplitMix64 and seeded permutations.

Randomness enters a kernel as an integer seed, never as a numpy Generator (house style), so a plan is a pure
function of ``(seed, epoch, ...)``. SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", 2014) passes BigCrush and costs a few instructions per draw.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK63 = (1 << 63) - 1


@njit
def splitmix64(state: np.ndarray) -> np.uint64:
    """Advance ``state[0]`` (a uint64 array of length 1) and return the next 64-bit output."""
    state[0] += _GOLDEN
    z = state[0]
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit
def rand_below(state: np.ndarray, n: np.int64) -> np.int64:
    """Uniform integer in ``[0, n)`` (Lemire's multiply-shift; bias below 2**-32 for n < 2**32)."""
    r = splitmix64(state) >> np.uint64(32)
    return np.int64((r * np.uint64(n)) >> np.uint64(32))


@njit
def rand_uniform(state: np.ndarray) -> np.float64:
    """Uniform float in ``[0, 1)`` with 53 random bits."""
    return np.float64(splitmix64(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit
def _shuffle_inplace(a: np.ndarray, state: np.ndarray) -> None:
    for i in range(a.shape[0] - 1, 0, -1):
        j = rand_below(state, i + 1)
        t = a[i]
        a[i] = a[j]
        a[j] = t


@njit
def _permutation(n: np.int64, seed: np.uint64) -> np.ndarray:
    out = np.arange(n)
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    _shuffle_inplace(out, state)
    return out


@njit
def _shuffle_segments(a: np.ndarray, offsets: np.ndarray, seed: np.uint64) -> None:
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    for s in range(offsets.shape[0] - 1):
        _shuffle_inplace(a[offsets[s] : offsets[s + 1]], state)


def mix_seed(*parts: int) -> int:
    """Combine integers (seed, epoch, salt, ...) into one 63-bit seed, order-sensitive and well mixed."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h ^= (int(p) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)
        h &= 0xFFFFFFFFFFFFFFFF
        z = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h = z ^ (z >> 31)
    return h & _MASK63


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
