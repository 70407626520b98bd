"""``datapipe regmix`` through click's CliRunner: propose, fit, evaluate --json/--plot, search --plot, and the
chain propose -> fit -> search -> ``mixtures.Constant.from_json``."""

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
    assert list(w) == ["a", "b", "c", "d"] and abs(sum(w.values()) - 1) < 1e-9  # short names, as propose writes
    assert max(w, key=w.get) == "a"  # the fitted loss falls with domain a's weight
    assert doc["target"] == TARGETS[0]  # named even when --target was not given (the model has one)
    assert (tmp_path / "bar.png").stat().st_size > 1000


def test_propose_writes_authors_csv(tables, tmp_path):
    out = tmp_path / "proposed.csv"
    res = run("regmix", "propose", "--shares", tables["shares"], "-n", 32, "--seed", 1, "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert list(df.columns) == ["index", "a", "b", "c", "d"] and list(df["index"]) == list(range(1, 33))
    np.testing.assert_allclose(df.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-9)
    long = tmp_path / "long.json"  # shares keyed by the authors' column names: the CSV still uses short names
    long.write_text(json.dumps({d: float(i + 1) for i, d in enumerate(DOMAINS)}))
    assert run("regmix", "propose", "--shares", long, "-n", 8, "--out", out).exit_code == 0
    assert list(pd.read_csv(out).columns) == ["index", "a", "b", "c", "d"]
    long.write_text(json.dumps({"a": 1.0, "train_the_pile_a": 2.0, "b": 1.0}))
    res = run("regmix", "propose", "--shares", long, "-n", 8, "--out", out)
    assert res.exit_code == 1 and "one domain 'a' under two names" in res.output


def test_mismatched_index_columns_fail_clearly(tables, tmp_path):
    bad = pd.read_csv(tables["train_loss"])
    bad["index"] += 1000
    bad.to_csv(tmp_path / "bad.csv", index=False)
    res = run("regmix", "fit", "--mixtures", tables["train_mix"], "--losses", tmp_path / "bad.csv", "--out",
              tmp_path / "m.pkl")
    assert res.exit_code == 1 and "Error: " in res.output and "do not join" in res.output


def test_chain_propose_fit_search_schedule(tables, tmp_path):
    """One naming of domains from propose to the schedule: the CSV of `propose` (short names) is what the proxy
    runs use; `fit` on it, `search` with the same shares, and best.json loads as a Constant schedule."""
    from mixtures import Constant

    mix = tmp_path / "proposed.csv"
    assert run("regmix", "propose", "--shares", tables["shares"], "-n", 40, "--out", mix).exit_code == 0
    W = pd.read_csv(mix)
    rng = np.random.default_rng(1)
    loss = pd.DataFrame({"index": W["index"], "metric/the_pile_b_val_loss":
                         3.0 - 0.5 * np.log(W["b"] + 0.05) + rng.normal(0, 0.01, len(W))})
    loss.to_csv(tmp_path / "loss.csv", index=False)
    model = tmp_path / "m.pkl"
    res = run("regmix", "fit", "--mixtures", mix, "--losses", tmp_path / "loss.csv", "--model", "linear",
              "--out", model)
    assert res.exit_code == 0, res.output
    res = run("regmix", "search", model, "--shares", tables["shares"], "-n", 4000, "--top-k", 16, "--out",
              tmp_path / "best.json", "--plot", tmp_path / "best.png")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "best.json").read_text())
    assert doc["target"] == "metric/the_pile_b_val_loss"
    sched = Constant.from_json(tmp_path / "best.json")
    assert sched.domains == ("a", "b", "c", "d")
    w = sched.weights_dict(0, 10)
    assert max(w, key=w.get) == "b" and abs(sum(w.values()) - 1) < 1e-12
    # a model fitted on the authors' column names predicts on propose's short names (same domains)
    from mixtures.regmix import load_model

    authors = tmp_path / "authors.pkl"
    run("regmix", "fit", "--mixtures", tables["train_mix"], "--losses", tables["train_loss"], "--target", "a",
        "--model", "linear", "--out", authors)
    m = load_model(authors)
    np.testing.assert_allclose(m.predict(W), m.predict(W.set_axis(["index"] + DOMAINS, axis=1)))


def test_search_plot_is_titled_with_the_target(tables, tmp_path):
    import matplotlib.pyplot as plt

    from mixtures import regmix_io

    titles = []
    real = regmix_io.plot_mixture

    def keep_title(*a, **k):  # the real plot is drawn; its title is kept for the assertion
        titles.append(k.get("title"))
        return real(*a, **k)

    model = tmp_path / "m.pkl"
    run("regmix", "fit", "--mixtures", tables["train_mix"], "--losses", tables["train_loss"], "--model", "linear",
        "--out", model)
    res = run("regmix", "search", model, "--shares", tables["shares"], "-n", 500, "--top-k", 8, "--out",
              tmp_path / "best.json")
    assert res.exit_code == 1 and "--target" in res.output and "target=" not in res.output  # two targets: which?
    regmix_io.plot_mixture = keep_title
    try:
        res = run("regmix", "search", model, "--shares", tables["shares"], "--target", "b", "-n", 500, "--top-k", 8,
                  "--out", tmp_path / "best.json", "--plot", tmp_path / "p.png")
    finally:
        regmix_io.plot_mixture = real
    assert res.exit_code == 0, res.output
    assert titles == ["RegMix search: lowest predicted metric/the_pile_b_val_loss"]
    assert json.loads((tmp_path / "best.json").read_text())["target"] == "metric/the_pile_b_val_loss"
    plt.close("all")


def test_bad_inputs_are_named(tables, tmp_path):
    res = run("regmix", "fit", "--mixtures", tables["train_loss"], "--losses", tables["train_mix"], "--out",
              tmp_path / "m.pkl")
    assert res.exit_code == 1 and "look swapped" in res.output and "swap the two files" in res.output, res.output
    assert not (tmp_path / "m.pkl").exists()
    bad = pd.read_csv(tables["train_mix"])
    bad.loc[5, DOMAINS[0]] = np.nan
    bad.to_csv(tmp_path / "nan.csv", index=False)
    res = run("regmix", "fit", "--mixtures", tmp_path / "nan.csv", "--losses", tables["train_loss"], "--out",
              tmp_path / "m.pkl")
    assert res.exit_code == 1 and "nan.csv: row 5 (line 7), column 'train_the_pile_a'" in res.output, res.output
    bad = pd.read_csv(tables["train_mix"])
    bad[DOMAINS[1]] = bad[DOMAINS[1]].astype(object)
    bad.loc[3, DOMAINS[1]] = "x"
    bad.to_csv(tmp_path / "str.csv", index=False)
    res = run("regmix", "fit", "--mixtures", tmp_path / "str.csv", "--losses", tables["train_loss"], "--out",
              tmp_path / "m.pkl")
    assert res.exit_code == 1 and "str.csv: row 3 (line 5), column 'train_the_pile_b': not a number" in res.output
    (tmp_path / "header_only.csv").write_text("index,a,b\n")
    res = run("regmix", "fit", "--mixtures", tmp_path / "header_only.csv", "--losses", tables["train_loss"], "--out",
              tmp_path / "m.pkl")
    assert res.exit_code == 1 and "header_only.csv: a header line but no rows" in res.output
    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 4)
    res = run("regmix", "fit", "--mixtures", tmp_path / "bin.csv", "--losses", tables["train_loss"], "--out",
              tmp_path / "m.pkl")
    assert res.exit_code == 1 and "bin.csv" in res.output and "Traceback" not in res.output, res.output


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
