"""The Ray Data engine of the decomposition: the local kernels over Ray Data blocks, byte-identical output.

Dataset decomposition ("Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum",
Pouransari et al., NeurIPS 2024) at cluster scale. Two ``map_batches`` passes run the same Numba kernels as the
local engine (``native.decompose``):

1. ``scan``: per block, pieces per document and tail lengths (a document's size draws depend only on
   ``(seed, row)``, so a block needs nothing from the others);
2. the driver turns those counts into prefix sums (the layout: where each document's pieces go, which packed
   remainder sequence each tail lands in) and joins them to the rows;
3. ``fill``: per block, every piece written with its final position, sequence id and size.

The driver scatters the pieces by position into the same arrays the local engine builds, so the stored index
is byte-identical whatever the engine, the block count or the block order.

Ingest on Ray (:func:`map_ordered_ray`): the tokenizing tasks of ``datapipe.ingest`` (groups of files, row
ranges) run as Ray tasks, and their results come back in task order, so the shards are byte-identical to the
local engine's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from native.decompose_blocks import empty_output, fill_block, finish_output, plan_layout, scan_documents

__all__ = ["decompose_lengths_ray", "map_ordered_ray"]


def _scan_batch(batch: dict, *, min_log2: int, max_log2: int, seed: int) -> dict:
    rows = batch["row"]
    lo = int(rows[0])
    if not np.array_equal(rows, np.arange(lo, lo + len(rows))):  # internal invariant of from_arrow slices
        raise AssertionError("a Ray block holds non-contiguous rows")
    counts, tail = scan_documents(batch["length"], min_log2=min_log2, max_log2=max_log2, seed=seed, row_offset=lo)
    return {"row": rows, "count": counts, "tail": tail}


def _fill_batch(batch: dict, *, min_log2: int, max_log2: int, seed: int, remainder: str, num_full: int) -> dict:
    rows = batch["row"]
    lo, n = int(rows[0]), len(rows)
    # a block-local layout: offsets of its rows plus the end of its last row, in global coordinates
    cat = np.concatenate
    layout = {"piece_off": cat([batch["piece_off"], batch["piece_end"][-1:]]),
              "tail_off": cat([batch["tail_off"], batch["tail_end"][-1:]]),
              "tail_pos": cat([batch["tail_pos"], batch["tail_pos_end"][-1:]]),
              "num_full": num_full, "remainder": remainder}
    blk = fill_block(batch["length"], layout, lo=lo, hi=lo + n, min_log2=min_log2, max_log2=max_log2, seed=seed,
                     layout_base=lo)
    po, to = layout["piece_off"], layout["tail_off"]
    nf = len(blk["full_row"])
    full_pos = np.arange(po[0], po[0] + nf, dtype=np.int64)
    rem_pos = num_full + np.arange(to[0], to[0] + len(blk["rem_row"]), dtype=np.int64)
    return {"pos": cat([full_pos, rem_pos]), "row": cat([blk["full_row"], blk["rem_row"]]),
            "start": cat([blk["full_start"], blk["rem_start"]]), "length": cat([blk["full_length"], blk["rem_length"]]),
            "sequence": cat([blk["full_sequence"], blk["rem_sequence"]]),
            "log2": cat([blk["full_log2"], np.full(len(blk["rem_row"]), -1, np.int64)])}


def _blocks(table: pa.Table, num_blocks: int) -> list[pa.Table]:
    n = table.num_rows
    edges = np.linspace(0, n, num_blocks + 1).astype(np.int64)
    return [table.slice(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def decompose_lengths_ray(lengths, *, min_log2: int = 8, max_log2: int = 13, remainder: str = "pack",
                          seed: int = 0, ray_address: str | None = None, num_blocks: int | None = None) -> dict:
    """``native.decompose.decompose_lengths`` on Ray Data; the same dict, byte for byte.

    Uses the running Ray session when there is one; else starts one (``ray.init(address=ray_address)``: a
    local cluster when ``ray_address`` is None) and shuts it down at the end.

    Args:
        lengths: int64 ``[N]`` validated document lengths.
        min_log2, max_log2, remainder, seed: as in ``decompose_lengths``.
        ray_address: address of an existing cluster (``"auto"``, ``"ray://host:10001"``), or None.
        num_blocks: Ray Data blocks (default: twice the cluster's CPUs, at most one per 1,000 rows).
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        n = len(lengths)
        if num_blocks is None:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            num_blocks = max(1, min(2 * cpus, -(-n // 1000)))
        table = pa.table({"row": np.arange(n, dtype=np.int64), "length": lengths})
        kw = {"min_log2": int(min_log2), "max_log2": int(max_log2), "seed": int(seed)}
        ds = ray.data.from_arrow(_blocks(table, int(num_blocks)))
        counts = np.empty(n, np.int64)
        tail = np.empty(n, np.int64)
        for b in ds.map_batches(_scan_batch, batch_size=None, batch_format="numpy", fn_kwargs=kw,
                                zero_copy_batch=True).iter_batches(batch_size=None, batch_format="numpy"):
            counts[b["row"]] = b["count"]
            tail[b["row"]] = b["tail"]
        layout = plan_layout(counts, tail, min_log2=min_log2, remainder=remainder)
        po, to, tp = layout["piece_off"], layout["tail_off"], layout["tail_pos"]
        table = table.append_column("piece_off", pa.array(po[:-1])).append_column("piece_end", pa.array(po[1:]))
        table = table.append_column("tail_off", pa.array(to[:-1])).append_column("tail_end", pa.array(to[1:]))
        table = table.append_column("tail_pos", pa.array(tp[:-1])).append_column("tail_pos_end", pa.array(tp[1:]))
        out = empty_output(layout)
        nf = layout["num_full"]
        fkw = dict(kw, remainder=remainder, num_full=nf)
        ds = ray.data.from_arrow(_blocks(table, int(num_blocks)))
        for b in ds.map_batches(_fill_batch, batch_size=None, batch_format="numpy", fn_kwargs=fkw,
                                zero_copy_batch=True).iter_batches(batch_size=None, batch_format="numpy"):
            pos = b["pos"]
            for k in ("row", "start", "length", "sequence"):
                out[k][pos] = b[k]
            full = b["log2"] >= 0
            out["sequence_log2"][b["sequence"][full]] = b["log2"][full]
        return finish_output(out, layout, lengths, counts, tail)
    finally:
        if started:
            ray.shutdown()


def map_ordered_ray(fn: Callable, items: Iterable, shared, *, ray_address: str | None = None,
                    max_in_flight: int | None = None) -> Iterator:
    """``fn(item, shared)`` for every item as Ray tasks; results yielded in the order of ``items``.

    ``shared`` (a tokenizer and options) is put in the object store once. At most ``max_in_flight`` tasks
    (default: twice the cluster's CPUs) are pending, so results are not all held at once. Uses the running Ray
    session when there is one; else starts one (``ray.init(address=ray_address)``: a local cluster when
    ``ray_address`` is None) and shuts it down when the generator finishes or is closed. A task's exception is
    re-raised as itself (not wrapped in ``RayTaskError``).

    Args:
        fn: a module-level function (workers import it by name).
        items: task descriptions (picklable), consumed lazily.
        shared: the second argument of every call.
        ray_address: address of an existing cluster (``"auto"``, ``"ray://host:10001"``), or None.
        max_in_flight: bound on pending tasks.
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        if max_in_flight is None:
            max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(fn)
        ref = ray.put(shared)
        window: deque = deque()

        def get(r):
            try:
                return ray.get(r)
            except ray.exceptions.RayTaskError as e:  # the task's own error (a DatasetError naming the file)
                cause = getattr(e, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise

        try:
            for item in items:
                window.append(remote.remote(item, ref))
                if len(window) >= max_in_flight:
                    yield get(window.popleft())
            while window:
                yield get(window.popleft())
        finally:
            for r in window:
                ray.cancel(r)
    finally:
        if started:
            ray.shutdown()
