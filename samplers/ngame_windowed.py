"""NGAME at scale: the memory bank on disk, clustering in windows, a rows-by-cluster file, clusters on demand.

What :class:`samplers.NGAMEBatchSampler` does above ``EXACT_MAX_ROWS`` rows, so that a rank's anonymous memory is
O(window), not O(rows) (the exact path keeps the bank, per-row stamps, cluster ids and an argsort in RAM):

* :class:`DiskBank`: the bank is an ``[n, d]`` ``.npy`` memory map at ``bank_path`` (created sparse with
  ``np.lib.format.open_memmap``), its write stamps an int64 ``[n]`` ``.npy`` beside it (``<bank>.stamp.npy``,
  stamp + 1; 0: not written) and a small ``<bank>.meta.json`` (rows, dim, dtype, whether the bank started full
  from ``embeddings=``). Writes go into the map; nothing per row is held in RAM.
* :func:`build_clustering`: the tree's top levels are learnt on a sample, the rest in windows. A uniform sample
  of ``window_rows`` rows (a Feistel range, seeded per clustering) is clustered by balanced hierarchical 2-means
  (:func:`native.balanced.balanced_kmeans`) into ``C = ceil(n / window_rows)`` cells; every row is assigned to its
  nearest cell centroid (cosine) in a pass over the bank's memory map; a counting sort writes the rows grouped by
  cell into the rows file (stable: row order within a cell); cells are cut into windows of at most
  ``window_rows`` rows, and each window is clustered on its own by balanced 2-means and rewritten in cluster order
  in place. The result is the "rows by cluster" file next to the bank (``<bank>.clusters-e<epoch>-c<size>.npy``
  with a ``.json`` sidecar holding the window sizes and the digest); a cluster's place in it follows from the
  window sizes (:mod:`native.ngame_windows`), so no per-row or per-cluster array is held. With a process group,
  rank ``r`` assigns chunks ``r, r + W, ...`` and clusters windows ``r, r + W, ...`` into the shared files; the
  chunking is a function of the data only, so any world size writes bitwise the same file.
* :class:`Clustering`: a clustered epoch shuffles the ``K`` clusters with a Feistel permutation of ``K`` and batch
  ``b`` is the clusters at positions ``[b * per, (b + 1) * per)``; its rows are read from the file when the batch
  is yielded.

What changes against the exact NGAME clustering: clusters never straddle windows. The top split is the nearest
centroid of ``C`` centroids learnt on a sample, not a balanced 2-means over all rows, so cells (and windows) are
not of equal size: a window of ``m`` rows gets ``ceil(m / cluster_size)`` clusters of ``floor`` or ``ceil`` size,
so small windows give clusters smaller than ``cluster_size``. Within a window, a row's cluster-mates are found
among up to ``window_rows`` rows that are already near it (a window of 2**20 rows holds ~65k clusters of 16). The
first design, windows as random samples of the corpus (contiguous ranges of a Feistel permutation), lost a third
to two thirds of the same-blob batch-mates against the exact clustering; the cells keep it (measured in
``benchmarks/results/bench_ngame_scale.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from native.balanced import balanced_kmeans, leaf_sizes
from native.feistel import feistel_range
from native.ngame_windows import cluster_batch_sizes, clusters_rows
from native.rng import mix_seed
from samplers.plan_cache import KEEP_BIG_FILES, locked, prune_files

__all__ = ["SCAN_ROWS", "Clustering", "DiskBank", "Layout", "build_clustering",
           "check_embeddings", "clusters_path", "open_clustering", "unit_rows"]

#: rows per step when a bank is copied in or its stamps are scanned (bounds the temporaries)
SCAN_ROWS = 1 << 20


def _digest_rows(rows: NDArray) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(rows, dtype=np.int64).tobytes()) & ((1 << 63) - 1)


def _combine(window_digests: NDArray[np.int64]) -> str:
    import xxhash

    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(np.ascontiguousarray(window_digests, dtype=np.int64).tobytes())


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# ---- the bank ---------------------------------------------------------------------------------------------------
class DiskBank:
    """The memory bank as memory-mapped files at ``path`` (module docstring); opened or created on first use.

    Args:
        path: the bank's ``.npy`` file, on a path every rank of the run sees.
        num_rows: rows of the dataset.
        dtype: float dtype of a bank this class creates (an existing one keeps its own).
    """

    def __init__(self, path: str | os.PathLike, num_rows: int, dtype) -> None:
        self.path = Path(path)
        self.n, self.dtype = int(num_rows), np.dtype(dtype)
        self.stamp_path = self.path.with_name(self.path.name + ".stamp.npy")
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.bank: np.memmap | None = None
        self.stamp: np.memmap | None = None
        self.baseline = False  # every row counts as written at stamp 0 (the bank started from embeddings=)

    @property
    def dim(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[1])

    @property
    def nbytes(self) -> int:
        return 0 if self.bank is None else int(self.bank.nbytes)

    def exists(self) -> bool:
        return self.meta_path.exists()

    def open(self) -> bool:
        """Open the bank another run (or rank) created; False when there is none yet."""
        if self.bank is not None:
            return True
        if not self.meta_path.exists():  # none yet, or another rank is creating it (the meta is written last)
            return False
        meta = json.loads(self.meta_path.read_text())
        if int(meta["rows"]) != self.n:
            raise ValueError(f"bank_path={os.fspath(self.path)} holds a bank of {meta['rows']} rows, not "
                             f"num_rows={self.n}; use another bank_path for another dataset")
        bank = np.load(self.path, mmap_mode="r+")
        stamp = np.load(self.stamp_path, mmap_mode="r+")
        if bank.ndim != 2 or bank.shape[0] != self.n or bank.dtype.kind != "f" or stamp.shape != (self.n,):
            raise ValueError(f"bank_path={os.fspath(self.path)} must be a float [{self.n}, d] .npy with an int64 "
                             f"[{self.n}] stamp file (got {bank.dtype} {bank.shape}, stamps {stamp.shape}); it is "
                             "damaged: remove it and its .stamp.npy/.meta.json to start a new bank")
        self.bank, self.stamp, self.baseline = bank, stamp, bool(meta["baseline"])
        return True

    def create(self, dim: int, *, baseline: bool = False) -> None:
        """Create the bank files of dimension ``dim`` (sparse: no rows written), or open them when another rank
        created them first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path.with_name(f".{self.path.name}.lock")):
            if self.open():
                return
            if self.path.exists():
                raise ValueError(f"bank_path={os.fspath(self.path)} exists but was not created by NGAMEBatchSampler "
                                 f"(no {self.meta_path.name} beside it); to start from its embeddings pass "
                                 "embeddings=np.load(bank_path, mmap_mode='r') too, or use another bank_path")
            for path, dtype, shape in ((self.path, self.dtype, (self.n, dim)), (self.stamp_path, np.int64, (self.n,))):
                tmp = path.with_name(f".{path.name}.part-{os.getpid()}")  # a crash leaves no half-made bank
                np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
                os.replace(tmp, path)
            _write_json(self.meta_path, {"rows": self.n, "dim": int(dim), "dtype": self.dtype.str,
                                         "baseline": bool(baseline)})
            self.open()

    def adopt(self, emb, normalise) -> None:
        """Start the bank from ``emb`` (``[n, d]``, a memory map is read ``SCAN_ROWS`` rows at a time): copied in,
        or used in place when it is the file at ``path`` itself. Every row counts as written."""
        src = getattr(emb, "filename", None)
        if src and os.path.realpath(src) == os.path.realpath(self.path):
            np.asarray(emb)  # checked by the caller chunk by chunk
            stamp = np.lib.format.open_memmap(self.stamp_path, mode="w+", dtype=np.int64, shape=(self.n,))
            stamp.flush()
            del stamp
            _write_json(self.meta_path, {"rows": self.n, "dim": int(emb.shape[1]), "dtype": emb.dtype.str,
                                         "baseline": True})
            self.open()
            return
        self.create(int(emb.shape[1]), baseline=True)
        for a in range(0, self.n, SCAN_ROWS):
            self.bank[a : a + SCAN_ROWS] = normalise(np.asarray(emb[a : a + SCAN_ROWS]))
        self.bank.flush()

    def write(self, idx: NDArray[np.int64], rows: NDArray, stamp: int) -> None:
        """Write normalised ``rows`` at ``idx`` with write stamp ``stamp`` (later stamps win)."""
        self.bank[idx] = rows.astype(self.bank.dtype)
        self.stamp[idx] = stamp + 1

    def flush(self) -> None:
        if self.bank is not None:
            self.bank.flush()
            self.stamp.flush()

    def missing(self, lo: int = 0, hi: int | None = None) -> int:
        """Rows of ``[lo, hi)`` with no embedding (read ``SCAN_ROWS`` stamps at a time)."""
        hi = self.n if hi is None else hi
        if self.bank is None:
            return hi - lo
        if self.baseline:
            return 0
        out = 0
        for a in range(lo, hi, SCAN_ROWS):
            out += int(np.count_nonzero(self.stamp[a : min(hi, a + SCAN_ROWS)] == 0))
        return out


