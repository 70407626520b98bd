"""The windowed path of :class:`samplers.NGAMEBatchSampler` (above ``EXACT_MAX_ROWS`` rows): plans computed on demand.

A mixin the sampler inherits; it reads the sampler's options and holds its windowed state (``_disk``: the
:class:`samplers.ngame_windowed.DiskBank`, ``_wc``: the current :class:`~samplers.ngame_windowed.Clustering`): the
set-up (bank file opened, created or adopted from ``embeddings``), bank writes, the collective clustering, the
checkpoint files (``save_clusters`` names the rows-by-cluster file; ``load_state_dict`` reopens it next to the
bank), the plan and the statistics.

* A random epoch (before the first clustering) is the stateless Feistel permutation of the rows
  (``native.feistel.feistel_range``, seeded as ``RandomBatchSampler`` seeds it) cut into batches of
  ``batch_size`` (``native.batching.fixed_sizes``): the plan is the batch sizes, 8 B per batch.
* A clustered epoch: batch ``b`` is the clusters at positions ``[b * per, (b + 1) * per)`` of a Feistel
  permutation of the ``K`` clusters (``per = batch_size // cluster_size``); the batch sizes are counted once per
  epoch (O(K) time, 8 B per batch), the rows read from the rows-by-cluster file when the batch is yielded.

Evening out over ranks works on the sizes (:mod:`samplers.lazy_plan`), exactly as the base class does on a
materialised plan (a split batch keeps its rows in order), which the tests check.
"""

from __future__ import annotations

import os
from typing import cast

import numpy as np
from numpy.typing import NDArray

from native.batching import fixed_sizes
from native.feistel import feistel_range
from samplers.base import Plan, PlanStats
from samplers.lazy_plan import SizePlan, even_out_sizes
from samplers.ngame_dist import all_sum, barrier, dist_group
from samplers.ngame_io import write_cluster_file
from samplers.ngame_windowed import (
    Clustering,
    DiskBank,
    build_clustering,
    check_embeddings,
    clusters_path,
    open_clustering,
    unit_rows,
)
from samplers.plan_cache import PlanCache, StalePlanCache

__all__ = ["MAX_PLAN_ROWS", "WindowedNGAME"]


def _ngame():
    """The sampler's module, read at call time (its EXACT_MAX_ROWS and WINDOW_ROWS may be changed, e.g. in tests)."""
    import samplers.ngame

    return samplers.ngame

#: a clustered epoch's batch sizes (one pass over the K clusters: ~2 s per 1e8 rows), kept in this process and on
#: disk keyed by the rows-by-cluster file (``samplers.plan_cache``), so a resume, also in a fresh process, skips it
_SIZES = PlanCache("ngame_sizes", keep=2)
#: ``global_plan()`` refuses to materialise a windowed plan of more rows than this (iterating never does)
MAX_PLAN_ROWS = 1 << 28


