"""Recipes: one file that says which domains, in what proportions over training, batched how, for how long.

A recipe joins the pieces the papers combine: several dataset directories (the domains), a mixture schedule
(``mixtures.schedules``: constant, piecewise, linear, domain up-sampling at the end of training as in Blakeney
et al. 2024, or a RegMix optimum, Liu et al. ICLR 2025), and a batching (dataset decomposition with a length
curriculum, Pouransari et al. NeurIPS 2024; duration buckets for speech, Żelasko et al. 2025; token budgets; plain
random batches). ``recipe.loader(rank, world_size)`` gives a ``datapipe.DataLoader`` over the domains whose
batches carry a ``domain`` column; ``recipe.plan(world_size)`` is the dry run: the whole run's plan from metadata
only (no token read), with units and passes per domain, buckets over steps, padding, drops and repeats.

Example (``recipe.toml``)::

    total_steps = 20000
    seed = 0
    [domains]
    web = {path = "data/web"}
    code = {path = "data/code"}
    math = {path = "data/math"}
    [schedule]
    kind = "domain_upsampling"
    base = {web = 0.7, code = 0.2, math = 0.1}
    upsampled = {web = 0.4, code = 0.3, math = 0.3}
    final_fraction = 0.2
    [batching]
    kind = "decomposed"
    tokens_per_batch = 65536
    min_log2 = 8
    max_log2 = 13
    curriculum = "grow-p2"

Relative paths are read from the recipe file's directory (else from the working directory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np

__all__ = ["BATCHING_KINDS", "SCHEDULE_KINDS", "Recipe", "plot_plan"]

SCHEDULE_KINDS = ("constant", "piecewise", "domain_upsampling", "linear", "regmix")
#: batching kind -> (required keys, optional keys with defaults)
BATCHING_KINDS: dict[str, tuple[tuple[str, ...], dict]] = {
    "decomposed": (("tokens_per_batch",), {"min_log2": 8, "max_log2": 13, "curriculum": "grow-p2", "cycles": 1,
                                           "remainder": "pack", "decompose_seed": 0}),
    "duration": (("max_duration",), {"num_buckets": 30, "duration_bins": None, "quadratic_duration": None,
                                     "max_cuts": None, "column": "duration", "cycles": 1}),
    "token_budget": (("max_tokens",), {"num_buckets": 8, "bucket_bins": None, "max_rows": None,
                                       "column": "length", "cycles": 1}),
    "random": (("batch_size",), {"measure": "tokens", "column": "length"}),
}
_COMMON = {"max_passes": 4.0, "strict": False}
_TOP_KEYS = ("domains", "schedule", "batching", "total_steps", "seed")


def _err(msg: str, source: str | None) -> ValueError:
    return ValueError(f"{source}: {msg}" if source else msg)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training-data recipe (see the module docstring for the file format).

    Attributes:
        domains: name -> ``{"path": dataset directory}``, in domain-id order.
        schedule: ``{"kind": ..., parameters of mixtures.schedules}`` or ``{"regmix": "best.json"}``.
        batching: ``{"kind": "decomposed" | "duration" | "token_budget" | "random", options}``.
        total_steps: optimisation steps of the run (every rank yields this many batches).
        seed: seed of the plan.
        base_dir: directory relative paths are read from (the recipe file's).
        source: where the recipe came from (for error messages).
    """

    domains: dict
    schedule: dict
    batching: dict
    total_steps: int
    seed: int = 0
    base_dir: str | None = None
    source: str | None = None

    # ---- reading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping, *, base_dir: str | os.PathLike | None = None,
                  source: str | None = None) -> Recipe:
        """Validate a recipe dict (sections ``domains``, ``schedule``, ``batching``, ``total_steps``, ``seed``).

        Raises:
            ValueError / TypeError: naming the section and key, what is allowed and the fix.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"a recipe is a dict of sections {list(_TOP_KEYS)} (got {type(d).__name__})")
        unknown = [k for k in d if k not in _TOP_KEYS]
        missing = [k for k in ("domains", "schedule", "batching", "total_steps") if k not in d]
        if unknown or missing:
            raise _err(f"recipe has unknown sections {unknown} and misses {missing}; sections are "
                       f"{list(_TOP_KEYS)} (seed is optional)", source)
        doms = d["domains"]
        if not isinstance(doms, Mapping) or not doms:
            raise _err("domains must be a non-empty table name -> {path = ...}", source)
        domains = {}
        for name, spec in doms.items():
            if isinstance(spec, (str, os.PathLike)):
                spec = {"path": str(spec)}
            if not isinstance(spec, Mapping) or "path" not in spec:
                raise _err(f"domains.{name} must be {{path = \"DIR\"}} (got {spec!r})", source)
            extra = [k for k in spec if k != "path"]
            if extra:
                raise _err(f"domains.{name} has unknown keys {extra}; only 'path' is read", source)
            domains[str(name)] = {"path": str(spec["path"])}
        ts = d["total_steps"]
        if not isinstance(ts, (int, np.integer)) or isinstance(ts, bool) or ts < 1:
            raise _err(f"total_steps must be an integer >= 1 (got {ts!r})", source)
        seed = d.get("seed", 0)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise _err(f"seed must be an integer (got {seed!r})", source)
        sched = d["schedule"]
        if not isinstance(sched, Mapping):
            raise _err(f"schedule must be a table with 'kind' (one of {list(SCHEDULE_KINDS)}) (got {sched!r})", source)
        batching = cls._check_batching(d["batching"], source)
        out = cls(domains, dict(sched), batching, int(ts), int(seed),
                  None if base_dir is None else str(base_dir), source)
        out.build_schedule()  # fail early on a bad schedule
        return out

    @staticmethod
    def _check_batching(b, source) -> dict:
        if not isinstance(b, Mapping) or "kind" not in b:
            raise _err(f"batching must be a table with 'kind' (one of {list(BATCHING_KINDS)}) (got {b!r})", source)
        kind = b["kind"]
        if kind not in BATCHING_KINDS:
            raise _err(f"batching.kind must be one of {list(BATCHING_KINDS)} (got {kind!r})", source)
        required, optional = BATCHING_KINDS[kind]
        allowed = {"kind", *required, *optional, *_COMMON}
        unknown = [k for k in b if k not in allowed]
        missing = [k for k in required if k not in b]
        if unknown or missing:
            raise _err(f"batching ({kind}) has unknown keys {unknown} and misses {missing}; allowed: "
                       f"{sorted(allowed - {'kind'})}", source)
        return {"kind": kind, **optional, **_COMMON, **{k: v for k, v in b.items() if k != "kind"}}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read a recipe from ``.toml`` (tomllib), ``.json`` or ``.yaml``/``.yml`` (PyYAML)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such recipe file")
        text = p.read_text()
        suffix = p.suffix.lower()
        try:
            if suffix == ".toml":
                try:
                    import tomllib
                except ImportError:  # pragma: no cover - Python 3.10
                    import tomli as tomllib
                d = tomllib.loads(text)
            elif suffix == ".json":
                d = json.loads(text)
            elif suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text)
            else:
                raise ValueError(f"{p}: unknown recipe format {suffix!r}; use .toml, .json or .yaml")
        except (json.JSONDecodeError, ValueError) as e:
            if str(e).startswith(str(p)):
                raise
            raise ValueError(f"{p}: cannot parse ({e})") from None
        except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError (a ValueError already)
            raise ValueError(f"{p}: cannot parse ({e})") from None
        return cls.from_dict(d, base_dir=p.resolve().parent, source=str(p))

    def to_dict(self) -> dict:
        """The recipe as a plain dict (what :meth:`from_dict` reads)."""
        return {"domains": {k: dict(v) for k, v in self.domains.items()}, "schedule": dict(self.schedule),
                "batching": dict(self.batching), "total_steps": self.total_steps, "seed": self.seed}

    # ---- parts --------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.domains)

    def paths(self) -> list[Path]:
        """The domain directories: relative paths are read from ``base_dir`` (the recipe file's directory), or from
        the working directory when only it has them."""
        out = []
        for spec in self.domains.values():
            p = Path(spec["path"]).expanduser()
            if not p.is_absolute() and self.base_dir is not None:
                beside = Path(self.base_dir) / p
                p = p if not beside.exists() and p.exists() else beside
            out.append(p)
        return out

    def _weights(self, w, key: str) -> dict:
        if not isinstance(w, Mapping) or not w:
            raise _err(f"schedule.{key} must be a table domain -> weight (got {w!r})", self.source)
        unknown = [k for k in w if k not in self.domains]
        if unknown:
            raise _err(f"schedule.{key} names domains {unknown} that are not in [domains] {self.names}", self.source)
        return {d: float(w.get(d, 0.0)) for d in self.domains}

    def build_schedule(self):
        """The ``mixtures.schedules`` object of the ``schedule`` section, with the recipe's domain order."""
        from mixtures.schedules import Constant, DomainUpsampling, Linear, Piecewise

        s = dict(self.schedule)
        if "regmix" in s:
            return self._regmix_schedule(s)
        kind = s.pop("kind", None)
        params = {"constant": ("weights",), "piecewise": ("phases",),
                  "domain_upsampling": ("base", "upsampled", "final_fraction"),
                  "linear": ("start", "end", "start_fraction", "end_fraction")}
        if kind not in params:
            raise _err(f"schedule.kind must be one of {list(params)} (or give {{regmix = \"best.json\"}}) "
                       f"(got {kind!r})", self.source)
        unknown = [k for k in s if k not in params[kind]]
        if unknown:
            raise _err(f"schedule ({kind}) has unknown keys {unknown}; its parameters are {list(params[kind])}",
                       self.source)
        try:
            if kind == "constant":
                return Constant(self._weights(s.get("weights"), "weights"))
            if kind == "domain_upsampling":
                return DomainUpsampling(self._weights(s.get("base"), "base"),
                                        self._weights(s.get("upsampled"), "upsampled"),
                                        final_fraction=s.get("final_fraction", 0.1))
            if kind == "linear":
                return Linear(self._weights(s.get("start"), "start"), self._weights(s.get("end"), "end"),
                              start_fraction=float(s.get("start_fraction", 0.0)),
                              end_fraction=float(s.get("end_fraction", 1.0)))
            phases = s.get("phases")
            if not isinstance(phases, (list, tuple)) or not phases:
                raise _err("schedule.phases must be a list of [start_fraction, {domain = weight}] pairs (or "
                           "{start = f, weights = {...}} tables)", self.source)
            out = []
            for i, ph in enumerate(phases):
                if isinstance(ph, Mapping):
                    ph = (ph.get("start"), ph.get("weights"))
                if not isinstance(ph, (list, tuple)) or len(ph) != 2:
                    raise _err(f"schedule.phases[{i}] must be [start_fraction, weights] (got {ph!r})", self.source)
                out.append((float(ph[0]), self._weights(ph[1], f"phases[{i}]")))
            return Piecewise(out)
        except (TypeError, ValueError) as e:
            if self.source and str(e).startswith(self.source):
                raise
            raise _err(f"schedule ({kind}): {e}", self.source) from None

    def _regmix_schedule(self, s: dict):
        from mixtures.schedules import Constant

        extra = [k for k in s if k != "regmix"]
        if extra:
            raise _err(f"schedule with regmix takes no other keys (got {extra})", self.source)
        p = Path(s["regmix"])
        if not p.is_absolute() and self.base_dir is not None:
            p = Path(self.base_dir) / p
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise _err(f"schedule.regmix: cannot read {p} ({e}); give the file `datapipe regmix search --out` "
                       "wrote", self.source) from None
        w = doc.get("weights", doc) if isinstance(doc, Mapping) else None
        if not isinstance(w, Mapping):
            raise _err(f"schedule.regmix: {p} has no 'weights' table", self.source)
        mine = {d: float(w.get(d, 0.0)) for d in self.domains}
        total = sum(mine.values())
        if not total > 0:
            raise _err(f"schedule.regmix: {p} gives no weight to any of the recipe's domains {self.names}",
                       self.source)
        # RegMix searches over all its domains; the recipe's subset is renormalised
        return Constant({d: v / total for d, v in mine.items()})

    def _decomposition(self, path: Path, *, build: bool):
        """The domain's decomposition with the recipe's parameters: the stored one when they match, else built
        (``build=True``: stored beside the dataset) or computed in memory (the dry run). Under torch.distributed
        rank 0 builds it while the other ranks wait, then they open it."""
        if build:
            try:
                import torch.distributed as dist

                group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            except ImportError:  # pragma: no cover - torch is a dependency
                group = False
            if group:
                ix = self._find_or_build(path, build=True) if dist.get_rank() == 0 else None
                dist.barrier()
                return ix if ix is not None else self._find_or_build(path, build=True)
        return self._find_or_build(path, build=build)

    def _find_or_build(self, path: Path, *, build: bool):
        from datapipe.dataset import ArrowDataset
        from datapipe.decomposition import DecomposedIndex, decompose

        b = self.batching
        want = {"min_log2": int(b["min_log2"]), "max_log2": int(b["max_log2"]), "remainder": b["remainder"],
                "seed": int(b["decompose_seed"])}
        if DecomposedIndex.exists(path):
            try:
                ix = DecomposedIndex.open(path)
                if all(ix.params.get(k) == v for k, v in want.items()):
                    return ix
            except ValueError:  # stale (dataset changed): rebuild below
                pass
        if build:
            return decompose(path, **want)
        from native.decompose import decompose_lengths

        lengths = ArrowDataset.open(path).index.get("length")
        if lengths is None:
            raise _err(f"domain at {path}: its index has no 'length' column; write it with token ids in "
                       "'input_ids'", self.source)
        arr = decompose_lengths(np.asarray(lengths), **want)
        return SimpleNamespace(sequence_log2=arr["sequence_log2"], sequence_tokens=arr["sequence_tokens"],
                               max_log2=want["max_log2"])

    def _index_column(self, path: Path, column: str) -> np.ndarray:
        from datapipe.dataset import ArrowDataset

        idx = ArrowDataset.open(path).index
        if column not in idx:
            raise _err(f"domain at {path}: {path / 'index.arrow'} has no column {column!r} (columns: "
                       f"{sorted(idx)}); set batching.column", self.source)
        return np.asarray(idx[column])

    def sampler(self, rank: int | None = None, world_size: int | None = None, *, build: bool = True):
        """The ``samplers.ShapedMixtureBatchSampler`` of the recipe for one rank (``build=False``: never write a
        decomposition; compute missing ones in memory)."""
        from samplers.shaped_mixture import ShapedMixtureBatchSampler as S

        b = self.batching
        kind = b["kind"]
        sched = self.build_schedule()
        common = {"total_steps": self.total_steps, "seed": self.seed, "rank": rank, "world_size": world_size,
                  "max_passes": float(b["max_passes"]), "strict": bool(b["strict"])}
        paths = self.paths()
        for name, p in zip(self.names, paths):
            if not (p / "manifest.json").exists():
                raise _err(f"domains.{name}: {p} is not a dataset directory (no manifest.json); build it with "
                           "`datapipe ingest` or write_dataset", self.source)
        if kind == "decomposed":
            idx = [self._decomposition(p, build=build) for p in paths]
            return S.from_decomposed(idx, sched, tokens_per_batch=b["tokens_per_batch"], curriculum=b["curriculum"],
                                     cycles=b["cycles"], **common)
        if kind == "duration":
            return S.from_durations([self._index_column(p, b["column"]) for p in paths], sched,
                                    max_duration=b["max_duration"], num_buckets=b["num_buckets"],
                                    duration_bins=b["duration_bins"], quadratic_duration=b["quadratic_duration"],
                                    max_cuts=b["max_cuts"], cycles=b["cycles"], **common)
        if kind == "token_budget":
            return S.from_lengths([self._index_column(p, b["column"]) for p in paths], sched,
                                  max_tokens=b["max_tokens"], num_buckets=b["num_buckets"],
                                  bucket_bins=b["bucket_bins"], max_rows=b["max_rows"], cycles=b["cycles"], **common)
        from datapipe.dataset import ArrowDataset

        if b["measure"] not in ("tokens", "rows"):
            raise _err(f"batching.measure must be 'tokens' or 'rows' (got {b['measure']!r})", self.source)
        lengths = [self._index_column(p, b["column"]) for p in paths] if b["measure"] == "tokens" else None
        return S.from_rows([len(ArrowDataset.open(p)) for p in paths], sched, batch_size=b["batch_size"],
                           lengths=lengths, **common)

    def dataset(self):
        """The ``datapipe.multi.MultiDataset`` over the domains (decomposed sequences for ``decomposed``)."""
        from datapipe.dataset import ArrowDataset
        from datapipe.multi import MultiDataset

        if self.batching["kind"] == "decomposed":
            from datapipe.decomposed_dataset import DecomposedDataset

            parts = [DecomposedDataset(p, self._decomposition(p, build=True)) for p in self.paths()]
        else:
            parts = [ArrowDataset.open(p) for p in self.paths()]
        return MultiDataset(parts, self.names)

    def loader(self, rank: int | None = None, world_size: int | None = None, **dataloader_kwargs):
        """A ``datapipe.DataLoader`` of this rank's batches; keyword arguments go to the loader (``num_workers``,
        ``collate_fn``, ...). Decomposed batches are ``[b, 2^k]`` tensors; token kinds are padded by
        ``collate.pad()`` unless ``collate_fn`` is given. Every batch has ``domain`` (ids in domain order).
        A domain without a matching decomposition gets one first (under torch.distributed, rank 0 builds it while
        the other ranks wait; without a process group, build it once before starting several ranks)."""
        from datapipe.loader import DataLoader

        for k in ("batch_sampler", "sampler", "batch_size", "shuffle", "drop_last"):
            if k in dataloader_kwargs:
                raise TypeError(f"recipe.loader() builds the batch sampler itself; do not pass {k}=")
        sampler = self.sampler(rank, world_size)
        if "collate_fn" not in dataloader_kwargs and self.batching["kind"] in ("token_budget", "random"):
            from datapipe import collate

            dataloader_kwargs["collate_fn"] = collate.pad()
        return DataLoader(self.dataset(), batch_sampler=sampler, **dataloader_kwargs)

    # ---- dry run ------------------------------------------------------------------------------------------------
    def plan(self, world_size: int = 1, *, bins: int = 100) -> dict:
        """The whole run's plan from metadata only (nothing is written, no token is read).

        Args:
            world_size: ranks of the run.
            bins: step bins of the ``over_steps`` series.

        Returns:
            JSON-serialisable dict: ``unit`` ("tokens", "seconds" or "rows") and a dict under that name with the
            units per domain (exact for ``decomposed``: 2^k slots per sequence; expected values where rows differ
            in size), ``passes`` per domain (units read / units held) and ``passes_by_bucket``, ``target_shares``,
            ``realised_shares`` and the same per schedule ``phases``, ``buckets`` (steps and rows per batch),
            ``over_steps`` (per step bin: domain shares and bucket shares), ``padding``, ``dropped``,
            ``repeated``, ``repeated_rows``, ``unread_rows``, ``warnings``.
        """
        from samplers.base import PlanWarning

        if not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1 (got {world_size=})")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PlanWarning)
            s = self.sampler(0, int(world_size), build=False)
            st = s.stats()
        msgs = [str(w.message) for w in caught if issubclass(w.category, PlanWarning)]
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        T = self.total_steps
        unit = st["unit"]
        units = st["units"]
        if self.batching["kind"] == "decomposed":
            units = {d: int(round(v)) for d, v in units.items()}
        per_step = s.step_units()  # [T, D]
        groups = s.step_groups()
        labels = dict(zip(s.group_ids.tolist(), s.group_labels))
        nb = max(1, min(bins, T))
        edges = np.linspace(0, T, nb + 1).round().astype(np.int64)
        edges = np.unique(edges)
        sums = np.add.reduceat(per_step, edges[:-1], axis=0)
        shares = sums / np.maximum(sums.sum(axis=1, keepdims=True), 1e-300)
        bucket_sh = {}
        for gid, lab in labels.items():
            hit = np.add.reduceat((groups == gid).astype(np.float64), edges[:-1])
            bucket_sh[lab] = (hit / np.diff(edges)).round(6).tolist()
        phases = []
        starts = sorted({0, *[int(x) for x in getattr(s.schedule, "phase_starts", lambda t: [])(T) if 0 < x < T]})
        for a, b in zip(starts, [*starts[1:], T]):
            tot = per_step[a:b].sum(axis=0)
            phases.append({"start": a, "end": b,
                           "target": dict(zip(s.domains, s._weights[a:b].mean(axis=0).round(6).tolist())),
                           "realised": dict(zip(s.domains, (tot / max(tot.sum(), 1e-300)).round(6).tolist()))})
        out = {
            "recipe": self.source, "kind": self.batching["kind"], "world_size": int(world_size), "total_steps": T,
            "seed": self.seed, "unit": unit, unit: units, "units_total": float(sum(units.values())),
            "passes": st["passes"], "passes_by_bucket": st["passes_by_group"],
            "target_shares": st["target_shares"], "realised_shares": st["realised_shares"], "phases": phases,
            "buckets": {lab: {"steps": st["steps_per_group"][lab], "rows_per_batch": st["rows_per_batch"][lab]}
                        for lab in s.group_labels},
            "over_steps": {"edges": edges.tolist(),
                           "domain_shares": {d: shares[:, i].round(6).tolist() for i, d in enumerate(s.domains)},
                           "bucket_shares": bucket_sh},
            "padding": {"real": st["real_units"], "padded": st["padded_units"], "fraction": st["padding_fraction"]},
            "dropped": st["dropped"], "repeated": st["repeated"], "repeated_rows": st["repeated_rows"],
            "unread_rows": st["unread_rows"], "fallback_steps": st["fallback_steps"], "warnings": msgs,
        }
        if self.batching["kind"] == "decomposed":
            out["tokens_per_step"] = int(self.batching["tokens_per_batch"]) * int(world_size)
        return out


def plot_plan(plan: dict, path: str | os.PathLike | None = None):
    """Domain shares and bucket shares over steps of a :meth:`Recipe.plan` dict, as a matplotlib ``Figure``
    (saved to ``path`` when given; PNG, PDF or SVG by extension)."""
    from matplotlib.figure import Figure

    ov = plan["over_steps"]
    edges = np.asarray(ov["edges"], dtype=np.float64)
    x = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    names = list(ov["domain_shares"])
    ax1.stackplot(x, np.array([ov["domain_shares"][d] for d in names]), labels=names)
    ax1.set_ylabel(f"share of {plan['unit']}")
    ax1.set_ylim(0, 1)
    ax1.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="domain")
    ax1.set_title(f"{plan['kind']} plan: {plan['total_steps']} steps x {plan['world_size']} ranks", fontsize=10)
    labs = list(ov["bucket_shares"])
    ax2.stackplot(x, np.array([ov["bucket_shares"][b] for b in labs]), labels=labs)
    ax2.set_ylabel("share of steps")
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="bucket")
    if path is not None:
        fig.savefig(path)
    return fig