# ---- windows and the rows-by-cluster file -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Windows of one clustering: window ``w`` is positions ``[wstart[w], wstart[w+1])`` of the row permutation and
    of the rows-by-cluster file, and holds clusters ``[kcum[w], kcum[w+1])`` (O(windows) int64)."""

    n: int
    window_rows: int
    cluster_size: int
    wstart: NDArray[np.int64]
    kcum: NDArray[np.int64]
    #: windows, and clusters of all windows (``len(wstart) - 1``, ``kcum[-1]``; computed)
    num_windows: int = dataclasses.field(init=False)
    num_clusters: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_windows", len(self.wstart) - 1)  # frozen: set once, here
        object.__setattr__(self, "num_clusters", int(self.kcum[-1]))

    @classmethod
    def of(cls, n: int, window_rows: int, cluster_size: int) -> Layout:
        """Windows of (almost) equal sizes: ``ceil(n / window_rows)`` of them, differing by at most one row."""
        return cls.of_sizes(n, window_rows, cluster_size, leaf_sizes(n, max(1, -(-n // window_rows))))

    @classmethod
    def of_sizes(cls, n: int, window_rows: int, cluster_size: int, sizes) -> Layout:
        """Windows of the given sizes (each ``>= 1``), ``ceil(size / cluster_size)`` clusters each."""
        sizes = np.asarray(sizes, dtype=np.int64)
        W = len(sizes)
        wstart = np.zeros(W + 1, dtype=np.int64)
        np.cumsum(sizes, out=wstart[1:])
        kcum = np.zeros(W + 1, dtype=np.int64)
        np.cumsum(np.maximum(1, -(-sizes // cluster_size)), out=kcum[1:])
        assert int(wstart[-1]) == n and (sizes >= 1).all(), "windows must cover the rows, none empty"
        return cls(n, window_rows, cluster_size, wstart, kcum)

    def cluster_size_range(self) -> tuple[int, int]:
        m, k = np.diff(self.wstart), np.diff(self.kcum)
        return int((m // k).min()), int((-(-m // k)).max())


def clusters_path(bank_path: str | os.PathLike, epoch: int, cluster_size: int) -> Path:
    """The rows-by-cluster file of the clustering made at ``epoch`` with ``cluster_size``, next to the bank."""
    p = Path(bank_path)
    return p.with_name(f"{p.name}.clusters-e{epoch}-c{cluster_size}.npy")


@dataclasses.dataclass
class Clustering:
    """One windowed clustering: its layout and its rows-by-cluster memory map (read only)."""

    epoch: int
    layout: Layout
    path: Path
    rows: np.memmap
    digest: str

    @property
    def cluster_size(self) -> int:
        return self.layout.cluster_size

    def batch_sizes(self, num_batches: int, per: int, seed: int) -> NDArray[np.int64]:
        return cluster_batch_sizes(num_batches, per, seed, self.layout.wstart, self.layout.kcum)

    def rows_of(self, first: int, count: int, seed: int) -> NDArray[np.int64]:
        return clusters_rows(self.rows, first, count, seed, self.layout.wstart, self.layout.kcum)

    def cluster_ids(self) -> NDArray[np.int64]:
        """int64 ``[n]`` cluster of every row (materialised: for inspection and tests at small ``n``)."""
        lay = self.layout
        ids = np.empty(lay.n, dtype=np.int64)
        for w in range(lay.num_windows):
            m, k = int(lay.wstart[w + 1] - lay.wstart[w]), int(lay.kcum[w + 1] - lay.kcum[w])
            ids[np.asarray(self.rows[lay.wstart[w] : lay.wstart[w + 1]])] = lay.kcum[w] + np.repeat(
                np.arange(k), leaf_sizes(m, k))
        return ids


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def open_clustering(path: str | os.PathLike, n: int, window_rows: int, cluster_size: int, epoch: int,
                    digest: str | None = None) -> Clustering | None:
    """The clustering stored at ``path`` (its layout from the sidecar) if it was made for these options at
    ``epoch`` (and has ``digest`` when given), else None."""
    path = Path(path)
    side = _sidecar(path)
    if not (path.exists() and side.exists()):
        return None
    meta = json.loads(side.read_text())
    if (int(meta["rows"]), int(meta["window_rows"]), int(meta["cluster_size"]), int(meta["epoch"])) != (
            n, window_rows, cluster_size, epoch):
        return None
    if digest is not None and meta["digest"] != digest:
        return None
    rows = np.load(path, mmap_mode="r")
    sizes = np.asarray(meta["window_sizes"], dtype=np.int64)
    if rows.shape != (n,) or int(sizes.sum()) != n or (sizes < 1).any():
        return None
    return Clustering(epoch, Layout.of_sizes(n, window_rows, cluster_size, sizes), path, rows, str(meta["digest"]))


def unit_rows(x: NDArray) -> NDArray[np.float32]:
    """float32 rows scaled to unit length (clustering is by cosine, so the bank keeps directions: unit rows lose
    nothing to float16's range)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_embeddings(embeddings, rows: int, name: str) -> NDArray:
    """``embeddings`` as a ``[rows, d]`` numeric array (a torch tensor is copied to numpy; a memory map stays a memory
    map), its values checked finite ``SCAN_ROWS`` rows at a time.

    Raises:
        ValueError: the shape, or the first row with NaN/inf (and the file of a memory map). TypeError: the dtype.
    """
    if hasattr(embeddings, "detach"):  # a torch tensor
        embeddings = embeddings.detach().float().cpu().numpy()
    emb = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != rows or emb.shape[1] < 1:
        raise ValueError(f"{name} must be a [{rows}, d] matrix with d >= 1 (got shape {emb.shape})")
    if not np.issubdtype(emb.dtype, np.number):
        raise TypeError(f"{name} must be numeric (got dtype {emb.dtype})")
    where = f" of {emb.filename}" if getattr(emb, "filename", None) else f" of {name}"
    for a in range(0, rows, SCAN_ROWS):
        finite = np.isfinite(emb[a : a + SCAN_ROWS]).all(axis=1)
        if not finite.all():
            raise ValueError(f"{name} has NaN or inf values (first at row {a + int(np.flatnonzero(~finite)[0])}"
                             f"{where}); fix the encoder output before updating the bank")
    return emb


def coarse_centroids(bank: NDArray, n: int, num_cells: int, sample_rows: int, seed: int, *, niter: int,
                     device: str) -> NDArray[np.float32]:
    """``num_cells`` unit centroids from a uniform sample of ``sample_rows`` rows of the bank (a Feistel range,
    read in row order): the balanced 2-means tree's top levels, learnt on the sample."""
    rows = np.sort(feistel_range(0, min(n, sample_rows), n, mix_seed(seed, 0x5A)))
    x = unit_rows(bank[rows])
    ids = balanced_kmeans(x, num_clusters=num_cells, seed=mix_seed(seed, 0xCE), niter=niter, device=device)
    sums = np.zeros((num_cells, x.shape[1]), dtype=np.float64)
    np.add.at(sums, ids, x)
    return unit_rows(sums)


def assign_chunks(bank: NDArray, centroids: NDArray[np.float32], n: int, chunks, cells_out: NDArray
                  ) -> NDArray[np.int64]:
    """Nearest centroid (cosine) of every row of ``chunks`` (chunk ``k`` is rows ``[k * SCAN_ROWS, (k + 1) *
    SCAN_ROWS)``), written to ``cells_out``; returns int64 ``[num_chunks, cells]`` counts, zero for chunks not
    given. The products are ``[block, cells]`` float32 (64 MiB at most), blocks cut on a grid that depends on the
    data only, so every world size computes bitwise the same cells."""
    C = len(centroids)
    block = int(max(1, min(SCAN_ROWS, (1 << 24) // max(1, C))))
    counts = np.zeros((-(-n // SCAN_ROWS), C), dtype=np.int64)
    for k in chunks:
        for a in range(k * SCAN_ROWS, min(n, (k + 1) * SCAN_ROWS), block):
            b = min(n, (k + 1) * SCAN_ROWS, a + block)
            cells = np.argmax(unit_rows(bank[a:b]) @ centroids.T, axis=1)
            cells_out[a:b] = cells
            counts[k] += np.bincount(cells, minlength=C)
    return counts


def cluster_windows(bank: NDArray, layout: Layout, windows, seed: int, rows_file: NDArray, *, niter: int,
                    device: str) -> dict[int, int]:
    """Cluster ``windows`` of ``layout`` (window ``w``'s rows are ``rows_file[wstart[w]:wstart[w+1]]``, in row
    order) from ``bank`` (a memory map: one window's rows read at a time) and write each window's rows back in
    cluster order. Returns window -> digest of what was written."""
    digests = {}
    for w in windows:
        a, b = int(layout.wstart[w]), int(layout.wstart[w + 1])
        rows = np.asarray(rows_file[a:b], dtype=np.int64)
        emb = np.asarray(bank[rows], dtype=np.float32)
        ids = balanced_kmeans(emb, num_clusters=int(layout.kcum[w + 1] - layout.kcum[w]), seed=mix_seed(seed, w),
                              niter=niter, device=device)
        part = rows[np.argsort(ids, kind="stable")]
        rows_file[a:b] = part
        digests[w] = _digest_rows(part)
    return digests


def build_clustering(bank: DiskBank, n: int, window_rows: int, cluster_size: int, epoch: int, seed: int, *,
                     niter: int, device: str, group=None) -> Clustering:
    """Cluster the bank in windows into the rows-by-cluster file of ``epoch`` next to it (module docstring).

    Steps: coarse centroids from a sample (every rank computes the same), every row assigned to its nearest
    (chunks ``r, r + W, ...`` by rank ``r``, into a shared cells file), a counting sort of the rows by cell into
    the rows file (stable: rows in row order within a cell, whatever the world size), cells cut into windows of
    at most ``window_rows`` rows, and each window clustered in place (windows ``r, r + W, ...`` by rank ``r``).

    With a process group (:mod:`samplers.ngame_dist`) the caller has flushed every rank's bank writes and the
    files are shared (the bank's directory must be one every rank sees); collective then."""
    from native.ngame_windows import scatter_cells
    from samplers.ngame_dist import all_sum, barrier

    final = clusters_path(bank.path, epoch, cluster_size)
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    sync = (lambda: barrier(group)) if group is not None else (lambda: None)
    tag = "" if group is not None else f"-{os.getpid()}"
    tmp = final.with_name(f".{final.name}.part{tag}")
    tmp_cells = final.with_name(f".{final.name}.cells{tag}.npy")
    dtype = np.int32 if n < (1 << 31) else np.int64
    C = max(1, -(-n // window_rows))
    if rank == 0:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,)).flush()
        if C > 1:
            np.lib.format.open_memmap(tmp_cells, mode="w+", dtype=np.int32, shape=(n,)).flush()
    sync()
    try:
        out = np.load(tmp, mmap_mode="r+")
        if C == 1:
            sizes = np.array([n], dtype=np.int64)
            if rank == 0:
                out[:] = np.arange(n, dtype=dtype)
        else:
            cent = coarse_centroids(bank.bank, n, C, window_rows, mix_seed(seed, 0xC0A), niter=niter, device=device)
            cells_file = np.load(tmp_cells, mmap_mode="r+")
            step = SCAN_ROWS
            mine = range(rank, -(-n // step), world)
            counts = assign_chunks(bank.bank, cent, n, mine, cells_file)
            cells_file.flush()
            if group is not None:
                counts = all_sum(group, counts.ravel()).reshape(counts.shape)  # also: every rank's cells written
            per_cell = counts.sum(axis=0)
            cursor0 = np.zeros_like(counts)  # first position of chunk k's rows of cell c
            cursor0[1:] = np.cumsum(counts[:-1], axis=0)
            cursor0 += (np.cumsum(per_cell) - per_cell)[None, :]
            for k in mine:
                a, b = k * step, min(n, (k + 1) * step)
                scatter_cells(np.asarray(cells_file[a:b]), a, np.ascontiguousarray(cursor0[k]), out)
            out.flush()
            del cells_file
            sync()
            sizes = np.concatenate([leaf_sizes(int(m), -(-int(m) // window_rows)) for m in per_cell if m])
        layout = Layout.of_sizes(n, window_rows, cluster_size, sizes)
        got = cluster_windows(bank.bank, layout, range(rank, layout.num_windows, world), seed, out, niter=niter,
                              device=device)
        out.flush()
        del out
        dig = np.zeros(layout.num_windows + 1, dtype=np.int64)
        for w, h in got.items():
            dig[w] = h
        if group is not None:
            dig = all_sum(group, dig)  # also the barrier after every rank wrote its windows
        dig[-1] = _digest_rows(layout.wstart)
        digest = _combine(dig)
        if rank == 0:
            os.replace(tmp, final)
            _write_json(_sidecar(final), {"rows": n, "window_rows": window_rows, "cluster_size": cluster_size,
                                          "epoch": int(epoch), "seed": int(seed), "digest": digest,
                                          "window_sizes": np.diff(layout.wstart).tolist()})
            prune_files(bank.path.parent, f"{bank.path.name}.clusters-e*.npy", final, KEEP_BIG_FILES,
                        companions=lambda p: [_sidecar(p)])
    finally:
        if rank == 0:
            for f in (tmp, tmp_cells):
                with contextlib.suppress(OSError):
                    f.unlink()
    sync()
    c = open_clustering(final, n, window_rows, cluster_size, epoch, digest)
    assert c is not None, "the rows-by-cluster file just written must open"
    return c