class WindowedNGAME:
    """Windowed plan, clustering, state and statistics of NGAMEBatchSampler (mixin; see the module docstring)."""

    _wc: Clustering | None
    _lazy: tuple | None

    # ---- set-up, bank, cluster files -----------------------------------------------------------------------
    def _init_windowed(self, embeddings, bank_path) -> None:
        """The windowed path's set-up: no per-row array; the bank on disk (module docstring)."""
        self.window_rows = int(_ngame().WINDOW_ROWS)
        self._wc = None
        self._lazy = None
        self._disk = DiskBank(bank_path, self.num_rows, self.bank_dtype) if bank_path is not None else None
        if embeddings is None:
            if self._disk is not None and self._disk.open():
                self._bank_dirty = True  # a bank from an earlier process: newer than any clustering held here
            return
        if self._disk is None:
            raise ValueError(f"embeddings above EXACT_MAX_ROWS={_ngame().EXACT_MAX_ROWS} rows need bank_path= (a "
                             f".npy file the sampler keeps the [{self.num_rows}, d] bank in); pass "
                             "bank_path='/path/bank.npy'")
        emb = check_embeddings(embeddings, self.num_rows, "embeddings")
        self._bank_dirty = True
        if self._disk.exists():  # the run's own bank from an earlier process: reopened as it is
            self._disk.open()
            if self._disk.dim != emb.shape[1]:
                raise ValueError(f"bank_path={os.fspath(self._disk.path)} holds a bank of dimension {self._disk.dim} "
                                 f"but embeddings have dimension {emb.shape[1]}; use another bank_path")
            return
        self._disk.adopt(emb, unit_rows)
        self._maybe_refresh(0, decide=False)

    def _update_disk(self, idx: NDArray[np.int64], emb: NDArray) -> None:
        disk = self._disk
        if disk is None:
            raise ValueError(f"update_embeddings above EXACT_MAX_ROWS={_ngame().EXACT_MAX_ROWS} rows needs the "
                             f"sampler built with bank_path= (a .npy file for the [{self.num_rows}, d] bank, on a "
                             "path every rank sees); pass bank_path='/path/bank.npy'")
        if not disk.open():
            disk.create(emb.shape[1])
        if emb.shape[1] != disk.dim:
            raise ValueError(f"embeddings have dimension {emb.shape[1]} but the bank holds dimension {disk.dim}; "
                             "use the same encoder output size throughout")
        disk.write(idx, unit_rows(emb), (self.epoch << 32) + self._yielded + 1)
        self._bank_dirty = True
        self._bank_updates += 1

    def _load_windowed_clusters(self, path, z: dict) -> None:
        if not (self.windowed and "rows_file" in z):
            raise ValueError(f"{os.fspath(path)} holds a {'windowed' if 'rows_file' in z else 'whole'} clustering but "
                             f"this sampler of {self.num_rows} rows is {'windowed' if self.windowed else 'exact'} "
                             f"(EXACT_MAX_ROWS={_ngame().EXACT_MAX_ROWS}); load it into a sampler of the same "
                             "configuration")
        ce, cs, rows_file = int(z["clustered_epoch"]), int(z["cluster_size_now"]), str(z["rows_file"])
        wc = None
        if ce >= 0:
            wc = open_clustering(rows_file, self.num_rows, int(z["window_rows"]), cs, ce, str(z["digest"]))
            if wc is None:
                raise ValueError(f"{os.fspath(path)} names the rows-by-cluster file {rows_file}, which is missing or "
                                 f"holds another clustering (digest {z['digest']!s} expected); keep the files next "
                                 "to bank_path until the checkpoint is no longer needed")
        self._bank_dirty = bool(int(z["bank_dirty"]))
        self._set_clustering(wc, ce, cs)

    def _w_save(self, path) -> None:
        """save_clusters of the windowed path: the file names the rows-by-cluster file and its digest."""
        wc = self._wc
        write_cluster_file(path, {
            "num_items": np.int64(self.num_rows), "clustered_epoch": np.int64(self._clustered_epoch),
            "cluster_size_now": np.int64(self._cluster_size_now), "bank_dirty": np.int64(self._bank_dirty),
            "ids": np.zeros(0, np.int64), "window_rows": np.int64(self.window_rows),
            "rows_file": np.array(str(wc.path) if wc is not None else ""),
            "digest": np.array(wc.digest if wc is not None else "")})

    # ---- clustering ---------------------------------------------------------------------------------------
    def _w_cluster(self, epoch: int) -> Clustering | None:
        """Cluster the on-disk bank in windows for ``epoch``; None when some row has no embedding. Collective with a
        process group: every rank flushes its writes, counts the missing rows of its slice, clusters its windows."""
        disk, n = self._disk, self.num_rows
        if disk is None:
            return None
        group = dist_group(self.world_size)
        if group is None:
            if not disk.open() or disk.missing():
                return None
        else:
            disk.flush()
            barrier(group)  # every rank's rows are in the shared bank file
            lo, hi = n * group.rank // group.world, n * (group.rank + 1) // group.world
            miss = disk.missing(lo, hi) if disk.open() else hi - lo
            if int(all_sum(group, np.array([miss], dtype=np.int64))[0]):
                return None
        return build_clustering(disk, n, self.window_rows, self.cluster_size_at(epoch), epoch,
                                self.epoch_seed(epoch, 0xC105), niter=self.niter,
                                device=self.device, group=group)

    def _w_missing(self) -> int:
        return self.num_rows if self._disk is None or not self._disk.open() else self._disk.missing()

    def _w_restore(self, ce: int, cs: int, digest: str) -> Clustering | None:
        """The clustering a state names: the one held, or its rows-by-cluster file next to the bank."""
        if ce < 0:
            return None
        wc = self._wc
        if wc is not None and wc.digest == digest and wc.epoch == ce:
            return wc
        path = clusters_path(self._disk.path, ce, cs) if self._disk is not None else None
        wc = open_clustering(path, self.num_rows, self.window_rows, cs, ce, digest) if path else None
        if wc is None:
            raise ValueError(f"the state was saved with the clustering of epoch {ce} (digest {digest}), but its "
                             f"rows-by-cluster file {path} is missing or holds another clustering; keep that file "
                             "next to bank_path, or call load_clusters(path) with the file save_clusters() wrote")
        return wc

    # ---- plan ---------------------------------------------------------------------------------------------
    def _w_raw(self, epoch: int, world_size: int) -> SizePlan:
        """The epoch's global batches before evening out, as sizes over a stream: a random epoch's are already a
        multiple of ``world_size`` (``fixed_sizes``); a clustered epoch's are ``per`` clusters each."""
        n, B = self.num_rows, self.batch_size
        wc = self._wc
        if wc is None:
            sizes = fixed_sizes(n, B, world_size, self.drop_last)
        else:
            K, per = wc.layout.num_clusters, B // self._cluster_size_now
            nb = K // per if self.drop_last else -(-K // per)
            seed = self.epoch_seed(epoch, 0xC1)
            key = (wc.digest, str(wc.path), nb, per, seed)
            self._sizes_key = key
            sizes = _SIZES.memo(key, wc.rows, lambda: {"sizes": wc.batch_sizes(nb, per, seed)})["sizes"]
        kept = int(sizes.sum())
        return SizePlan(0, sizes, {"incomplete_batch": n - kept} if kept < n else {})

    def _w_plan(self) -> tuple[SizePlan, NDArray[np.int64] | None]:
        key = (self.epoch, self.world_size, self._clustered_epoch, self._cluster_size_now)
        if self._lazy is None or self._lazy[0] != key:
            raw = self._w_raw(self.epoch, self.world_size)
            # the stream offsets of the batches before evening out: which clusters a stream position is in
            plan = even_out_sizes(raw, self.world_size, self.drop_last)
            self._lazy = (key, plan, raw.offsets if self._wc is not None else None)
            self._announce(self.epoch, plan.dropped, {})
        return self._lazy[1], self._lazy[2]

    def _w_rows(self, epoch: int, boff: NDArray[np.int64] | None, start: int, stop: int) -> NDArray[np.int64]:
        """Rows at stream positions ``[start, stop)`` of ``epoch``'s plan."""
        if self._wc is None:
            return feistel_range(start, stop, self.num_rows, self.epoch_seed(epoch))
        wc, per = self._wc, self.batch_size // self._cluster_size_now
        K, seed = wc.layout.num_clusters, self.epoch_seed(epoch, 0xC1)
        ob = int(np.searchsorted(boff, start, side="right")) - 1
        parts = []
        while start < stop:
            rows = wc.rows_of(ob * per, min(per, K - ob * per), seed)
            if len(rows) != boff[ob + 1] - boff[ob]:  # the sizes came from a damaged cache entry
                _SIZES.forget(getattr(self, "_sizes_key", None), wc.rows)
                raise StalePlanCache(f"the batch sizes cached for {wc.path} (samplers.plan_cache, ngame_sizes) do not "
                                     f"match batch {ob} of the clustering; build the sampler again (or set "
                                     "DATAPIPE_PLAN_CACHE=0)")
            lo, hi = start - int(boff[ob]), min(stop, int(boff[ob + 1])) - int(boff[ob])
            parts.append(rows[lo:hi])
            start, ob = int(boff[ob]) + hi, ob + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _w_on_demand(self):
        plan, boff = self._w_plan()
        epoch = self.epoch
        return plan.num_batches, lambda b: self._w_rows(epoch, boff, *plan.span(b))

    def _w_build_plan(self, epoch: int) -> Plan:
        """The materialised global plan before evening out (``global_plan()`` of small epochs, tests)."""
        raw = self._w_raw(epoch, self.world_size)
        if raw.rows > MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {raw.rows} rows (> {MAX_PLAN_ROWS}); iterate the "
                             "sampler instead, it computes batches on demand")
        rows = self._w_rows(epoch, raw.offsets, 0, raw.rows)
        return Plan(rows, raw.offsets.copy(), dropped=dict(raw.dropped))

    # ---- statistics ---------------------------------------------------------------------------------------
    def _w_stats(self) -> PlanStats:
        plan, _ = self._w_plan()
        sizes, nb = plan.sizes, plan.num_batches
        wc, disk = self._wc, self._disk
        lo, hi = wc.layout.cluster_size_range() if wc is not None else (0, 0)
        opened = disk is not None and disk.open()
        return cast(PlanStats, {
            "epoch": self.epoch, "num_batches": int(nb), "batches_per_rank": int(nb // self.world_size),
            "rows": plan.rows, "mean_batch_size": float(sizes.mean()) if nb else 0.0,
            "min_batch_size": int(sizes.min()) if nb else 0, "max_batch_size": int(sizes.max()) if nb else 0,
            "dropped_rows": int(sum(plan.dropped.values())), "dropped": {k: int(v) for k, v in plan.dropped.items()},
            "repeated": {},
            "clustered": wc is not None, "clustered_epoch": self._clustered_epoch,
            "cluster_size": self._cluster_size_now, "num_clusters": wc.layout.num_clusters if wc else 0,
            "min_cluster_size": lo, "max_cluster_size": hi,
            "bank_bytes": disk.nbytes if opened else 0, "bank_dim": disk.dim if opened else 0,
            "bank_rows_filled": self.num_rows - self._w_missing(), "bank_dirty": self._bank_dirty,
            **self._counts,
            "plan": "windowed", "window_rows": self.window_rows,
            "num_windows": wc.layout.num_windows if wc else 0,
            "bank_path": str(disk.path) if disk is not None else "",
            "clusters_path": str(wc.path) if wc else "",
        })
