"""Numba set-up shared by every kernel: one place for the flags.

Kernels are compiled with ``cache=True`` so a second process (a DataLoader worker, the next test run) loads
machine code from ``__pycache__`` instead of recompiling. ``fastmath`` stays off: plans must be bitwise
reproducible for a seed, whatever the machine.
"""

from __future__ import annotations

import os

import numba

#: Flags every ``@njit`` in ``native/`` uses.
NJIT_FLAGS: dict = {"cache": os.environ.get("DATAPIPE_NUMBA_CACHE", "1") != "0", "nogil": True}


def njit(*args, **kwargs):
    """``numba.njit`` with the project's flags (cache, nogil); keyword arguments override them."""
    flags = {**NJIT_FLAGS, **kwargs}
    if args and callable(args[0]):
        return numba.njit(**flags)(args[0])
    return numba.njit(*args, **flags)
