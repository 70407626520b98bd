"""Software prefetch for gather kernels: ask the CPU to start loading the next rows while this one is copied.

A batch gathers a few hundred rows at random places of a memory-mapped column. Each row is contiguous, but the
hardware prefetcher only ramps up a few cache lines into a row, so the first lines of every row are demand misses
(~100 ns each): a serial gather of 256 rows of ~600 int32 tokens measured ~2.5x a sequential copy of the same
bytes. Prefetching the row two ahead (``llvm.prefetch``, up to :data:`MAX_LINES` cache lines) while copying this
one overlapped those misses: ~20 % off the gather on this machine (``benchmarks/bench_loader.py``). The
prefetch is a hint: it never faults and changes no result.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from native._config import njit

__all__ = ["AHEAD", "MAX_LINES", "prefetch", "prefetch_row"]

#: rows ahead of the one being copied whose lines are requested
AHEAD = 2
#: cache lines requested per row (4 KiB: a row of ~1000 int32 tokens)
MAX_LINES = 64


@intrinsic
def prefetch(typingctx, arr, idx):
    """``llvm.prefetch`` of the cache line holding ``arr[idx]`` (read, high locality). A bare intrinsic: call it
    from Numba code only; ``idx`` must lie inside ``arr``."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def prefetch_row(offsets, values, r):
    """Request the first :data:`MAX_LINES` cache lines of row ``r`` of a ragged column (``offsets``, ``values``)."""
    a = offsets[r]
    n = offsets[r + 1] - a
    step = max(1, 64 // values.itemsize)
    for k in range(0, min(n, MAX_LINES * step), step):
        prefetch(values, a + k)
