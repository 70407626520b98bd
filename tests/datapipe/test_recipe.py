"""Recipes: several domain directories, a schedule, a batching; loaders per rank, exact resume, the dry run and
its command, on real dataset directories (and their decompositions) written in tmp dirs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import datapipe
from datapipe.cli import main
from datapipe.multi import MultiDataset
from datapipe.recipe import Recipe
from tests.helpers import assert_batches_equal

NAMES = ("web", "code", "math")
BASE = {"web": 0.6, "code": 0.3, "math": 0.1}
UP = {"web": 0.3, "code": 0.3, "math": 0.4}
TPB, T = 4096, 200


def write_domains(root, n=1500, seed=0, extra=None):
    rng = np.random.default_rng(seed)
    for name, mu in zip(NAMES, (5.3, 6.0, 5.6)):
        lens = np.clip(rng.lognormal(mu, 1.0, n).astype(int), 1, 4000)
        rows = [{"input_ids": rng.integers(1, 30000, n_).astype(np.int32), **(extra(rng) if extra else {})}
                for n_ in lens]
        datapipe.write_dataset(rows, root / name)


def acceptance_recipe(**over):
    return {"domains": {n: {"path": n} for n in NAMES},
            "schedule": {"kind": "domain_upsampling", "base": BASE, "upsampled": UP, "final_fraction": 0.2},
            "batching": {"kind": "decomposed", "tokens_per_batch": TPB, "min_log2": 5, "max_log2": 9,
                         "curriculum": "grow-p2"},
            "total_steps": T, "seed": 7, **over}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("recipe")
    write_domains(r)
    (r / "recipe.json").write_text(json.dumps(acceptance_recipe()))
    return r


@pytest.fixture(scope="module")
def run(root):
    """Both ranks' uninterrupted runs."""
    recipe = Recipe.load(root / "recipe.json")
    return [list(recipe.loader(rank=r, world_size=2)) for r in range(2)]


def delivered_tokens(batches_per_rank):
    tok = np.zeros((len(batches_per_rank[0]), len(NAMES)))
    for batches in batches_per_rank:
        for s, b in enumerate(batches):
            tok[s] += np.bincount(b["domain"].numpy(), minlength=len(NAMES)) * b["input_ids"].shape[1]
    return tok


def test_acceptance_ranks_shapes_shares_and_domain(run):
    assert [len(b) for b in run] == [T, T]
    lengths = set()
    for s, (a, b) in enumerate(zip(*run)):
        assert a["input_ids"].shape == b["input_ids"].shape, f"step {s}: ranks differ in shape"
        bsz, L = a["input_ids"].shape
        assert bsz * L == TPB and L & (L - 1) == 0
        lengths.add(L)
        for x in (a, b):
            assert x["domain"].shape == (bsz,) and x["domain"].dtype == torch.int64
            assert int(x["cu_seqlens"][-1]) == TPB
    assert len(lengths) >= 4, f"one curriculum over several lengths (got {sorted(lengths)})"
    tok = delivered_tokens(run)
    cut = int(0.8 * T)
    before, after = tok[:cut].sum(0), tok[cut:].sum(0)
    np.testing.assert_allclose(before / before.sum(), list(BASE.values()), atol=0.03)
    np.testing.assert_allclose(after / after.sum(), list(UP.values()), atol=0.05)


def test_acceptance_resume_after_123_steps(root, run):
    recipe = Recipe.load(root / "recipe.json")
    a = recipe.loader(rank=1, world_size=2)
    it = iter(a)
    for _ in range(123):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))  # a checkpoint survives JSON
    del it, a
    b = recipe.loader(rank=1, world_size=2)
    b.load_state_dict(state)
    assert_batches_equal(list(b), run[1][123:], "rank 1 resumed at step 123")


