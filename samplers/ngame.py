"""NGAME batches: mini-batches that are unions of clusters of close points, refreshed from an embedding bank.

Implements "NGAME: Negative Mining-aware Mini-batching for Extreme Classification" (Dahiya et al., WSDM 2023).
Points that are close in the current encoder's embedding space are put in the same batch, so the other points'
positive labels are hard in-batch negatives at no extra encoding cost. The clusters come from balanced
hierarchical 2-means (:func:`native.balanced.balanced_kmeans`) over a memory bank that the training loop
fills with the embeddings it computes anyway (:meth:`NGAMEBatchSampler.update_embeddings`), and are refreshed
every ``refresh_every`` epochs after ``warmup_epochs`` of random batches. Unlike the reference (one GPU), the
plan is shared across ranks: rank 0 gathers the bank, clusters, and broadcasts the cluster ids
(:mod:`samplers.ngame_dist`). The cluster file is :mod:`samplers.ngame_io`; the in-batch positive mask of NGAME's
loss is :func:`samplers.labels.positive_mask`.

Above :data:`EXACT_MAX_ROWS` rows the sampler is *windowed* (:mod:`samplers.ngame_windowed`,
:mod:`samplers.ngame_lazy`): the bank is a memory-mapped file (``bank_path``), random epochs are a stateless
Feistel permutation, clustering runs in windows of :data:`WINDOW_ROWS` rows into an on-disk rows-by-cluster file,
and batches are computed when yielded: a rank's memory is O(window), not O(rows).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from native.balanced import balanced_kmeans
from native.batching import fixed_sizes
from native.rng import permutation
from samplers.base import BatchSamplerBase, Plan, PlanStats, take_batches
from samplers.ngame_dist import any_rank, broadcast_ids, dist_group, sync_bank_to_rank0
from samplers.ngame_io import read_cluster_file, write_cluster_file
from samplers.ngame_lazy import WindowedNGAME
from samplers.ngame_windowed import check_embeddings, unit_rows

__all__ = ["EXACT_MAX_ROWS", "WINDOW_ROWS", "NGAMEBatchSampler"]

#: Up to this many rows the plan is exactly that of earlier versions (bank, stamps and cluster ids in RAM: ~40 B
#: per row plus the bank); above it the sampler is windowed (module docstring). 2**22 rows.
EXACT_MAX_ROWS = 1 << 22
#: Rows per clustering window of the windowed path (fixed per sampler at construction, part of its options).
WINDOW_ROWS = 1 << 20


def __getattr__(name: str):
    # ``from samplers.ngame import positive_mask`` keeps working one release (it moved to samplers.labels)
    if name == "positive_mask":
        warnings.warn("samplers.ngame.positive_mask moved to samplers.labels; import it from there or from "
                      "samplers (the old name goes in the next release)", DeprecationWarning, stacklevel=2)
        from samplers.labels import positive_mask

        return positive_mask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DYNAMIC_KEYS = ("clustered_epoch", "cluster_size_now", "clusters_digest", "bank_dirty", "decided_epoch")


def _parse_schedule(schedule, cluster_size: int) -> list[tuple[int, int]]:
    if schedule is None:
        return [(0, cluster_size)]
    items = sorted((schedule.items() if isinstance(schedule, Mapping) else schedule), key=lambda kv: kv[0])
    out = [] if items and items[0][0] == 0 else [(0, cluster_size)]
    for e, c in items:
        if not isinstance(e, (int, np.integer)) or e < 0 or not isinstance(c, (int, np.integer)) or c < 1:
            raise ValueError(f"cluster_size_schedule entries must be (epoch >= 0, cluster_size >= 1) (got {(e, c)!r})")
        out.append((int(e), int(c)))
    return out


def _num_rows(num_rows: int | None, num_items: int | None) -> int:
    """The row count from ``num_rows``, or from its deprecated name ``num_items=`` (kept one release, warns)."""
    if num_items is None:
        if num_rows is None:
            raise TypeError("NGAMEBatchSampler needs the row count: pass num_rows (rows in the dataset), e.g. "
                            "NGAMEBatchSampler(len(ds), batch_size=256)")
        return num_rows
    if num_rows is not None:
        raise TypeError(f"pass the row count once, as num_rows (got num_rows={num_rows!r} and num_items="
                        f"{num_items!r}; num_items is the deprecated name of num_rows)")
    warnings.warn("NGAMEBatchSampler(num_items=...) is deprecated: pass num_rows=... (the name every sampler uses); "
                  "num_items goes in the next release", DeprecationWarning, stacklevel=3)
    return num_items


def _digest(ids: NDArray[np.int64] | None) -> str:
    return "" if ids is None else hashlib.blake2b(np.ascontiguousarray(ids).tobytes(), digest_size=8).hexdigest()


class NGAMEBatchSampler(WindowedNGAME, BatchSamplerBase):
    """Batches of ``batch_size // cluster_size`` whole balanced clusters, re-clustered from a memory bank.

    Epochs before the first clustering are random batches of ``batch_size``. A refresh is *due* at epoch ``e``
    when ``e >= warmup_epochs`` and ``(e - warmup_epochs) % refresh_every == 0``; :meth:`set_epoch` then
    re-clusters if the bank changed since the last clustering (:meth:`update_embeddings`, or ``embeddings``
    given here) and every row has an embedding (else the refresh is skipped and counted in ``stats()``). A
    change of cluster size in ``cluster_size_schedule`` also re-clusters. A clustered epoch shuffles the
    clusters (seeded by seed and epoch) and takes ``batch_size // cluster_size`` of them per batch, so batches
    hold at most ``batch_size`` rows (clusters have ``floor(n/K)`` or ``ceil(n/K)`` rows, ``K =
    ceil(n / cluster_size)``); the last batch may hold fewer clusters.

    Multi-rank: with an initialised torch.distributed group (gloo or nccl) whose size is ``world_size``, every
    rank must call ``update_embeddings`` with the rows it encoded and call ``set_epoch``/``refresh`` at the
    same points; rank 0 then gathers the freshest embedding of every row, clusters, and broadcasts the cluster
    ids, so all ranks slice the same plan. Without a process group every rank clusters its own bank (give each
    rank the same embeddings).

    Resuming: ``state_dict()`` holds ints and strings (the cursor, the epoch of the current clustering, its
    cluster size and a digest of the ids). Save the clustering and the bank beside the checkpoint with
    :meth:`save_clusters` and call :meth:`load_clusters` before :meth:`load_state_dict`; when the bank only
    holds the ``embeddings`` given at construction, the clustering is recomputed instead.

    At scale (above :data:`EXACT_MAX_ROWS` rows): the bank lives in ``bank_path`` (an ``[n, d]`` ``.npy`` memory map
    the sampler creates, with ``<bank>.stamp.npy`` and ``<bank>.meta.json`` beside it; with a process group it must
    be on a path every rank sees, and each rank writes its own rows there: a node-local file when the ranks share
    one node, else a shared file system whose memory-mapped writes are coherent across nodes, since rows of
    different ranks share pages). Random epochs are a Feistel permutation of the rows. A refresh splits the rows
    into ``ceil(n / WINDOW_ROWS)`` cells by the nearest of centroids learnt on a sample (the top of the 2-means
    tree), cuts cells into windows of at most :data:`WINDOW_ROWS` rows, and clusters each window on its own into
    ``<bank>.clusters-e<epoch>-c<size>.npy`` (rows by cluster; rank ``r`` of ``W`` clusters windows ``r, r + W,
    ...``); a clustered epoch takes ``batch_size // cluster_size`` clusters per batch in a Feistel order of the
    clusters, rows read from that file when the batch is yielded. Clusters never straddle windows, and small windows
    give clusters smaller than ``cluster_size`` (:mod:`samplers.ngame_windowed`; batch quality against the exact
    clustering in ``benchmarks/results/bench_ngame_scale.md``). Resuming, also in a fresh process: construct the
    sampler with the same ``bank_path`` and call :meth:`load_state_dict`; the clustering is reopened from its file
    next to the bank (the newest two are kept), or from the file :meth:`save_clusters` names. An existing bank at
    ``bank_path`` is reopened as it is (the run's own bank, written by an earlier process); ``embeddings`` is then
    not copied in again and nothing is clustered at construction.

    Args:
        num_rows: rows in the dataset (positional or keyword). ``num_items=`` is its deprecated name, accepted
            for one release with a ``DeprecationWarning``.
        batch_size: rows per batch, a multiple of every cluster size used.
        cluster_size: rows per cluster (default: the largest divisor of ``batch_size`` that is ``<= 16``).
        cluster_size_schedule: ``{epoch: cluster_size}`` (or ``(epoch, size)`` pairs): the cluster size from
            that epoch on (NGAME grows it over training, e.g. ``{0: 2, 10: 4, 20: 8}``).
        refresh_every: re-cluster every this many epochs (NGAME's tau = 5).
        warmup_epochs: random-batch epochs before the first clustering.
        embeddings: optional ``[num_rows, d]`` initial bank (e.g. from a pre-trained encoder). Above
            ``EXACT_MAX_ROWS`` rows it may be a memory-mapped ``.npy`` (read in chunks, never copied whole); when it
            is the file at ``bank_path`` itself it is used in place.
        seed: integer seed, the same on every rank.
        rank, world_size: default to torch.distributed, else 0 and 1.
        drop_last: drop the last batch when it holds fewer clusters (or rows) than a full one, and trailing
            batches that do not fill a step of ``world_size``; counted in ``stats()["dropped"]``.
        bank_dtype: the bank's dtype (float16 halves its size). The bank stores L2-normalised rows, as the
            clustering is by cosine similarity.
        niter: 2-means iterations per split. device: where to cluster (``"auto"``: CUDA when visible).
        bank_path: the bank's file above ``EXACT_MAX_ROWS`` rows (required there once a bank is needed:
            ``embeddings`` given or ``update_embeddings`` called). Below the threshold the bank is in memory and
            ``bank_path`` is not used.
    """

    _elastic = False

    def __init__(self, num_rows: int | None = None, batch_size: int | None = None, *, cluster_size: int | None = None,
                 cluster_size_schedule: Mapping[int, int] | list[tuple[int, int]] | None = None,
                 refresh_every: int = 5, warmup_epochs: int = 0, embeddings: ArrayLike | None = None,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 bank_dtype=np.float16, niter: int = 10, device: str = "auto", strict: bool = False,
                 num_items: int | None = None, bank_path: str | os.PathLike | None = None) -> None:
        num_rows = _num_rows(num_rows, num_items)
        if batch_size is None:
            raise TypeError("NGAMEBatchSampler needs batch_size (rows per batch), e.g. NGAMEBatchSampler(len(ds), 256)")
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        for name, v, lo in (("num_rows", num_rows, 0), ("batch_size", batch_size, 1),
                            ("refresh_every", refresh_every, 1), ("warmup_epochs", warmup_epochs, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo} (got {name}={v!r})")
        if not drop_last and self.world_size > num_rows:
            raise ValueError(f"world_size={self.world_size} is larger than num_rows={num_rows}: some rank would "
                             "get no rows; use fewer ranks or more data")
        self.num_rows, self.batch_size = int(num_rows), int(batch_size)
        self.refresh_every, self.warmup_epochs = int(refresh_every), int(warmup_epochs)
        if cluster_size is None:
            cluster_size = max(c for c in range(1, min(16, self.batch_size) + 1) if self.batch_size % c == 0)
        if not isinstance(cluster_size, (int, np.integer)) or cluster_size < 1:
            raise ValueError(f"cluster_size must be an integer >= 1 (got {cluster_size=})")
        self._schedule = _parse_schedule(cluster_size_schedule, int(cluster_size))
        for e, c in self._schedule:
            if self.batch_size % c:
                raise ValueError(
                    f"batch_size must be a multiple of cluster_size so that batches are unions of whole clusters "
                    f"(got batch_size={self.batch_size}, cluster_size={c} from epoch {e}); use batch_size="
                    f"{max(c, self.batch_size // c * c)} or a cluster size dividing {self.batch_size}")
        self.schedule = ",".join(f"{e}:{c}" for e, c in self._schedule)
        self.bank_dtype = np.dtype(bank_dtype)
        if self.bank_dtype.kind != "f":
            raise ValueError(f"bank_dtype must be a float dtype (got {bank_dtype=})")
        self.niter, self.device = int(niter), device
        self._bank: NDArray | None = None  # [n, d] memory bank
        self.windowed = self.num_rows > EXACT_MAX_ROWS  # bank, stamps and plan on disk / on demand (no per-row RAM)
        # when each row was last written; -1: never (windowed: a stamp file beside the bank)
        self._stamp = None if self.windowed else np.full(self.num_rows, -1, dtype=np.int64)
        self._bank_dirty = False  # written since the last clustering
        self._bank_updates = 0  # update_embeddings calls since construction (0: bank == constructor embeddings)
        self._ids: NDArray[np.int64] | None = None
        self._clustered_epoch = -1
        self._decided_epoch = -1  # the epoch whose refresh was last decided (done or skipped): decided once
        self._cluster_size_now = 0
        self._counts = {"refreshes": 0, "refreshes_skipped_incomplete_bank": 0}
        if self.windowed:
            self._init_windowed(embeddings, bank_path)
            return
        if embeddings is not None:
            emb = check_embeddings(embeddings, self.num_rows, "embeddings")
            self._bank = self._to_bank(emb)
            self._stamp[:] = 0
            self._bank_dirty = True
        self._maybe_refresh(0, decide=False)  # clusters the constructor's embeddings; epoch 0 stays open

    # ---- configuration helpers ----------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        """Deprecated name of :attr:`num_rows` (kept one release; warns)."""
        warnings.warn("NGAMEBatchSampler.num_items is deprecated: read num_rows (the name every sampler uses); "
                      "num_items goes in the next release", DeprecationWarning, stacklevel=2)
        return self.num_rows

    def cluster_size_at(self, epoch: int) -> int:
        """The cluster size the schedule gives for ``epoch``."""
        return [c for e, c in self._schedule if e <= epoch][-1]

    @property
    def cluster_ids(self) -> NDArray[np.int64] | None:
        """int64 ``[num_rows]``: the cluster of every row in the current clustering (a copy), or None before one.
        Windowed: materialised from the rows-by-cluster file (O(rows): for inspection at small sizes)."""
        if self.windowed:
            return None if self._wc is None else self._wc.cluster_ids()
        return None if self._ids is None else self._ids.copy()

    def refresh_due(self, epoch: int) -> bool:
        """Whether ``epoch`` is a refresh epoch (``>= warmup_epochs`` and on the ``refresh_every`` grid)."""
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.refresh_every == 0

    # ---- memory bank --------------------------------------------------------------------------------------
    def _to_bank(self, emb: NDArray) -> NDArray:
        return unit_rows(emb).astype(self.bank_dtype)

    def update_embeddings(self, indices: ArrayLike, embeddings: ArrayLike) -> None:
        """Write the embeddings of rows ``indices`` into the memory bank (e.g. from the training forward pass).

        Args:
            indices: int ``[k]`` row indices in ``[0, num_rows)`` (a batch this sampler yielded).
            embeddings: ``[k, d]`` finite floats (numpy or torch); ``d`` is fixed by the first call.

        Raises:
            ValueError: indices out of range, shape mismatch, NaN/inf values.
        """
        if hasattr(indices, "detach"):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D integer array (got shape {idx.shape}, dtype {idx.dtype})")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise ValueError(f"indices must be in [0, num_rows={self.num_rows}) (got min {idx.min()}, "
                             f"max {idx.max()})")
        emb = check_embeddings(embeddings, len(idx), "embeddings")
        if self.windowed:
            self._update_disk(idx, emb)
            return
        if self._bank is None:
            self._bank = np.zeros((self.num_rows, emb.shape[1]), dtype=self.bank_dtype)
        elif emb.shape[1] != self._bank.shape[1]:
            raise ValueError(f"embeddings have dimension {emb.shape[1]} but the bank holds dimension "
                             f"{self._bank.shape[1]}; use the same encoder output size throughout")
        self._bank[idx] = self._to_bank(emb)
        # later writes win when ranks' banks are merged: (epoch, position in the epoch) orders them
        self._stamp[idx] = (self.epoch << 32) + self._yielded + 1
        self._bank_dirty = True
        self._bank_updates += 1

    # ---- clustering ---------------------------------------------------------------------------------------
    def _cluster(self, epoch: int):
        """Cluster the bank for ``epoch`` (rank 0 when distributed, ids broadcast; windowed: every rank its
        windows). None if the bank is incomplete."""
        if self.windowed:
            return self._w_cluster(epoch)
        cs = self.cluster_size_at(epoch)
        seed = self.epoch_seed(epoch, 0xC105)
        group = dist_group(self.world_size)
        if group is None:
            if self._bank is None or (self._stamp < 0).any():
                return None
            return balanced_kmeans(self._bank, cs, seed=seed, niter=self.niter, device=self.device)
        bank = sync_bank_to_rank0(group, self._bank, self._stamp)
        ids = None
        if group.rank == 0 and bank is not None:
            ids = balanced_kmeans(bank, cs, seed=seed, niter=self.niter, device=self.device)
        return broadcast_ids(group, ids, self.num_rows)

    def _set_clustering(self, ids, epoch: int, cluster_size: int) -> None:
        """Hold a clustering: cluster ids (exact path) or a :class:`samplers.ngame_windowed.Clustering`."""
        if self.windowed:
            self._wc, self._lazy = ids, None
        else:
            self._ids = ids
        self._clustered_epoch = epoch if ids is not None else -1
        self._cluster_size_now = cluster_size if ids is not None else 0
        self._cache = None

    def refresh(self) -> None:
        """Re-cluster now from the memory bank; the current epoch's plan uses the new clusters.

        Raises:
            ValueError: batches of this epoch were already yielded, or some rows have no embedding yet.
        """
        if self._yielded:
            raise ValueError(f"refresh() called after {self._yielded} batches of epoch {self.epoch} were yielded; "
                             "call it between epochs (before iterating), or let set_epoch() refresh when due")
        ids = self._cluster(self.epoch)
        if ids is None:
            if self.windowed:
                missing = self._w_missing()
            else:
                missing = int((self._stamp < 0).sum()) if self._bank is not None else self.num_rows
            raise ValueError(f"refresh() needs an embedding for every row: {missing} of {self.num_rows} rows have "
                             "none (on rank 0 after merging ranks); call update_embeddings() for them first")
        self._apply(ids, self.epoch)

    def _apply(self, ids: NDArray[np.int64], epoch: int) -> None:
        self._set_clustering(ids, epoch, self.cluster_size_at(epoch))
        self._bank_dirty = False
        self._counts["refreshes"] += 1

    def _options(self) -> dict:
        # "num_items" (the old name of num_rows) stays the key: checkpoints saved before the rename still load
        out = {"num_items": self.num_rows, "batch_size": self.batch_size, "refresh_every": self.refresh_every,
               "warmup_epochs": self.warmup_epochs, "schedule": self.schedule, "niter": self.niter}
        if self.windowed:
            out["window_rows"] = self.window_rows
        return out

    def _elastic_reason(self) -> str:
        return ("NGAME's clusters come from a memory bank merged over the ranks of the run; resume with the same "
                "number of ranks, or start the next epoch at the new size (save_clusters/load_clusters carry the "
                "clustering)")

    def _on_epoch(self, epoch: int) -> None:
        self._maybe_refresh(epoch)

    def _maybe_refresh(self, epoch: int, decide: bool = True) -> None:
        # decided once per epoch, whichever path positions the sampler (set_epoch, load_state_dict, the loader):
        # a resume must not re-decide with a bank written after the epoch began
        if epoch == self._clustered_epoch or epoch == self._decided_epoch:
            return
        if decide:
            self._decided_epoch = epoch
        size_change = self._clustered_epoch >= 0 and self.cluster_size_at(epoch) != self._cluster_size_now
        if not (size_change or self.refresh_due(epoch)):
            return
        if not size_change:
            group = dist_group(self.world_size)
            dirty = any_rank(group, self._bank_dirty) if group is not None else self._bank_dirty
            if not dirty:
                return
        ids = self._cluster(epoch)
        if ids is None:
            self._counts["refreshes_skipped_incomplete_bank"] += 1
            return
        self._apply(ids, epoch)

    # ---- plan ---------------------------------------------------------------------------------------------
    def _on_demand(self):
        return self._w_on_demand() if self.windowed else None

    def _build_plan(self, epoch: int) -> Plan:
        if self.windowed:
            return self._w_build_plan(epoch)
        n, B = self.num_rows, self.batch_size
        if self._ids is None:
            order = permutation(n, self.epoch_seed(epoch))
            sizes = fixed_sizes(n, B, self.world_size, self.drop_last)
            kept = int(sizes.sum())
            return Plan.from_sizes(order, sizes, dropped={"incomplete_batch": n - kept} if kept < n else {})
        ids = self._ids
        csizes = np.bincount(ids, minlength=int(ids.max()) + 1 if n else 0).astype(np.int64)
        K = len(csizes)
        clusters = Plan.from_sizes(np.argsort(ids, kind="stable"), csizes)
        shuffled = take_batches(clusters, permutation(K, self.epoch_seed(epoch, 0xC1)))
        per = B // self._cluster_size_now
        if self.drop_last and K % per:
            K -= K % per
        batch_sizes = np.add.reduceat(shuffled.sizes[:K], np.arange(0, K, per)) if K else np.zeros(0, np.int64)
        kept = int(batch_sizes.sum())
        return Plan.from_sizes(shuffled.indices, batch_sizes.astype(np.int64),
                               dropped={"incomplete_batch": n - kept} if kept < n else {})

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        digest = (self._wc.digest if self._wc is not None else "") if self.windowed else _digest(self._ids)
        state.update(clustered_epoch=self._clustered_epoch, cluster_size_now=self._cluster_size_now,
                     clusters_digest=digest, bank_dirty=int(self._bank_dirty),
                     decided_epoch=self._decided_epoch)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        missing = [k for k in _DYNAMIC_KEYS if k not in state]
        if missing:
            raise ValueError(f"NGAMEBatchSampler.load_state_dict: missing keys {missing}; pass the dict returned "
                             "by state_dict()")
        ce, cs, dig = int(state["clustered_epoch"]), int(state["cluster_size_now"]), str(state["clusters_digest"])
        if self.windowed:
            # another configuration is refused before any file is opened
            self._check_state({k: v for k, v in state.items() if k not in _DYNAMIC_KEYS})
            ids = self._w_restore(ce, cs, dig)
        else:
            ids = self._ids
        if not self.windowed and ce >= 0 and _digest(ids) != dig:
            if self._bank is None or self._bank_updates or (self._stamp < 0).any() or self.cluster_size_at(ce) != cs:
                raise ValueError(
                    f"the state was saved with the clustering of epoch {ce} (digest {dig}) which this sampler does "
                    "not hold; call load_clusters(path) with the file save_clusters() wrote at checkpoint time")
            ids = self._cluster(ce)  # the bank still holds the constructor's embeddings: recompute
            if _digest(ids) != dig:
                raise ValueError(f"recomputing the clustering of epoch {ce} gave digest {_digest(ids)}, not {dig}; "
                                 "construct the sampler with the same embeddings or call load_clusters(path)")
        self._set_clustering(ids if ce >= 0 else None, ce, cs)
        self._bank_dirty = bool(state["bank_dirty"])
        self._decided_epoch = int(state["decided_epoch"])
        super().load_state_dict({k: v for k, v in state.items() if k not in _DYNAMIC_KEYS})

    def save_clusters(self, path: str | os.PathLike, *, include_bank: bool = True) -> None:
        """Write the clustering (and by default the memory bank) to ``path`` (an ``.npz``, written atomically).

        Windowed (above ``EXACT_MAX_ROWS`` rows): the file names the rows-by-cluster file and its digest (the
        clustering itself stays on disk next to the bank, and the bank in ``bank_path``: neither is copied)."""
        if self.windowed:
            self._w_save(path)
            return
        # the file's key keeps the old name of num_rows: files written before the rename stay readable
        arrays = {"num_items": np.int64(self.num_rows), "clustered_epoch": np.int64(self._clustered_epoch),
                  "cluster_size_now": np.int64(self._cluster_size_now), "bank_dirty": np.int64(self._bank_dirty),
                  "ids": self._ids if self._ids is not None else np.zeros(0, np.int64)}
        if include_bank and self._bank is not None:
            arrays.update(bank=self._bank, stamp=self._stamp)
        write_cluster_file(path, arrays)

    def load_clusters(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save_clusters` wrote (call before :meth:`load_state_dict`).

        Raises:
            ValueError: naming ``path`` when the file is unreadable or its content does not match the checksum it
                carries, or it holds clusters of another number of items.
        """
        z = read_cluster_file(path)
        if int(z["num_items"]) != self.num_rows:
            raise ValueError(f"{os.fspath(path)} holds clusters of {int(z['num_items'])} rows, not "
                             f"num_rows={self.num_rows}")
        if self.windowed or "rows_file" in z:
            self._load_windowed_clusters(path, z)
            return
        ids = np.array(z["ids"], dtype=np.int64)
        if "bank" in z:
            self._bank = np.array(z["bank"])
            self._stamp = np.array(z["stamp"], dtype=np.int64)
            self._bank_updates = 1  # the bank no longer is the constructor's
        self._bank_dirty = bool(int(z["bank_dirty"]))
        ce = int(z["clustered_epoch"])
        self._set_clustering(ids if ce >= 0 else None, ce, int(z["cluster_size_now"]))

    # ---- statistics ---------------------------------------------------------------------------------------
    def stats(self) -> PlanStats:
        """Plan statistics: the keys of every sampler (:class:`samplers.PlanStats`) plus the clustering
        (``clustered``, ``clustered_epoch``, ``cluster_size``, ``num_clusters``, ``min_cluster_size``,
        ``max_cluster_size``), the memory bank (``bank_bytes``, ``bank_dim``, ``bank_rows_filled``, ``bank_dirty``)
        and the refresh counters (``refreshes``, ``refreshes_skipped_incomplete_bank``). Windowed, also ``plan``
        (``"windowed"``), ``window_rows``, ``num_windows``, ``bank_path``, ``clusters_path``; computed from the batch
        sizes (``bank_rows_filled`` scans the stamp file)."""
        if self.windowed:
            return self._w_stats()
        csizes = np.bincount(self._ids) if self._ids is not None and len(self._ids) else np.zeros(0, np.int64)
        extra = {
            "clustered": self._ids is not None,
            "clustered_epoch": self._clustered_epoch,
            "cluster_size": self._cluster_size_now,
            "num_clusters": len(csizes),
            "min_cluster_size": int(csizes.min()) if len(csizes) else 0,
            "max_cluster_size": int(csizes.max()) if len(csizes) else 0,
            "bank_bytes": int(self._bank.nbytes) if self._bank is not None else 0,
            "bank_dim": int(self._bank.shape[1]) if self._bank is not None else 0,
            "bank_rows_filled": int((self._stamp >= 0).sum()),
            "bank_dirty": self._bank_dirty,
            **self._counts,
        }
        return cast(PlanStats, {**super().stats(), **extra})  # the shared keys and NGAME's own
