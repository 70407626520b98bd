""":class:`samplers.ShapedMixtureBatchSampler` above :data:`EXACT_MAX_ROWS` rows: per-group tables by chunked
passes and the rows of each group in a memory-mapped file, so 1e9 memory-mapped rows cost a rank megabytes.

Below the threshold the sampler keeps today's in-RAM arrays (the metadata as float64, the rows sorted by group by an
argsort). Above it, each domain is a :class:`RowSource`: its metadata as given (a memory map stays one) and how a
row's group and size follow from it (given group ids, or a length/duration and bucket boundaries):

* :func:`scan`: one pass over a domain, :data:`SCAN_ROWS` rows at a time (``native.shaped_scan``), gives the rows
  and units of every group, the rows left out and the longest row of the open bucket, and checks every row (an
  error names the array, the row and the fix). Units are added in row order, as ``np.bincount`` adds them, so the
  tables are bitwise those of the in-RAM path. The result is kept by ``samplers.plan_cache`` (in the process, and
  on disk for a memory-mapped file), so a resume in a fresh process skips the pass.
* :class:`RowsIndex`: the rows of each group, domain after domain, in row order, i.e. exactly what the in-RAM
  path's stable argsort gives. ``group + 1`` of every row is written into a memory-mapped file by the same pass
  that counts (:func:`group_file`: uint8 for < 255 groups; kept in ``plan_cache.cache_dir()`` keyed by the
  metadata files' identities, written once per node under a file lock, checked at ``plan_cache.spot_positions`` when
  opened again), which ``samplers.topic_windowed.cluster_index`` sorts by counting to a memory-mapped "rows by
  cluster" file (cached the same way; the directory keeps the newest two of each kind, so a node runs at most two
  such samplers over different metadata without sorting again). A single group with no row left out
  (``from_rows``) needs no file: group 0 is every row. Without a disk cache (``DATAPIPE_PLAN_CACHE=0``) or for
  metadata in memory, both files are unlinked temporary files (1 + 4 bytes per row on ``$TMPDIR``).

So the plan above the threshold is the plan below it (same tables, same rows in each group's stream, same Feistel
streams), except where bins are *estimated* (``from_lengths``/``from_durations`` without explicit bins): they come
from an evenly strided sample of :data:`SAMPLE_ROWS` values (every value when there are no more), as
``DurationBucketSampler`` does at scale. Memory: the counters (16 B per group id up to the largest), chunk
temporaries, the bins' sample (``SAMPLE_ROWS`` float64 values and the sorts of the estimate: ~200 MiB at the peak),
and the memory maps' page cache; nothing per row (1e9 rows: a peak of 193 MiB anonymous, ``bench_scale``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from native.shaped_scan import BAD_GROUP, BIG_GROUP, scan_buckets, scan_groups
from samplers.base import digest_array
from samplers.plan_cache import (KEEP_BIG_FILES, PlanCache, StalePlanCache, cache_dir, file_identity, lock_path,
                                  locked, prune_files, source_id, spot_positions, write_mapped)

__all__ = ["EXACT_MAX_ROWS", "MAX_GROUP", "SAMPLE_ROWS", "SCAN_ROWS", "RowSource", "RowsIndex",
           "at_scale", "estimated_bins", "group_file", "groups_source", "present_groups_of", "rows_index", "scan",
           "scan_all"]

#: rows (all domains together) above which the chunked path is taken
EXACT_MAX_ROWS = 1 << 22
#: rows read per step of a pass (float64 temporaries of 32 MiB at most)
SCAN_ROWS = 1 << 22
#: values in the evenly strided sample that estimated bins come from
SAMPLE_ROWS = 1 << 22
#: group ids above this (given groups, above the threshold) must be renumbered: one counter per id value
MAX_GROUP = (1 << 20) - 1

_SCANS = PlanCache("shaped_scan", keep=16)
_INDEXES: OrderedDict = OrderedDict()


@dataclasses.dataclass(frozen=True, eq=False)
class RowSource:
    """One domain's rows, read chunk by chunk: its group ids (``groups``, optional per-row ``sizes``), or a
    length/duration per row (``values``) bucketed by ``bins`` under a ``budget``, or ``n`` rows of group 0.

    Attributes:
        n: rows of the domain.
        name: how errors name the array, e.g. ``"groups[1] (domain 'code')"``.
        groups: integer ``[n]`` group ids (``-1``: left out), or None.
        sizes: numbers ``[n]``: units of each row of ``groups``; for ``values``, the values are the units.
        values: numbers ``[n]`` lengths or durations, bucketed (``bins`` is then set), or None.
        bins: float64 ``[K - 1]`` increasing bucket boundaries (bucket ``i``: ``bins[i-1] < v <= bins[i]``).
        budget: rows costing more are left out (cost ``v``, or ``v + v^2 / quadratic``).
        quadratic: ``q`` of the quadratic cost, 0 for a linear cost.
        floor: values below 1 count as 1 (lengths).
        check_sizes: sizes must be finite and ``> 0`` (off for a decomposition's token counts).
    """

    n: int
    name: str
    groups: Any = None
    sizes: Any = None
    values: Any = None
    bins: Any = None
    budget: float = math.inf
    quadratic: float = 0.0
    floor: bool = False
    check_sizes: bool = True

    @property
    def main(self):
        """The array whose file keys the disk caches (None for plain rows)."""
        return self.groups if self.groups is not None else self.values if self.values is not None else self.sizes

    def key(self) -> tuple:
        """What the domain's tables are a function of (the arrays by identity and digest, the bucketing); computed
        once per source (a digest reads a few MB)."""
        key = self.__dict__.get("_key")
        if key is None:
            def ident(a):
                return None if a is None else (source_id(a), digest_array(a))
            key = (self.n, ident(self.groups), ident(self.sizes), ident(self.values),
                   None if self.bins is None else tuple(float(b) for b in self.bins), float(self.budget),
                   float(self.quadratic), bool(self.floor), bool(self.check_sizes))
            self.__dict__["_key"] = key  # a frozen dataclass: its fields stay as given
        return key

    def groups_at(self, rows: NDArray[np.int64]) -> NDArray[np.int64]:
        """The group of each of ``rows`` (numpy, for checks of a cached file)."""
        if self.groups is not None:
            return np.asarray(self.groups[rows], dtype=np.int64)
        if self.values is None:
            return np.zeros(len(rows), dtype=np.int64)
        v = np.asarray(self.values[rows], dtype=np.float64)
        if self.floor:
            v = np.maximum(v, 1.0)
        cost = v if self.quadratic == 0 else v + v * v / self.quadratic
        g = np.searchsorted(self.bins, v, side="left").astype(np.int64)
        g[cost > self.budget] = -1
        return g


def at_scale(groups: Sequence) -> bool:
    """Whether a sampler over these per-domain groups takes the chunked path."""
    return any(isinstance(g, RowSource) for g in groups) or sum(len(g) for g in groups) > EXACT_MAX_ROWS


def _top(src: RowSource) -> int:
    """Counters a pass keeps: one per group id that can occur (plus the left-out rows)."""
    if src.groups is None:
        return 1 if src.values is None else len(src.bins) + 1
    dt = np.asarray(src.groups[:0]).dtype
    if dt.kind not in "iu":
        raise TypeError(f"{src.name} must be a 1-D integer array (got {dt})")
    return int(min(MAX_GROUP, np.iinfo(dt).max)) + 1 if dt.itemsize <= 2 else MAX_GROUP + 1


def _raise(src: RowSource, row: int, code: int) -> None:
    if code == BAD_GROUP:
        raise ValueError(f"{src.name} has {int(src.groups[row])} at row {row}; groups are >= 0, or -1 to leave a row "
                         "out")
    if code == BIG_GROUP:
        raise ValueError(f"{src.name} has group {int(src.groups[row])} at row {row}: above EXACT_MAX_ROWS rows group "
                         f"ids must be <= {MAX_GROUP}; renumber them densely, e.g. np.unique(groups, "
                         "return_inverse=True)[1]")
    what = src.sizes if src.groups is not None else src.values
    raise ValueError(f"{src.name.replace('groups', 'sizes', 1) if src.groups is not None else src.name} must be "
                     f"finite and > 0: row {row} has {what[row]}; fix the metadata or leave the row out")


def _pass(src: RowSource, out=None) -> dict:
    """One pass over the domain: counts, units and the open bucket's longest row (and, with ``out``, each row's
    ``group + 1`` written to it, 0 for a row left out)."""
    top = _top(src)
    counts = np.zeros(top + 1, dtype=np.int64)
    units = np.zeros(top + 1, dtype=np.float64)
    longest = np.full(1, -np.inf)
    plain = src.main is None  # n rows of group 0
    if plain:
        counts[1] = src.n
        if out is not None:
            out[:] = 1
    for a in range(0, 0 if plain else src.n, SCAN_ROWS):
        b = min(src.n, a + SCAN_ROWS)
        o = None if out is None else out[a:b]
        if src.groups is not None:
            row, code = scan_groups(src.groups[a:b], None if src.sizes is None else src.sizes[a:b], counts, units,
                                    check_sizes=src.check_sizes, out=o)
        else:
            vals = src.values if src.values is not None else src.sizes
            bins = src.bins if src.bins is not None else np.zeros(0)
            row, code = scan_buckets(vals[a:b], bins, src.budget, src.quadratic, src.floor, counts, units, longest,
                                     out=o)
        if row >= 0:
            _raise(src, a + row, code)
    last = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 1
    return {"counts": counts[:last], "units": units[:last], "longest": float(longest[0])}


def _checked(src: RowSource, tables: dict) -> dict:
    if int(np.asarray(tables["counts"]).sum()) != src.n:
        _SCANS.forget(("scan", src.key()), src.main)
        raise StalePlanCache(f"the counting pass cached in {tables.get('cache_file')} counts "
                             f"{int(np.asarray(tables['counts']).sum())} rows but {src.name} has {src.n} (a damaged "
                             "cache entry); the entry was removed: build the sampler again")
    return tables


def scan(src: RowSource) -> dict:
    """The domain's tables: ``counts`` int64 ``[L + 1]`` (``counts[0]``: rows left out, ``counts[g + 1]``: rows of
    group ``g``), ``units`` float64 ``[L + 1]`` (units of each group, 0 without sizes), ``longest`` (the largest
    value of the open bucket, ``-inf`` if none). Computed once per metadata (plan cache: also across processes for
    a memory-mapped file).

    Raises:
        ValueError: a group below -1 or above :data:`MAX_GROUP`, a kept row's size not finite or not > 0 (the
            first such row is named).
    """
    return _checked(src, _SCANS.memo(("scan", src.key()), src.main, lambda: _pass(src)))


def scan_all(sources: Sequence[RowSource]) -> list[dict]:
    """:func:`scan` of every domain; when a pass is due and the rows will need a group file (groups given, or
    buckets), the pass writes it too (:func:`group_file`), so the metadata is read once."""
    cached = [_SCANS.get(("scan", src.key()), src.main) for src in sources]
    if any(t is None for t in cached) and _needs_file(sources) and max(_top(s) for s in sources) <= 65535:
        group_file(sources)  # puts every domain's tables
    # wide group ids (int32/int64 arrays): counted first, so the file takes the dtype of the ids that occur
    return [scan(src) for src in sources]


def present_groups_of(tables: Sequence[dict]) -> list[int]:
    """The groups (``>= 0``) with rows in any domain, ascending."""
    seen: set[int] = set()
    for t in tables:
        seen.update((np.flatnonzero(np.asarray(t["counts"])[1:])).tolist())
    return sorted(seen)


def estimated_bins(values: Sequence, *, floor: bool, budget: float, quadratic: float, num_buckets: int
                   ) -> NDArray[np.float64]:
    """Bucket boundaries of equal total value (``samplers.bins.estimate_duration_bins``) over the rows that fit the
    budget in an evenly strided sample: every ``ceil(N / SAMPLE_ROWS)``-th value of the domains, one domain after
    the other (floored at 1 with ``floor``), i.e. every value when ``N <= SAMPLE_ROWS`` (the in-RAM path's bins).
    Kept in the plan cache (a fresh process skips the strided read)."""
    from samplers.bins import estimate_duration_bins

    n = sum(len(v) for v in values)
    step = max(1, -(-n // SAMPLE_ROWS))

    def compute() -> dict:
        parts = [np.asarray(v[::step], dtype=np.float64) for v in values]
        sample = np.concatenate(parts) if parts else np.zeros(0)
        if floor:
            sample = np.maximum(sample, 1.0)
        cost = sample if not quadratic else sample + sample * sample / quadratic
        fits = sample[cost <= budget]
        if not len(fits):
            raise ValueError(f"no row fits the budget {budget} (every row costs more); raise the budget")
        return {"bins": estimate_duration_bins(fits, num_buckets=num_buckets)}

    key = ("bins", step, tuple((source_id(v), digest_array(v)) for v in values), bool(floor), float(budget),
           float(quadratic), int(num_buckets))
    return np.asarray(_SCANS.memo(key, values[0] if len(values) else None, compute)["bins"], dtype=np.float64)


# ---- rows by group -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RowsIndex:
    """The rows of each dense group, domain after domain, in row order (the in-RAM path's ``_rows_by_group``).

    Attributes:
        starts: int64 ``[G]`` where dense group ``g``'s rows start in ``rows`` (or, without ``rows``, its first row).
        rows: int32/int64 memory map of the global rows sorted by group, or None (group ``g``'s ``k``-th row is
            ``starts[g] + k``).
        path: the group file behind the sort ("" for none or a temporary file).
    """

    starts: NDArray[np.int64]
    rows: NDArray | None
    path: str = ""

    def take(self, g: int, pos: NDArray[np.int64]) -> NDArray[np.int64]:
        """Global rows at positions ``pos`` of dense group ``g``: int64 ``[len(pos)]``."""
        at = np.asarray(pos, dtype=np.int64) + self.starts[g]
        return at if self.rows is None else np.asarray(self.rows[at], dtype=np.int64)


def _needs_file(sources: Sequence[RowSource]) -> bool:
    """Whether rows can fall in more than one group (or be left out): groups given, or bucket boundaries."""
    return any(s.groups is not None or (s.values is not None and (len(s.bins) or np.isfinite(s.budget)))
               for s in sources)


def _file_dtype(sources: Sequence[RowSource]) -> np.dtype:
    """The dtype for ``group + 1``: what the sources' dtypes (or bins) allow, up to uint16; past that, from the
    counted groups (the tables are then counted before the file is written)."""
    tops = []
    for s in sources:
        t = _SCANS.get(("scan", s.key()), s.main) if _top(s) > 65535 else None
        tops.append(_top(s) if t is None else len(t["counts"]) - 1)
    top = max(tops)
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32)


def _write(sources: Sequence[RowSource], out) -> None:
    """One pass over every domain writing ``group + 1`` of each global row to ``out``; the tables it counts go to
    the plan cache (and must match entries already there)."""
    at = 0
    for src in sources:
        tables = _pass(src, out[at : at + src.n])
        old = _SCANS.get(("scan", src.key()), src.main)
        if old is not None and not (np.array_equal(old["counts"], tables["counts"]) and
                                    np.array_equal(old["units"], tables["units"])):
            _SCANS.forget(("scan", src.key()), src.main)
            raise StalePlanCache(f"the counting pass cached in {old.get('cache_file')} does not match {src.name} (a "
                                 "damaged cache entry); the entry was removed: build the sampler again")
        if old is None:
            _SCANS.put(("scan", src.key()), tables, src.main)
        at += src.n


def _check_file(sources: Sequence[RowSource], ids, path: Path) -> None:
    """A cached group file must give the metadata's groups at ``plan_cache.spot_positions``."""
    n = len(ids)
    pos = spot_positions(n)
    want = np.empty(len(pos), dtype=np.int64)
    at = 0
    for src in sources:
        sel = (pos >= at) & (pos < at + src.n)
        want[sel] = src.groups_at(pos[sel] - at) + 1
        at += src.n
    if not np.array_equal(np.asarray(ids[pos], dtype=np.int64), want):
        path.unlink(missing_ok=True)
        raise StalePlanCache(f"the group file {path} does not match the metadata (a damaged cache entry); the file "
                             "was removed: build the sampler again (or set DATAPIPE_PLAN_CACHE=0)")


def group_file(sources: Sequence[RowSource]) -> tuple[np.memmap, str, str]:
    """``(ids, path, key)``: ``group + 1`` of every global row (0: left out) as a memory map, written in one pass
    (which also counts: :func:`scan`'s tables are put in the plan cache). In ``plan_cache.cache_dir()`` when every
    domain's metadata is a file (keyed by the files' identities; written once per node under a lock; checked at
    :func:`samplers.plan_cache.spot_positions` when an existing file is opened), else an unlinked temporary file."""
    dtype = _file_dtype(sources)
    n = sum(s.n for s in sources)
    h = hashlib.sha256(repr((tuple(s.key() for s in sources), dtype.str)).encode()).hexdigest()[:40]
    if ("file", h) in _INDEXES:
        _INDEXES.move_to_end(("file", h))
        return _INDEXES[("file", h)]
    root = cache_dir()
    if root is not None and all(s.main is not None and file_identity(s.main) is not None for s in sources):
        final = root / f"shaped_groups-{h}.bin"
        with locked(lock_path(final)):
            fresh = write_mapped(final, dtype, n, lambda part: _write(sources, part))
            if fresh:
                prune_files(root, "shaped_groups-*.bin", final, KEEP_BIG_FILES)
            ids = np.memmap(final, dtype=dtype, mode="r", shape=(n,))
            if not fresh:
                _check_file(sources, ids, final)
        out = (ids, str(final), h)
    else:  # in-memory metadata or no disk cache: an unlinked temporary file, gone with the process
        with tempfile.TemporaryFile(prefix="datapipe-shaped_groups-") as f:  # the map outlives the closed file
            f.truncate(n * dtype.itemsize)
            ids = np.memmap(f, dtype=dtype, mode="r+", shape=(n,))
        _write(sources, ids)
        out = (ids, "", h)
    _INDEXES[("file", h)] = out
    _trim()
    return out


def _trim() -> None:
    while len(_INDEXES) > 4:
        _INDEXES.popitem(last=False)


def rows_index(sources: Sequence[RowSource], group_ids: NDArray[np.int64], avail: NDArray[np.int64],
               excluded: NDArray[np.int64]) -> RowsIndex:
    """The rows of each group of the domains ``sources`` (global rows: domain ``d``'s rows follow domain
    ``d - 1``'s), for the present ``group_ids`` and the tables ``avail`` ``[D, G]`` / ``excluded`` ``[D]``: the
    :func:`group_file` sorted by ``samplers.topic_windowed.cluster_index`` (a stable counting sort to a
    memory-mapped file, cached the same way)."""
    from samplers.topic_windowed import cluster_index

    G = len(group_ids)
    if G == 1 and not excluded.any():  # one group, every row (from_rows): no file
        return RowsIndex(np.zeros(1, dtype=np.int64), None)
    ids, path, h = group_file(sources)
    index = cluster_index(ids, h, "groups")
    uniq = np.asarray(index.uniq, dtype=np.int64)
    c = np.searchsorted(uniq, group_ids + 1)
    assert np.array_equal(uniq[np.minimum(c, len(uniq) - 1)], group_ids + 1), "every present group has rows"
    assert np.array_equal(np.diff(index.offsets)[c], avail.sum(axis=0)), "rows per group match the counting pass"
    return RowsIndex(np.asarray(index.offsets, dtype=np.int64)[c], index.rows, path)


def groups_source(groups, sizes, name: str, sizes_name: str, *, check_sizes: bool = True) -> RowSource:
    """A domain's given group ids (and per-row sizes) as a :class:`RowSource`: shapes and dtypes checked here, the
    values by :func:`scan`. A memory map stays a memory map."""
    g = groups if isinstance(groups, np.ndarray) else np.asarray(groups)
    if g.ndim != 1 or g.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array (got {g.dtype}, {g.shape})")
    s = None
    if sizes is not None:
        s = sizes if isinstance(sizes, np.ndarray) else np.asarray(sizes)
        if s.shape != g.shape:
            raise ValueError(f"{sizes_name} has shape {s.shape}, {name} {g.shape}")
        if s.dtype.kind not in "iuf":
            raise TypeError(f"{sizes_name} must be numbers (got {s.dtype})")
    return RowSource(len(g), name, groups=g, sizes=s, check_sizes=check_sizes)
