"""``datapipe regmix`` through click's CliRunner: propose, fit, evaluate --json/--plot, search --plot."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from datapipe.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "..", "shared", "data", "regmix")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"RegMix tables not found at {DATA}")
DOMAINS = [f"train_the_pile_{d}" for d in ("a", "b", "c", "d")]
TARGETS = ["metric/the_pile_a_val_loss", "metric/the_pile_b_val_loss"]


def run(*args):
    res = CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)
    return res


@pytest.fixture
def tables(tmp_path):
    """A small synthetic study in the authors' CSV layout (index from 1, weights, two loss columns)."""
    rng = np.random.default_rng(0)
    X = rng.dirichlet(np.ones(4) * 0.5, 120)
    loss_a = 3.0 - 0.5 * np.log(X[:, 0] + 0.05) + rng.normal(0, 0.01, 120)
    loss_b = 3.0 - 0.5 * np.log(X[:, 1] + 0.05) + rng.normal(0, 0.01, 120)
    mix = pd.DataFrame(X, columns=DOMAINS)
    mix.insert(0, "index", np.arange(1, 121))
    loss = pd.DataFrame({"index": np.arange(1, 121), TARGETS[0]: loss_a, TARGETS[1]: loss_b})
    paths = {}
    for name, lo, hi in (("train", 0, 90), ("test", 90, 120)):
        paths[f"{name}_mix"] = tmp_path / f"{name}_mixture.csv"
        paths[f"{name}_loss"] = tmp_path / f"{name}_loss.csv"
        mix.iloc[lo:hi].to_csv(paths[f"{name}_mix"], index=False)
        loss.iloc[lo:hi].to_csv(paths[f"{name}_loss"], index=False)
    paths["shares"] = tmp_path / "shares.json"
    paths["shares"].write_text(json.dumps({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}))
    return paths


def test_fit_evaluate_json_and_plot(tables, tmp_path):
    model = tmp_path / "m.pkl"
    res = run("regmix", "fit", "--mixtures", tables["train_mix"], "--losses", tables["train_loss"], "--model", "gp",
              "--out", model)
    assert res.exit_code == 0, res.output
    assert "2 target(s)" in res.output
    res = run("regmix", "evaluate", model, "--mixtures", tables["test_mix"], "--losses", tables["test_loss"],
              "--target", "a", "--json", "--plot", tmp_path / "pred.png")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert set(metrics) >= {"spearman", "pearson", "mse"}
    assert metrics["spearman"] > 0.9
    assert (tmp_path / "pred.png").read_bytes()[:4] == b"\x89PNG"
    res = run("regmix", "evaluate", model, "--mixtures", tables["test_mix"], "--losses", tables["test_loss"], "--json")
    assert set(json.loads(res.output)["per_target"]) == set(TARGETS)
    res = run("regmix", "evaluate", model, "--mixtures", tables["test_mix"], "--losses", tables["test_loss"])
    assert "spearman=" in res.output


def test_search_writes_mixture_json_and_bar_chart(tables, tmp_path):
    model = tmp_path / "m.pkl"
    run("regmix", "fit", "--mixtures", tables["train_mix"], "--losses", tables["train_loss"], "--target", "a",
        "--model", "linear", "--out", model)
    res = run("regmix", "search", model, "--shares", tables["shares"], "-n", 5000, "--top-k", 16,
              "--out", tmp_path / "best.json", "--plot", tmp_path / "bar.png")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "best.json").read_text())
    w = doc["weights"]
    assert list(w) == DOMAINS and abs(sum(w.values()) - 1) < 1e-9
    assert max(w, key=w.get) == "train_the_pile_a"  # the fitted loss falls with domain a's weight
    assert (tmp_path / "bar.png").stat().st_size > 1000


def test_propose_writes_authors_csv(tables, tmp_path):
    out = tmp_path / "proposed.csv"
    res = run("regmix", "propose", "--shares", tables["shares"], "-n", 32, "--seed", 1, "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert list(df.columns) == ["index", "a", "b", "c", "d"] and list(df["index"]) == list(range(1, 33))
    np.testing.assert_allclose(df.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-9)


def test_mismatched_index_columns_fail_clearly(tables, tmp_path):
    bad = pd.read_csv(tables["train_loss"])
    bad["index"] += 1000
    bad.to_csv(tmp_path / "bad.csv", index=False)
    res = CliRunner().invoke(main, ["regmix", "fit", "--mixtures", str(tables["train_mix"]), "--losses",
                                    str(tmp_path / "bad.csv"), "--out", str(tmp_path / "m.pkl")])
    assert res.exit_code != 0
    assert "do not join" in str(res.exception)


def test_help_has_examples():
    for cmd in ("propose", "fit", "evaluate", "search"):
        res = run("regmix", cmd, "--help")
        assert res.exit_code == 0 and "Example" in res.output


@needs_data
def test_authors_tables_pile_cc(tmp_path):
    model = tmp_path / "m.pkl"
    res = run("regmix", "fit", "--mixtures", os.path.join(DATA, "train_mixture_1m.csv"), "--losses",
              os.path.join(DATA, "train_pile_loss_1m.csv"), "--target", "pile_cc", "--out", model)
    assert res.exit_code == 0, res.output
    res = run("regmix", "evaluate", model, "--mixtures", os.path.join(DATA, "test_mixture_1B.csv"), "--losses",
              os.path.join(DATA, "test_pile_loss_1B.csv"), "--json")
    assert json.loads(res.output)["spearman"] >= 0.97