def test_acceptance_plan_command_matches_the_loaders(root, run):
    res = CliRunner().invoke(main, ["plan", str(root / "recipe.json"), "--world-size", "2", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert sum(plan["tokens"].values()) == T * TPB * 2
    np.testing.assert_array_equal([plan["tokens"][n] for n in NAMES], delivered_tokens(run).sum(0))
    assert set(plan["passes"]) == set(NAMES) and all(p > 0 for p in plan["passes"].values())
    assert [p["start"] for p in plan["phases"]] == [0, int(0.8 * T)]


def test_plan_is_a_dry_run_and_plots(tmp_path):
    write_domains(tmp_path, n=300, seed=1)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(acceptance_recipe(total_steps=50)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = Recipe.load(path).plan(world_size=4)
    assert not any((tmp_path / n / "decomposition").exists() for n in NAMES), "a dry run wrote a decomposition"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = Recipe.load(path).sampler(0, 4).stats()["units"]  # builds and stores the decompositions
    assert all((tmp_path / n / "decomposition").exists() for n in NAMES)
    assert {d: int(v) for d, v in stored.items()} == plan["tokens"], "the in-memory decomposition plans the same"
    assert plan["tokens_per_step"] == 4 * TPB and sum(plan["tokens"].values()) == 50 * 4 * TPB
    assert sum(v["steps"] for v in plan["buckets"].values()) == 50
    assert len(plan["over_steps"]["edges"]) == 51
    res = CliRunner().invoke(main, ["plan", str(path), "--world-size", "4", "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "web" in res.output and "passes" in res.output


def test_recipe_formats_read_the_same(tmp_path):
    yaml = pytest.importorskip("yaml")
    d = acceptance_recipe()
    (tmp_path / "r.json").write_text(json.dumps(d))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    toml = f"""total_steps = {T}
seed = 7
[domains]
web = {{path = "web"}}
code = {{path = "code"}}
math = {{path = "math"}}
[schedule]
kind = "domain_upsampling"
base = {{web = 0.6, code = 0.3, math = 0.1}}
upsampled = {{web = 0.3, code = 0.3, math = 0.4}}
final_fraction = 0.2
[batching]
kind = "decomposed"
tokens_per_batch = {TPB}
min_log2 = 5
max_log2 = 9
curriculum = "grow-p2"
"""
    (tmp_path / "r.toml").write_text(toml)
    got = [Recipe.load(tmp_path / f"r.{ext}") for ext in ("json", "yaml", "toml")]
    assert got[0].to_dict() == got[1].to_dict() == got[2].to_dict()
    assert got[2].paths()[0] == tmp_path.resolve() / "web"


def test_schedule_kinds_map_onto_mixtures(tmp_path):
    def sched(s):
        return Recipe.from_dict(acceptance_recipe(schedule=s), base_dir=tmp_path).build_schedule()

    assert sched({"kind": "constant", "weights": {"code": 1.0}}).weights_dict(0, 10) == \
        {"web": 0.0, "code": 1.0, "math": 0.0}
    pw = sched({"kind": "piecewise", "phases": [[0.0, BASE], {"start": 0.5, "weights": UP}]})
    assert pw.domains == NAMES and pw.weights_dict(5, 10) == pytest.approx(UP)
    lin = sched({"kind": "linear", "start": BASE, "end": UP, "start_fraction": 0.5})
    assert lin.weights_dict(0, 10) == pytest.approx(BASE) and lin.weights_dict(9, 10)["math"] > 0.3
    (tmp_path / "best.json").write_text(json.dumps({"weights": {"web": 0.2, "code": 0.2, "other": 0.6}}))
    rm = sched({"regmix": "best.json"})
    assert rm.weights_dict(0, 10) == pytest.approx({"web": 0.5, "code": 0.5, "math": 0.0})


@pytest.mark.parametrize("change, match", [
    ({"schedule": {"kind": "constant", "weights": {"web": 0.5, "books": 0.5}}}, "books.*not in \\[domains\\]"),
    ({"schedule": {"kind": "cosine"}}, "schedule.kind must be one of"),
    ({"schedule": {"kind": "domain_upsampling", "base": BASE, "upsampled": UP, "final_fraction": 1.5}},
     "final_fraction must be in \\(0, 1\\)"),
    ({"batching": {"kind": "decomposed"}}, "misses \\['tokens_per_batch'\\]"),
    ({"batching": {"kind": "decomposed", "tokens_per_batch": 4096, "max_len": 3}}, "unknown keys \\['max_len'\\]"),
    ({"batching": {"kind": "bogus"}}, "batching.kind must be one of"),
    ({"total_steps": 0}, "total_steps must be an integer >= 1"),
    ({"domains": {"web": {"dir": "x"}}}, "domains.web must be \\{path"),
    ({"epochs": 3}, "unknown sections \\['epochs'\\]"),
])
def test_recipe_errors_name_the_key(tmp_path, change, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(acceptance_recipe(**change)))
    with pytest.raises(ValueError, match=match) as e:
        Recipe.load(path)
    assert str(path) in str(e.value)


def test_missing_domain_directory_is_named(tmp_path):
    r = Recipe.from_dict(acceptance_recipe(), base_dir=tmp_path, source="r.json")
    with pytest.raises(ValueError, match="domains.web: .* is not a dataset directory"):
        r.plan(world_size=1)
    res = CliRunner().invoke(main, ["plan", str(tmp_path / "nope.json")])
    assert res.exit_code != 0


def _speech_extra(rng):
    return {"duration": float(rng.uniform(0.5, 12.0))}


@pytest.mark.parametrize("batching", [
    {"kind": "duration", "max_duration": 40.0, "num_buckets": 4},
    {"kind": "token_budget", "max_tokens": 8192, "num_buckets": 4},
    {"kind": "random", "batch_size": 16},
])
def test_each_batching_kind_end_to_end(tmp_path, batching):
    write_domains(tmp_path, n=200, seed=2, extra=_speech_extra)
    rec = Recipe.from_dict(acceptance_recipe(batching=batching, total_steps=30,
                                             schedule={"kind": "constant", "weights": BASE}), base_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = rec.plan(world_size=2)
        loaders = [rec.loader(rank=r, world_size=2, num_workers=2 if batching["kind"] == "random" else 0)
                   for r in range(2)]
        runs = [list(x) for x in loaders]
    assert set(plan["passes"]) == set(NAMES)
    assert plan["unit"] == {"duration": "seconds", "token_budget": "tokens", "random": "tokens"}[batching["kind"]]
    assert [len(x) for x in runs] == [30, 30]
    ds = [datapipe.ArrowDataset.open(tmp_path / n) for n in NAMES]
    for a, b in zip(*runs):
        assert a["domain"].shape[0] == b["domain"].shape[0] == len(a["input_ids"])
        if batching["kind"] == "token_budget":
            assert a["input_ids"].numel() <= 8192
    if batching["kind"] == "duration":
        durs = np.concatenate([d.index["duration"] for d in ds])
        s = rec.sampler(0, 2)
        for rows in s:
            assert len(rows) * durs[rows].max() <= 40.0 + 1e-6 or len(rows) == 1


def test_multidataset_keeps_the_order_of_ids(tmp_path):
    write_domains(tmp_path, n=60, seed=3)
    parts = [datapipe.ArrowDataset.open(tmp_path / n) for n in NAMES]
    md = MultiDataset(parts, NAMES)
    ids = np.array([130, 3, 61, 179, 0, 120, 59])
    got = md.__getitems__(ids)
    dom, local = md.locate(ids)
    np.testing.assert_array_equal(got["domain"], dom)
    for i, (d, r) in enumerate(zip(dom, local)):
        np.testing.assert_array_equal(got["input_ids"][i], parts[d][int(r)]["input_ids"])
    with pytest.raises(IndexError, match="row 180 is out of range"):
        md.__getitems__([180])


def test_multidataset_merges_decomposed_batches(root, run):
    """Merged cu_seqlens split every row exactly where the per-domain batches do."""
    ds = Recipe.load(root / "recipe.json").dataset()
    batch = run[0][5]
    ids = np.asarray(ds.offsets[batch["domain"].numpy()] + batch["sequence_ids"].numpy())
    again = ds.__getitems__(ids)
    for k in ("input_ids", "cu_seqlens", "position_ids", "labels", "domain"):
        assert torch.equal(again[k], batch[k]), k
    L = batch["input_ids"].shape[1]
    cu = batch["cu_seqlens"].numpy()
    for i, d in enumerate(batch["domain"].tolist()):
        one = ds.datasets[d].__getitems__([int(batch["sequence_ids"][i])])
        inner = cu[(cu >= i * L) & (cu <= (i + 1) * L)] - i * L
        np.testing.assert_array_equal(inner, one["cu_seqlens"].numpy())


def _rank_main(rank, world, port, recipe_path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = Recipe.load(recipe_path).loader()  # rank and world size from torch.distributed
            shapes = [tuple(b["input_ids"].shape) for b in loader]
        got = [None] * world
        dist.all_gather_object(got, shapes)
        if rank == 0:
            (out / "shapes.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~10-40 s on the shared 2-core machine
def test_two_process_group_decomposes_and_ranks_agree(tmp_path):
    """A real gloo group of 2 processes on fresh domains (rank 0 decomposes while rank 1 waits at a barrier): the
    ranks yield the same shape at every step."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    write_domains(tmp_path, n=300, seed=4)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(acceptance_recipe(total_steps=40)))
    mp.start_processes(_rank_main, args=(2, free_port(), str(path), tmp_path), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = json.loads((tmp_path / "shapes.json").read_text())
    assert len(r0) == len(r1) == 40 and r0 == r1
    assert all(b * L == TPB for b, L in r0)
    assert all((tmp_path / n / "decomposition" / "manifest.json").exists() for n in NAMES)
