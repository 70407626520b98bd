"""Variable sequence length curriculum over a decomposed dataset.

Implements the sampler of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (Pouransari et al., NeurIPS 2024). Every training sequence lives in a bucket ``D_k`` of
``2^k``-token sequences. Each optimisation step takes one bucket and gives every rank a batch of
``tokens_per_batch / 2^k`` sequences of it, so tokens per step are constant while the sequence length varies.
Within a cycle, the bucket of each step is drawn with probability ``o_k * remaining_k / sum_j o_j *
remaining_j`` (``remaining`` counts the bucket's steps not yet taken), so every bucket is used up by the end of
the cycle; ``cycles=c`` splits each bucket into ``c`` slices, one per cycle. Curricula (odds ``o_k``):

* ``"uniform"``: ``o_k = 1`` (buckets sampled in proportion to their size);
* ``"grow-linear"``: ``o_k = max - k + 1``;
* ``"grow-p2"``: ``o_k = 2^(max - k)`` (short sequences first, the paper's best);
* a dict ``{k: o_k}``: odds per bucket; a bucket with odds 0 (or missing) is left out and counted.

Unlike the reference (same seed on every rank, only a warning on mismatch), the bucket of a step comes from a
plan shared by all ranks, so they cannot disagree. When the sequences of a bucket's slice do not fill its last
step, they are left out (counted under ``dropped["incomplete_step"]``) or, with ``drop_last=False``, the step is
filled with sequences of the same slice (counted under ``repeated["incomplete_step"]``).

``drop_last`` means what it means in every sampler (``False`` keeps every row), but its default here is to drop:
this sampler's contract is every piece at most once across ranks and constant tokens per step, and keeping every
sequence of an incomplete step needs either repeats (against the first) or a short batch (against the second).
Unasked, the drop is announced by a ``PlanWarning`` naming both choices; ``drop_last=True`` asks for it (reported
in ``stats()``, no warning), ``drop_last=False`` for the repeats.

Up to ``EXACT_MAX_SEQUENCES`` sequences the plan is materialised (the plans of earlier versions, unchanged).
Above, it is kept as steps over bucket streams (:mod:`samplers.decomposed_windowed`), so 1e9 sequences cost
memory per step, not per sequence: a bucket's order is a stateless Feistel permutation (``native.feistel``), its
``m``-th sequence is found from per-chunk counts of ``sequence_log2`` (``native.bucket_select``; one counting pass,
kept on disk for a memory-mapped index, :mod:`samplers.plan_cache`), and a batch's sequences are computed when it
is yielded. The bucket of every step (the curriculum) and the batch sizes are the exact plan's; only which
sequences of a bucket share a batch differs (another permutation of the bucket).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import cast

import numpy as np
from numpy.typing import NDArray

from native.bucket_select import VALUES, chunk_counts, select_rows
from native.curriculum import curriculum_order
from native.feistel import feistel_permute
from native.rng import mix_seed, permutation
from samplers.base import BatchSamplerBase, Plan, PlanStats, digest_array
from samplers.decomposed_windowed import StepPlan, arrange_steps, first_steps
from samplers.plan_cache import PlanCache, StalePlanCache, source_id

__all__ = ["CURRICULA", "DecomposedBatchSampler", "EXACT_MAX_SEQUENCES", "curriculum_odds"]

CURRICULA = ("uniform", "grow-linear", "grow-p2")
_G = VALUES  # group id = cycle * _G + k
#: Up to this many sequences the plan is materialised (the plans of earlier versions: ~260 B per sequence at its
#: peak, 1 GiB here); above, it is kept as steps over bucket streams (no per-sequence memory).
EXACT_MAX_SEQUENCES = 1 << 22
#: Sequences per chunk of the counting pass (``[chunks, 64]`` int32 counts: 16 MB at 1e9 sequences); finding a
#: bucket's ``m``-th sequence scans one chunk.
CHUNK_SEQUENCES = 1 << 14
#: ``global_plan()`` of a windowed plan refuses to materialise more sequences than this.
MAX_PLAN_ROWS = 1 << 28
#: Counting passes over ``sequence_log2``, shared by the samplers of a process and kept on disk for a
#: memory-mapped index (a fresh-process resume reads 16 MB instead of scanning the index).
_COUNTS = PlanCache("decomposed_counts", keep=4)


def curriculum_odds(curriculum: str | Mapping, buckets: NDArray[np.int64], max_log2: int) -> NDArray[np.float64]:
    """Odds ``o_k`` of every bucket ``k`` in ``buckets`` for a named curriculum or a dict of odds."""
    ks = np.asarray(buckets, dtype=np.int64)
    if isinstance(curriculum, Mapping):
        bad = [k for k in curriculum if not isinstance(k, (int, np.integer)) or k < 0]
        if bad:
            raise ValueError(f"curriculum dict keys must be bucket log2 sizes k (ints >= 0) (got {bad})")
        odds = np.array([float(curriculum.get(int(k), 0.0)) for k in ks])
        if not np.isfinite(odds).all() or (odds < 0).any():
            raise ValueError(f"curriculum odds must be finite and >= 0 (got {dict(curriculum)})")
        return odds
    if curriculum == "uniform":
        return np.ones(len(ks))
    if curriculum == "grow-linear":
        return (max_log2 - ks + 1).astype(np.float64)
    if curriculum == "grow-p2":
        return np.exp2(max_log2 - ks).astype(np.float64)
    raise ValueError(f"curriculum must be one of {CURRICULA} or a dict {{k: odds}} (got {curriculum=})")


class DecomposedBatchSampler(BatchSamplerBase):
    """Batches of sequence ids of one bucket per step, constant tokens per step, a length curriculum.

    Args:
        index: any object with an integer ``sequence_log2`` array ``[S]`` (the ``k`` of each sequence), such as
            ``datapipe.DecomposedIndex``; optional attributes ``max_log2`` (else the largest ``k`` present),
            ``sequence_tokens`` ``[S]`` (real tokens), and piece arrays ``sequence`` and ``length`` (for the
            attention cost of packed sequences in :meth:`stats`). Above :data:`EXACT_MAX_SEQUENCES` sequences
            ``sequence_log2`` may be a memory map of any integer dtype (e.g. int8 ``.npy``): it is read in place
            (one counting pass, then one chunk per sequence looked up) and never copied, and a rank holds a few
            bytes per step (1e9 sequences: ~90 MiB).
        tokens_per_batch: tokens in each batch a rank yields; a multiple of ``2^max_log2``. A batch of
            bucket ``k`` holds ``tokens_per_batch >> k`` sequences.
        curriculum: ``"grow-p2"`` (default), ``"grow-linear"``, ``"uniform"`` or a dict ``{k: odds}``.
        cycles: number of curriculum cycles per epoch; each uses a disjoint ``1/cycles`` slice of every bucket.
        seed, rank, world_size: as in every sampler.
        drop_last: ``None`` (default): sequences that do not fill a whole step of their bucket are left out, with a
            ``PlanWarning``; ``True``: the same, asked for (no warning); ``False``: every sequence is in the epoch,
            a bucket slice's last step filled with repeats of the slice (reported, no warning).
        incomplete: deprecated (one release): ``"drop"`` is ``drop_last=True``, ``"repeat"`` ``drop_last=False``.

    Yields:
        int64 arrays of sequence ids, ``tokens_per_batch >> k`` of them, all of one bucket ``k``; every rank's
        batch at a step has the same ``k``.
    """

    def __init__(self, index, tokens_per_batch: int, *, curriculum: str | Mapping = "grow-p2", cycles: int = 1,
                 incomplete: str | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool | None = None, strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=True, strict=strict)
        if drop_last is not None and not isinstance(drop_last, (bool, np.bool_)):
            raise TypeError(f"drop_last must be True, False or None (got {drop_last!r})")
        if incomplete is not None:
            if incomplete not in ("drop", "repeat"):
                raise ValueError(f"incomplete must be 'drop' or 'repeat' (got {incomplete=}); it is deprecated: "
                                 "pass drop_last=True or drop_last=False")
            warnings.warn(f"DecomposedBatchSampler(incomplete={incomplete!r}) is deprecated and goes in the next "
                          f"release: pass drop_last={incomplete == 'drop'} (drop_last=False fills a bucket's last "
                          "step with repeats, True leaves its sequences out)", DeprecationWarning, stacklevel=2)
            drop_last = incomplete == "drop"
        self._drop_asked = drop_last is not None  # drops of incomplete steps were asked for, or repeats were
        incomplete = "repeat" if drop_last is False else "drop"
        log2 = getattr(index, "sequence_log2", None)
        if log2 is None:
            raise TypeError(f"index must have a 'sequence_log2' array (got {type(index).__name__})")
        log2 = np.asarray(log2)
        if log2.ndim != 1 or log2.dtype.kind not in "iu":
            raise TypeError(f"index.sequence_log2 must be a 1-D integer array (got {log2.dtype}, {log2.shape})")
        if len(log2) == 0:
            raise ValueError("index has no sequences (every bucket is empty); decompose a non-empty dataset")
        self.num_sequences = len(log2)
        self._sizes: dict[int, int] = {}  # bucket k -> sequences
        self.windowed = self.num_sequences > EXACT_MAX_SEQUENCES
        if self.windowed:
            self.sequence_log2 = log2  # read in place (a memory map stays one), never copied
            self._count_buckets()
        else:
            self.sequence_log2 = log2.astype(np.int64, copy=False)
            if self.sequence_log2.min() < 0 or self.sequence_log2.max() >= _G:
                raise ValueError(f"index.sequence_log2 must be in [0, {_G}) (got {self.sequence_log2.min()}.."
                                 f"{self.sequence_log2.max()})")
        top = max(self._sizes) if self.windowed else int(self.sequence_log2.max())
        max_log2 = getattr(index, "max_log2", None)
        self.max_log2 = int(top if max_log2 is None else max_log2)
        if top > self.max_log2:
            raise ValueError(f"index has sequences of 2^{top} > 2^max_log2={self.max_log2}")
        unit = 1 << self.max_log2
        if not isinstance(tokens_per_batch, (int, np.integer)) or tokens_per_batch < unit or tokens_per_batch % unit:
            raise ValueError(
                f"tokens_per_batch must be a positive multiple of 2^max_log2={unit} so every bucket gets whole "
                f"sequences (got {tokens_per_batch=}); e.g. tokens_per_batch={unit * 8}"
            )
        if not isinstance(cycles, (int, np.integer)) or cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1 (got {cycles=})")
        self.tokens_per_batch = int(tokens_per_batch)
        self.cycles = int(cycles)
        self.incomplete = incomplete
        if not self.windowed:
            order = np.argsort(self.sequence_log2, kind="stable")
            ks, starts = np.unique(self.sequence_log2[order], return_index=True)
            bounds = np.append(starts, len(order))
            self._members = {int(k): order[bounds[i] : bounds[i + 1]] for i, k in enumerate(ks)}
            self._sizes = {k: len(v) for k, v in self._members.items()}
        if isinstance(curriculum, Mapping):
            empty = [int(k) for k, o in curriculum.items() if o and int(k) not in self._sizes]
            if empty:
                raise ValueError(f"curriculum gives odds to empty bucket(s) k={empty}: the index has no sequence of "
                                 f"2^k tokens there (non-empty buckets: {sorted(self._sizes)})")
            self.curriculum_name = "custom:" + ",".join(f"{int(k)}={float(v):g}" for k, v in sorted(curriculum.items()))
        else:
            self.curriculum_name = str(curriculum)
        self.buckets = np.array(sorted(self._sizes), dtype=np.int64)
        self.odds = curriculum_odds(curriculum, self.buckets, self.max_log2)
        self._tokens = getattr(index, "sequence_tokens", None)
        self._index = index
        self._lazy: tuple | None = None  # windowed: ((epoch, segments, world_size), StepPlan)
        # builds (and caches) the plan of the current epoch
        if (self._step_plan().num_batches if self.windowed else self.global_plan().num_batches) == 0:
            raise ValueError(
                f"no bucket fills one step of {self.world_size} batch(es) of {self.tokens_per_batch} tokens "
                f"(sequences per bucket: {self._sizes}); lower tokens_per_batch, cycles or world_size, or pass "
                "drop_last=False (repeats fill the last step)"
            )

    def _options(self) -> dict:
        out = {"tokens_per_batch": self.tokens_per_batch, "cycles": self.cycles, "curriculum": self.curriculum_name,
               "incomplete": self.incomplete, "max_log2": self.max_log2}
        if self.windowed:
            out.update(plan="windowed", chunk=self._chunk)
        return out

    def _metadata(self) -> dict:
        return {"sequences": self.num_sequences, "sequence_log2": digest_array(self.sequence_log2)}

    def _asked_for(self) -> frozenset:
        # drop_last, when passed, asks for what happens to a bucket's last step: False for the repeats that fill it,
        # True for leaving its sequences out; the default drops unasked (warned)
        return frozenset({"incomplete_step"}) if self._drop_asked else frozenset()

    def _lost_share(self, plan: Plan) -> str:
        real = np.left_shift(np.int64(1), self.sequence_log2)
        return f" ({1 - float(real[np.unique(plan.indices)].sum()) / float(real.sum()):.1%} of sequence tokens)"

    # ---- plan ---------------------------------------------------------------------------------------------
    def batch_size(self, k: int) -> int:
        """Sequences per batch in bucket ``k``."""
        return self.tokens_per_batch >> int(k)

    def _build_plan(self, epoch: int) -> Plan:
        seed = self.epoch_seed(epoch)
        W, C = self.world_size, self.cycles
        shuffled = {}
        for k, m in self._members.items():
            shuffled[k] = m[permutation(len(m), mix_seed(seed, k))]
        parts, sizes, groups = [], [], []
        dropped = {}
        repeated = 0
        for c in range(C):
            for k, o in zip(self.buckets.tolist(), self.odds.tolist()):
                seqs = shuffled[k]
                sl = seqs[c * len(seqs) // C : (c + 1) * len(seqs) // C]
                if o == 0:
                    dropped["zero_odds"] = dropped.get("zero_odds", 0) + len(sl)
                    continue
                b = self.batch_size(k)
                per_step = b * W
                steps = len(sl) // per_step
                if len(sl) % per_step and self.incomplete == "repeat":
                    steps += 1
                    repeated += steps * per_step - len(sl)
                    sl = np.resize(sl, steps * per_step)
                else:
                    lost = len(sl) - steps * per_step
                    if lost:
                        dropped["incomplete_step"] = dropped.get("incomplete_step", 0) + lost
                if steps == 0:
                    continue
                parts.append(sl[: steps * per_step])
                sizes.append(np.full(steps * W, b, np.int64))
                groups.append(np.full(steps * W, c * _G + k, np.int64))
        if not parts:
            return Plan(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64), dropped)
        plan = Plan.from_sizes(np.concatenate(parts), np.concatenate(sizes), groups=np.concatenate(groups),
                               dropped=dropped)
        if repeated:
            plan.repeated["incomplete_step"] = repeated
        return plan

    def _step_order_kw(self, plan: Plan) -> dict:
        """The curriculum: cycle after cycle, each cycle's steps drawn bucket by bucket with the odds."""
        W = self.world_size
        g = plan.groups[::W]  # one entry per step, steps laid out group after group in order of appearance
        uniq, first, counts = np.unique(g, return_index=True, return_counts=True)
        o = np.argsort(first)
        uniq, first, counts = uniq[o], first[o], counts[o]
        seed = self.epoch_seed(None, 0xC0BB)
        out = []
        odds_of = dict(zip(self.buckets.tolist(), self.odds.tolist()))
        for c in range(self.cycles):
            sel = np.flatnonzero(uniq // _G == c)
            if not len(sel):
                continue
            ks = uniq[sel] % _G
            draws = curriculum_order(counts[sel], np.array([odds_of[int(k)] for k in ks]), mix_seed(seed, c))
            steps = np.empty(len(draws), np.int64)
            for i, s in enumerate(sel):
                pos = np.flatnonzero(draws == i)
                steps[pos] = first[s] + np.arange(len(pos))
            out.append(steps)
        return {"step_order": np.concatenate(out) if out else np.zeros(0, np.int64)}

    # ---- windowed plans (above EXACT_MAX_SEQUENCES) --------------------------------------------------------
    def _count_buckets(self) -> None:
        """The counting pass: sequences of every bucket per chunk (shared in-process, on disk for a memory map)."""
        log2 = self.sequence_log2
        self._chunk = CHUNK_SEQUENCES
        key = (len(log2), log2.dtype.str, digest_array(log2), source_id(log2), self._chunk)

        def count() -> dict:
            counts, bad = chunk_counts(log2, self._chunk)
            return {"counts": counts, "first_bad": bad}

        tables = _COUNTS.memo(key, log2, count)
        bad = int(tables["first_bad"])
        if bad >= 0:
            raise ValueError(f"index.sequence_log2 must be in [0, {_G}) (row {bad} has {int(log2[bad])}); "
                             "decompose the dataset again or fix that row")
        counts = tables["counts"]
        totals = counts.sum(axis=0, dtype=np.int64)
        self._sizes = {int(k): int(totals[k]) for k in np.flatnonzero(totals)}
        self._cum = {}  # k -> int64 [chunks + 1]: sequences of bucket k before each chunk
        for k in self._sizes:
            cum = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts[:, k], out=cum[1:])
            self._cum[k] = cum
        self._counts_key, self._counts_cached = key, bool(tables.get("from_disk"))

    def _step_plan(self) -> StepPlan:
        """The rest of the current epoch for this world size, as steps over bucket streams (windowed plans)."""
        key = (self.epoch, self._segments, self.world_size)
        if self._lazy is None or self._lazy[0] != key:
            epoch = self.epoch
            odds = dict(zip(self.buckets.tolist(), self.odds.tolist()))

            def first(w: int) -> StepPlan:
                return first_steps(self._sizes, odds, tokens_per_batch=self.tokens_per_batch, cycles=self.cycles,
                                   world_size=w, incomplete=self.incomplete, seed=self.epoch_seed(epoch, 0xC0BB))

            plan = arrange_steps(first, self._segments, self.world_size)
            self._lazy = (key, plan)
            self._announce(epoch, plan.dropped, plan.repeated)
        return self._lazy[1]

    def _batch_rows(self, epoch: int, plan: StepPlan, b: int) -> NDArray[np.int64]:
        """Sequence ids of global batch ``b`` of ``plan``: int64 ``[tokens_per_batch >> k]``."""
        g, p0, size = plan.batch_span(b)
        k = int(plan.k[g])
        pos = plan.lo[g] + np.arange(p0, p0 + size, dtype=np.int64) % plan.length[g]
        members = feistel_permute(pos, self._sizes[k], mix_seed(self.epoch_seed(epoch), k))
        rows = select_rows(self.sequence_log2, self._chunk, self._cum[k], k, members)
        if self._counts_cached and not (np.asarray(self.sequence_log2[rows]) == k).all():
            _COUNTS.forget(self._counts_key, self.sequence_log2)
            raise StalePlanCache("the counting pass of index.sequence_log2 read from the plan cache does not match "
                                 "the index (a damaged cache entry); the entry was removed: build the sampler again "
                                 "(or set DATAPIPE_PLAN_CACHE=0)")
        return rows

    def _on_demand(self):
        if not self.windowed:
            return None
        plan, epoch = self._step_plan(), self.epoch
        return plan.num_batches, lambda b: self._batch_rows(epoch, plan, b)

    def global_plan(self) -> Plan:
        """The arranged global plan of the current epoch (every rank's batches, step-major); a windowed plan is
        materialised on request (small epochs, tests), never while iterating."""
        if not self.windowed:
            return super().global_plan()
        plan = self._step_plan()
        if plan.rows > MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {plan.rows} sequences (> {MAX_PLAN_ROWS}); iterate "
                             "the sampler instead, it computes batches on demand")
        parts = [self._batch_rows(self.epoch, plan, b) for b in range(plan.num_batches)]
        groups = np.repeat(plan.cycle[plan.step_group] * _G + plan.k[plan.step_group], plan.world_size)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        return Plan.from_sizes(np.concatenate(parts) if parts else np.zeros(0, np.int64), sizes, groups=groups,
                               dropped=dict(plan.dropped), repeated=dict(plan.repeated))

    def _windowed_stats(self) -> PlanStats:
        """Statistics of a windowed plan from its steps (no sequence materialised)."""
        plan = self._step_plan()
        W, nb = plan.world_size, plan.num_batches
        used = plan.steps > 0
        per_bucket = {}
        for k in self.buckets.tolist():
            sel = plan.k == k
            steps = int(plan.steps[sel].sum())
            per_bucket[int(k)] = {"sequences": steps * W * self.batch_size(k), "steps": steps,
                                  "tokens": (steps * W * self.batch_size(k)) << k, "batch_size": self.batch_size(k),
                                  "available_sequences": int(self._sizes[k])}
        rows = plan.rows
        out = {
            "epoch": self.epoch, "num_batches": int(nb), "batches_per_rank": int(nb // W), "rows": rows,
            "mean_batch_size": rows / nb if nb else 0.0,
            "min_batch_size": int(plan.batch[used].min()) if nb else 0,
            "max_batch_size": int(plan.batch[used].max()) if nb else 0,
            "dropped_rows": int(sum(plan.dropped.values())),
            "dropped": {k: int(v) for k, v in plan.dropped.items()},
            "repeated": {k: int(v) for k, v in plan.repeated.items()},
            "plan": "windowed", "curriculum": self.curriculum_name, "cycles": self.cycles,
            "tokens_per_batch": self.tokens_per_batch, "steps": plan.num_steps,
            "tokens_per_step": self.tokens_per_batch * W, "buckets": per_bucket,
            "tokens_per_bucket": {k: v["tokens"] for k, v in per_bucket.items()},
            "tokens": sum(v["tokens"] for v in per_bucket.values()),
            "step_log2": plan.k[plan.step_group].tolist(),
        }
        return cast(PlanStats, out)

    # ---- statistics ---------------------------------------------------------------------------------------
    def _sequence_cost(self) -> NDArray[np.float64]:
        """Attention cost ``sum L^2`` of every sequence, over its document segments when the index has pieces."""
        if getattr(self, "_cost", None) is None:
            seq = getattr(self._index, "sequence", None)
            length = getattr(self._index, "length", None)
            if seq is not None and length is not None and len(seq) == len(length):
                L = np.asarray(length, dtype=np.float64)
                self._cost = np.bincount(np.asarray(seq), weights=L * L, minlength=self.num_sequences)
            else:
                self._cost = np.exp2(2.0 * self.sequence_log2)
        return self._cost

    def stats(self) -> PlanStats:
        """Plan statistics: per bucket sequences, steps and tokens; steps; tokens per step; attention cost.

        A windowed plan (above ``EXACT_MAX_SEQUENCES``) reports the same keys from its steps, except the
        attention cost and ``real_tokens_per_step_mean`` (they need every sequence's pieces); its ``tokens`` count
        ``2^k`` per sequence slot (real tokens differ only for padded remainder sequences), and ``plan`` is
        ``"windowed"``.
        """
        if self.windowed:
            return self._windowed_stats()
        out: dict = dict(super().stats())  # the shared keys (PlanStats), then its own
        plan = self.global_plan()
        W = self.world_size
        ks = plan.groups % _G if plan.num_batches else np.zeros(0, np.int64)
        real = (np.asarray(self._tokens, dtype=np.int64) if self._tokens is not None
                else np.left_shift(np.int64(1), self.sequence_log2))
        step_of_row = np.repeat(np.arange(plan.num_batches) // W, plan.sizes)
        steps = plan.num_batches // W
        cost = np.bincount(step_of_row, weights=self._sequence_cost()[plan.indices], minlength=steps)
        tok = np.bincount(step_of_row, weights=real[plan.indices], minlength=steps)
        per_bucket = {}
        row_k = np.repeat(ks, plan.sizes)
        for k in self.buckets.tolist():
            sel = ks == k
            rows = plan.indices[row_k == k]
            per_bucket[int(k)] = {"sequences": int(len(rows)), "steps": int(sel.sum() // W),
                                  "tokens": int(real[rows].sum()), "batch_size": self.batch_size(k),
                                  "available_sequences": int(self._sizes[k])}
        total_tokens = float(tok.sum())
        out.update(
            curriculum=self.curriculum_name, cycles=self.cycles, tokens_per_batch=self.tokens_per_batch,
            steps=int(steps), tokens_per_step=self.tokens_per_batch * W,
            real_tokens_per_step_mean=float(tok.mean()) if steps else 0.0,
            tokens=int(total_tokens), buckets=per_bucket,
            tokens_per_bucket={k: v["tokens"] for k, v in per_bucket.items()},
            attention_cost_per_step=cost.tolist(),  # [steps]: sum of L^2 over the step's sequences (all ranks)
            attention_cost_per_step_mean=float(cost.mean()) if steps else 0.0,
            attention_cost_per_token=float(cost.sum() / total_tokens) if total_tokens else 0.0,
            # concat-and-chunk at 2^max_log2 costs 2^max_log2 per token (full causal attention per chunk)
            attention_cost_vs_concat_chunk=float(cost.sum() / total_tokens / (1 << self.max_log2))
            if total_tokens else 0.0,
            step_log2=ks[::W].tolist() if steps else [],
        )
        return cast(PlanStats, out)
