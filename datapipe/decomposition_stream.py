"""The streaming local engine of the dataset decomposition: block by block, each block's outputs written as it goes.

"Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum" (Pouransari et al., NeurIPS
2024) over a corpus of any size on one machine, with the block kernels of ``native.decompose_blocks``:

1. :func:`plan_stream` reads the document lengths one block of rows at a time (a slice of a memory map: the
   dataset's ``index.arrow`` column or an ``.npy``), checks them, and keeps per block only where its outputs start
   (``scan_documents`` + ``plan_layout`` from the previous block's end): three ints per block.
2. :func:`write_stream` lays out ``pieces.arrow`` and ``sequences.arrow`` (:class:`ColumnTableFile`: header,
   footer and room for every column, sizes known from pass 1), then fills each block (``fill_block``) and writes
   its rows straight to their final places in the files.

Peak memory is one block's lengths, layout and outputs (~200 MiB of anonymous memory at the default 2^20 rows,
measured at 1e7-1e9 documents in ``benchmarks/bench_scale.py --decompose-section``), whatever the corpus size.
The files are byte for byte those of the in-memory path (``native.decompose.decompose_lengths`` and one
``write_table``): one record batch per table, so readers map each column as one numpy array.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from datapipe.decomposition_index import PIECE_COLUMNS, SEQUENCE_COLUMNS
from datapipe.format import new_hash
from native.decompose import REMAINDER_POLICIES, check_log2
from native.decompose_blocks import fill_block, plan_layout, scan_documents

__all__ = ["BLOCK_ROWS", "ColumnTableFile", "StreamPlan", "iter_blocks", "plan_stream", "stored_arrays",
           "write_stream"]

#: rows per block of the streaming engine: its memory is one block's outputs (on log-normal lengths with the
#: default buckets, ~2.4 pieces of 32 bytes and ~1.4 sequences of 24 bytes per row) and layout
BLOCK_ROWS = 1 << 20


@dataclass(frozen=True)
class StreamPlan:
    """Pass 1 of the streaming decomposition. ``edges``, ``piece``, ``rem``, ``pos``: int64 ``[B+1]``, for each
    block of rows its first row, first bucket piece (= bucket sequence), first remainder piece (counted after the
    bucket pieces) and concatenated tail position; their last entries are the totals."""

    edges: NDArray[np.int64]
    piece: NDArray[np.int64]
    rem: NDArray[np.int64]
    pos: NDArray[np.int64]
    min_log2: int
    max_log2: int
    remainder: str
    seed: int
    tokens: int
    tail_tokens: int
    nonempty_tails: int
    bare_documents: int

    @property
    def documents(self) -> int:
        return int(self.edges[-1])

    @property
    def num_full(self) -> int:
        return int(self.piece[-1])

    @property
    def num_rem_sequences(self) -> int:
        if self.remainder == "pack":
            return -(-self.tail_tokens >> self.min_log2)
        return int(self.rem[-1]) if self.remainder == "pad" else 0

    @property
    def num_pieces(self) -> int:
        return self.num_full + int(self.rem[-1])

    @property
    def num_sequences(self) -> int:
        return self.num_full + self.num_rem_sequences

    def counts(self) -> dict[str, int]:
        """Token and document counts, as ``decompose_lengths`` reports them."""
        n, drop = self.documents, self.remainder == "drop"
        dropped = self.tail_tokens if drop else 0
        return {"documents": n, "tokens": self.tokens, "kept_tokens": self.tokens - dropped,
                "dropped_tokens": dropped, "dropped_documents": self.bare_documents if drop else 0,
                "eos_kept": n - self.nonempty_tails if drop else n,
                "padded_tokens": 0 if drop else (self.num_rem_sequences << self.min_log2) - self.tail_tokens}


def _check_block(block, lo: int, lengths, edges, b: int, name: str) -> None:
    bad = np.flatnonzero(block < 1)
    if len(bad):
        # count the bad rows of the blocks left too, so the message says how many there are
        total = len(bad) + sum(int(np.count_nonzero(np.asarray(lengths[int(edges[c]):int(edges[c + 1])]) < 1))
                               for c in range(b + 1, len(edges) - 1))
        v = int(block[bad[0]])
        what = "negative" if v < 0 else "zero (an empty document has no tokens and no EOS)"
        raise ValueError(f"{name} has a {what} length {v} at row {lo + int(bad[0])} ({total} rows in all); remove "
                         "such documents first")


def plan_stream(lengths, *, min_log2: int = 8, max_log2: int = 13, remainder: str = "pack", seed: int = 0,
                block_rows: int = BLOCK_ROWS, name: str = "lengths") -> StreamPlan:
    """Pass 1: check the lengths and place every block's outputs, reading one block of rows at a time.

    Args:
        lengths: int ``[N]`` tokens per document (EOS included), ``>= 1``; any 1-D array that slices without
            copying the rest (a numpy memory map, the dataset's index column).
        min_log2, max_log2, remainder, seed: as in ``native.decompose.decompose_lengths``.
        block_rows: rows per block.
        name: what errors call ``lengths``.

    Raises:
        ValueError: bad parameters, a length ``<= 0`` (names the first such row and how many there are).
        TypeError: non-integer lengths.
    """
    min_log2, max_log2 = check_log2(min_log2, max_log2)
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    if not isinstance(block_rows, (int, np.integer)) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be an integer >= 1 (got {block_rows=})")
    shape, dtype = getattr(lengths, "shape", None), getattr(lengths, "dtype", None)
    if shape is None or dtype is None:
        lengths = np.asarray(lengths)
        shape, dtype = lengths.shape, lengths.dtype
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D (got shape {shape})")
    if np.dtype(dtype).kind not in "iu":
        raise TypeError(f"{name} must be integers (got dtype {dtype})")
    n = int(shape[0])
    nb = max(1, -(-n // int(block_rows)))
    edges = np.minimum(np.arange(nb + 1, dtype=np.int64) * int(block_rows), n)
    starts = np.zeros((3, nb + 1), np.int64)  # piece, remainder piece, tail position
    tokens = tail_tokens = nonempty = bare = 0
    for b in range(nb):
        lo, hi = int(edges[b]), int(edges[b + 1])
        block = np.asarray(lengths[lo:hi])
        _check_block(block, lo, lengths, edges, b, name)
        counts, tail = scan_documents(block, min_log2=min_log2, max_log2=max_log2, seed=seed, row_offset=lo)
        lay = plan_layout(counts, tail, min_log2=min_log2, remainder=remainder, start=tuple(starts[:, b]))
        starts[:, b + 1] = lay["piece_off"][-1], lay["tail_off"][-1], lay["tail_pos"][-1]
        tokens += int(block.sum(dtype=np.int64))
        tail_tokens += int(tail.sum())
        nonempty += int(np.count_nonzero(tail))
        bare += int(np.count_nonzero(counts == 0))
    return StreamPlan(edges, starts[0], starts[1], starts[2], min_log2, max_log2, remainder, int(seed), tokens,
                      tail_tokens, nonempty, bare)


@dataclass(frozen=True)
class StreamBlock:
    """One block's outputs: ``pieces`` and ``sequences`` are ``[(first position, {column: int64 array})]``, runs
    of consecutive rows of the two tables; ``bucket_pieces``: int64 ``[max_log2 + 1]`` bucket pieces per ``k``."""

    lo: int
    hi: int
    pieces: list[tuple[int, dict[str, NDArray[np.int64]]]]
    sequences: list[tuple[int, dict[str, NDArray[np.int64]]]]
    bucket_pieces: NDArray[np.int64]


def iter_blocks(lengths, plan: StreamPlan) -> Iterator[StreamBlock]:
    """Pass 2: each block of rows filled (``fill_block``) and cut into runs of the two tables' rows. Only the
    block yielded is held (drop it before asking for the next one to hold one block at a time)."""
    for b in range(len(plan.edges) - 1):
        yield _fill_stream_block(lengths, plan, b)


def _fill_stream_block(lengths, plan: StreamPlan, b: int) -> StreamBlock:
    nf, lo_k, cap = plan.num_full, plan.min_log2, 1 << plan.min_log2
    last_seq = plan.num_sequences - 1
    lo, hi = int(plan.edges[b]), int(plan.edges[b + 1])
    block = np.asarray(lengths[lo:hi])
    kw = {"min_log2": plan.min_log2, "max_log2": plan.max_log2, "seed": plan.seed}
    counts, tail = scan_documents(block, row_offset=lo, **kw)
    start = (int(plan.piece[b]), int(plan.rem[b]), int(plan.pos[b]))
    lay = plan_layout(counts, tail, min_log2=lo_k, remainder=plan.remainder, start=start, num_full=nf)
    if (lay["piece_off"][-1], lay["tail_off"][-1]) != (plan.piece[b + 1], plan.rem[b + 1]):
        raise AssertionError(f"block {b} (rows {lo}:{hi}) lays out differently than in pass 1")
    out = fill_block(block, lay, lo=lo, hi=hi, layout_base=lo, **kw)
    del block, counts, tail, lay  # the block's outputs are what it holds from here
    p0, r0 = start[0], nf + start[1]
    full_log2 = out["full_log2"]
    pieces = [(p0, {k: out[f"full_{k}"] for k in PIECE_COLUMNS}), (r0, {k: out[f"rem_{k}"] for k in PIECE_COLUMNS})]
    seqs = [(p0, {"log2": full_log2, "tokens": np.left_shift(1, full_log2, dtype=np.int64),
                  "first_piece": np.arange(p0, p0 + len(full_log2), dtype=np.int64)})]
    rs = out["rem_sequence"]
    if len(rs) and plan.remainder == "pad":  # one sequence per tail
        seqs.append((int(rs[0]), {"log2": np.full(len(rs), lo_k, np.int64), "tokens": out["rem_length"],
                                  "first_piece": r0 + np.arange(len(rs), dtype=np.int64)}))
    elif len(rs) and plan.remainder == "pack":  # a packed sequence starts where the tail position is k * cap
        new = np.empty(len(rs), bool)
        new[0] = start[2] % cap == 0
        np.not_equal(rs[1:], rs[:-1], out=new[1:])
        first = np.flatnonzero(new)
        ids = rs[first]
        if len(ids):
            tokens = np.full(len(ids), cap, np.int64)
            tokens[ids == last_seq] = plan.tail_tokens - (plan.num_rem_sequences - 1) * cap
            seqs.append((int(ids[0]), {"log2": np.full(len(ids), lo_k, np.int64), "tokens": tokens,
                                       "first_piece": r0 + first}))
    return StreamBlock(lo, hi, pieces, seqs, np.bincount(full_log2, minlength=plan.max_log2 + 1))


class _LayoutSink:
    """The file object pyarrow's IPC writer writes to while laying a :class:`ColumnTableFile` out: metadata is
    written, the placeholder column buffers are skipped (their offsets noted; the file gets a hole there)."""

    closed = False

    def __init__(self, fd: int, placeholder: int) -> None:
        self._fd, self._placeholder, self.pos, self.skipped = fd, placeholder, 0, []

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if isinstance(data, pa.Buffer) and data.address == self._placeholder:
            self.skipped.append((self.pos, n))
        else:
            _write_all(self._fd, memoryview(data).cast("B"), self.pos)
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):  # pwrite writes at most ~2 GiB per call
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class ColumnTableFile:
    """An Arrow IPC file of one record batch of ``rows`` int64 columns without nulls, laid out before its data
    exists and then filled in place, in any order, by :meth:`write`: byte for byte the file pyarrow's writer
    gives for the finished columns (``write_table`` of one batch), so readers map each column whole.

    The layout is pyarrow's own: its writer writes the table of placeholder columns (a never-touched anonymous
    memory map) to a sink that skips their buffers.
    """

    def __init__(self, path: str | os.PathLike, names: tuple[str, ...], rows: int) -> None:
        self.path, self.names, self.rows = Path(path), tuple(names), int(rows)
        schema = pa.schema([(n, pa.int64()) for n in self.names])
        placeholder = mmap.mmap(-1, max(8 * self.rows, 8), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            buf = pa.py_buffer(placeholder)
            sink = _LayoutSink(self._fd, buf.address)
            table = pa.table([pa.Array.from_buffers(pa.int64(), self.rows, [None, buf]) for _ in self.names],
                             schema=schema)
            with pa.PythonFile(sink, mode="w") as f, pa.ipc.new_file(f, schema) as w:
                w.write_table(table, max_chunksize=max(1, self.rows))
            del table, buf
            os.ftruncate(self._fd, sink.pos)
            self.size = sink.pos
            skipped = [s for s in sink.skipped if s[1]]
            if self.rows and (len(skipped) != len(self.names) or any(s[1] != 8 * self.rows for s in skipped)):
                raise AssertionError(f"{self.path}: pyarrow wrote the columns as {sink.skipped}, not one buffer each")
            self.offsets = {n: s[0] for n, s in zip(self.names, skipped)}
        except BaseException:
            self.close()
            raise
        finally:
            placeholder.close()
        self._written = dict.fromkeys(self.names, 0)

    def write(self, name: str, pos: int, values) -> None:
        """Rows ``pos : pos + len(values)`` of column ``name``."""
        arr = np.ascontiguousarray(values, dtype=np.int64)
        if not 0 <= pos <= pos + len(arr) <= self.rows:
            raise AssertionError(f"{self.path}: rows {pos}:{pos + len(arr)} of {name!r} are outside [0, {self.rows})")
        if len(arr):
            _write_all(self._fd, memoryview(arr).cast("B"), self.offsets[name] + 8 * pos)
            self._written[name] += len(arr)

    def finish(self) -> dict:
        """Sync and close the file; its manifest entry ``{file, rows, bytes, checksum}``."""
        missing = {k: self.rows - v for k, v in self._written.items() if v != self.rows}
        if missing:
            raise AssertionError(f"{self.path}: rows left unwritten (or written twice) per column: {missing}")
        os.fsync(self._fd)
        self.close()
        algo, h = new_hash()
        buf = bytearray(1 << 20)  # read back through one reused buffer: no allocation per read
        view = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        return {"file": self.path.name, "rows": self.rows, "bytes": self.size, "checksum": f"{algo}:{h.hexdigest()}"}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_block(tables: dict[str, ColumnTableFile], blk: StreamBlock) -> None:
    # a function of its own, so no loop variable keeps the block's arrays alive while the next one is filled
    for key, runs in (("pieces", blk.pieces), ("sequences", blk.sequences)):
        for pos, cols in runs:
            for name, values in cols.items():
                tables[key].write(name, pos, values)


def write_stream(lengths, out_dir: str | os.PathLike, plan: StreamPlan, *,
                 progress: Callable[[str, float], None] | None = None) -> dict:
    """Pass 2: write ``pieces.arrow`` and ``sequences.arrow`` of ``plan`` into ``out_dir``, block by block.

    Returns:
        dict: ``files`` (``{"pieces": entry, "sequences": entry}``, each ``{file, rows, bytes, checksum}``),
        ``num_pieces``, ``num_sequences``, ``buckets`` (``{k: {"sequences", "tokens"}}`` for ``min_log2 ..
        max_log2``) and ``counts`` (as ``decompose_lengths`` reports them).
    """
    out = Path(out_dir)
    tables = {"pieces": ColumnTableFile(out / "pieces.arrow", PIECE_COLUMNS, plan.num_pieces)}
    try:
        tables["sequences"] = ColumnTableFile(out / "sequences.arrow", SEQUENCE_COLUMNS, plan.num_sequences)
        per_k = np.zeros(plan.max_log2 + 1, np.int64)
        n = max(plan.documents, 1)
        for blk in iter_blocks(lengths, plan):
            _write_block(tables, blk)
            per_k += blk.bucket_pieces
            if progress:
                progress("decompose", blk.hi / n)
            del blk  # before the next block is filled: one block's outputs at a time
        files = {key: t.finish() for key, t in tables.items()}
    finally:
        for t in tables.values():
            t.close()
    seqs, toks = per_k.copy(), per_k << np.arange(len(per_k), dtype=np.int64)
    seqs[plan.min_log2] += plan.num_rem_sequences
    toks[plan.min_log2] += plan.tail_tokens if plan.remainder != "drop" else 0
    return {"files": files, "num_pieces": plan.num_pieces, "num_sequences": plan.num_sequences,
            "buckets": {str(k): {"sequences": int(seqs[k]), "tokens": int(toks[k])}
                        for k in range(plan.min_log2, plan.max_log2 + 1)},
            "counts": plan.counts()}


def stored_arrays(out_dir: str | os.PathLike) -> dict[str, NDArray[np.int64]]:
    """The arrays of ``decompose_lengths`` (pieces and per-sequence ones) read back from the two tables in
    ``out_dir``, memory-mapped (``sequence_offsets`` is the one copy)."""
    def table(name):
        return pa.ipc.open_file(pa.memory_map(str(Path(out_dir) / name), "r")).read_all()

    pieces, seqs = table("pieces.arrow"), table("sequences.arrow")
    col = {k: c.chunk(0).to_numpy() if c.num_chunks == 1 else c.to_numpy()
           for t in (pieces, seqs) for k, c in zip(t.column_names, t.columns)}
    return {**{k: col[k] for k in PIECE_COLUMNS}, "sequence_log2": col["log2"], "sequence_tokens": col["tokens"],
            "sequence_offsets": np.append(col["first_piece"], np.int64(pieces.num_rows))}
