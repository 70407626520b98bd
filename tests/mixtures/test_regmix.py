"""RegMix (Liu et al., ICLR 2025): proposals, fit/evaluate on the authors' tables, search, CSV joins."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtures import regmix
from mixtures.regmix_io import read_pair, resolve_target, shares_vector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "..", "shared", "data", "regmix")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"RegMix tables not found at {DATA}")
PILE_CC = "metric/the_pile_pile_cc_val_loss"
# the authors' token distribution of the 17 Pile domains (synthesize_mixture.py)
PRIOR = np.array([0.113285273, 0.079608651, 0.003913491, 0.185375901, 0.051081359, 0.015962925, 0.101750772,
                  0.003707518, 0.066529351, 0.001750772, 0.027085479, 0.236869207, 0.01184346, 0.007929969,
                  0.008032956, 0.038825953, 0.046446962])


def load(scale: str, split: str = "test"):
    mix = f"{split}_mixture_{scale}.csv"
    loss = f"{split}_pile_loss_{scale}.csv"
    return read_pair(os.path.join(DATA, mix), os.path.join(DATA, loss))


# ---- propose ----------------------------------------------------------------------------------------------------
def test_propose_respects_bounds_grid_and_sums_to_one():
    W = regmix.propose(PRIOR, 300, seed=1)
    assert W.shape == (300, 17) and W.dtype == np.float64
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(W >= 0)
    share = PRIOR / PRIOR.sum()
    assert np.all(W <= np.minimum(15 * share, 1.0) + 1e-12)
    units = W / 2e-4
    np.testing.assert_allclose(units, np.round(units), atol=1e-6)  # on the min_weight grid, zeros included
    assert len(np.unique(np.round(units).astype(np.int64), axis=0)) == 300  # deduplicated
    np.testing.assert_array_equal(W, regmix.propose(PRIOR, 300, seed=1))
    assert not np.array_equal(W, regmix.propose(PRIOR, 300, seed=2))


def test_propose_target_tokens_tighten_the_bound():
    tokens = PRIOR * 300e9  # tokens per domain
    W = regmix.propose(tokens, 200, target_tokens=100e9, max_repeat=4, seed=0)
    assert np.all(W * 100e9 <= 4 * tokens + 1e-3)
    # small domains (e.g. enron, 0.53B tokens) can take at most 4 * 0.53 / 100 of a 100B-token run
    assert W[:, 9].max() <= 4 * tokens[9] / 100e9 + 1e-12


def test_propose_temperature_flattens_the_prior():
    flat = regmix.propose(PRIOR, 400, temperature=0.25, max_repeat=None, seed=0).mean(axis=0)
    sharp = regmix.propose(PRIOR, 400, temperature=1.0, max_repeat=None, seed=0).mean(axis=0)
    assert flat[11] < sharp[11]  # Pile-CC, the largest domain, gets less with a flatter prior
    assert flat[9] > sharp[9]  # Enron, among the smallest, gets more


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.001, 10.0), min_size=2, max_size=8), st.floats(0.2, 1.0), st.integers(0, 2**31))
def test_propose_property(shares, temperature, seed):
    shares = np.array(shares)
    W = regmix.propose(shares, 10, temperature=temperature, max_repeat=None, min_weight=1e-3, seed=seed,
                       max_draws=200_000)
    assert W.shape == (10, len(shares))
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(W >= 0)


@pytest.mark.parametrize("kw, match", [
    ({"n": 0}, "n must be"),
    ({"min_weight": 3e-4}, "min_weight must be 1/k"),
    ({"max_repeat": 1, "target_tokens": 10.0}, "no mixture can satisfy"),
    ({"temperature": 0}, "temperature"),
    ({"scales": []}, "scales"),
])
def test_propose_bad_arguments(kw, match):
    args = {"n": 5, **kw}
    with pytest.raises(ValueError, match=match):
        regmix.propose(PRIOR, **args)


def test_shares_bad_values():
    with pytest.raises(ValueError, match="finite and > 0"):
        regmix.propose([0.5, 0.0, 0.5], 3)
    with pytest.raises(ValueError, match="unknown domains"):
        shares_vector({"a": 1.0, "zz": 2.0}, ["a", "b"])


# ---- fit / evaluate on the authors' data ---------------------------------------------------------------------
@needs_data
def test_fit_pile_cc_reaches_goals_without_test_data():
    X, Y = load("1m", "train")
    model = regmix.fit(X, Y[PILE_CC], model="lightgbm+gp")
    goals = {"1m": 0.990, "60m": 0.986, "1B": 0.970}
    for scale, goal in goals.items():
        Xt, Yt = load(scale)
        m = regmix.evaluate(model, Xt, Yt[PILE_CC])
        assert set(m) >= {"spearman", "pearson", "mse"}
        assert m["spearman"] >= goal, f"{scale}: rho {m['spearman']:.4f} < {goal}"
        assert m["pearson"] > 0.9


@needs_data
def test_linear_baseline_matches_the_paper():
    X, Y = load("1m", "train")
    Xt, Yt = load("1m")
    m = regmix.evaluate(regmix.fit(X.to_numpy(), Y[PILE_CC].to_numpy(), model="linear"), Xt.to_numpy(),
                        Yt[PILE_CC].to_numpy())
    assert abs(m["spearman"] - 0.902) < 0.005  # the paper's 90.2


@needs_data
@pytest.mark.slow
def test_all_targets_all_scales():
    X, Y = load("1m", "train")
    model = regmix.fit(X, Y)
    floors = {"1m": 0.985, "60m": 0.975, "1B": 0.93}
    for scale, floor in floors.items():
        Xt, Yt = load(scale)
        m = regmix.evaluate(model, Xt, Yt)
        assert len(m["per_target"]) == 13
        assert m["spearman"] >= floor, f"{scale}: mean rho {m['spearman']:.4f}"


@needs_data
def test_frames_and_arrays_agree_and_columns_are_matched_by_name():
    X, Y = load("1m", "train")
    model = regmix.fit(X, Y[PILE_CC], model="linear")
    Xt, _ = load("1B")
    a = model.predict(Xt)
    b = model.predict(Xt[list(reversed(Xt.columns))])  # reordered columns are put back by name
    c = model.predict(Xt.to_numpy())
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c)
    with pytest.raises(ValueError, match="lacks the columns"):
        model.predict(Xt.drop(columns=[Xt.columns[0]]))


def synthetic(n=200, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.dirichlet(np.ones(d) * 0.5, n)
    y = 3.0 - np.log(X[:, 0] + 0.05) * 0.5 + 0.2 * X[:, 1] + rng.normal(0, 0.01, n)
    return X, y


@pytest.mark.parametrize("kind", ["lightgbm+gp", "gp", "linear"])
def test_fit_synthetic_and_search_finds_the_good_domain(kind):
    X, y = synthetic()
    model = regmix.fit(X[:150], y[:150], model=kind, n_estimators=200, gp_maxiter=20)
    m = regmix.evaluate(model, X[150:], y[150:])
    assert m["spearman"] > (0.8 if kind == "linear" else 0.95)
    best = regmix.search(model, np.ones(5), n=5000, top_k=32, seed=0)
    assert best.shape == (5,) and abs(best.sum() - 1) < 1e-12
    assert best[0] == best.max() and best[0] > 0.5  # loss falls with domain 0's weight


def test_the_old_blend_name_warns_and_fits_the_blend():
    X, y = synthetic()
    with pytest.warns(DeprecationWarning, match="now named 'lightgbm\\+gp'"):
        old = regmix.fit(X, y, model="lightgbm", n_estimators=50, gp_maxiter=5)
    new = regmix.fit(X, y, model="lightgbm+gp", n_estimators=50, gp_maxiter=5)
    assert old.kind == new.kind == "lightgbm+gp"
    assert [w for w, _ in old.members[0]] == [w for w, _ in new.members[0]] == [0.5, 0.5]
    np.testing.assert_array_equal(old.predict(X), new.predict(X))


def test_concat_and_select_are_inverse_on_named_targets():
    X, y = synthetic()
    frame = pd.DataFrame(X, columns=[f"d{i}" for i in range(X.shape[1])])
    ys = pd.DataFrame({"a": y, "b": 2 * y + 1})
    a = regmix.fit(frame, ys[["a"]], model="linear")
    b = regmix.fit(frame, ys[["b"]], model="linear")
    both = regmix.RegMixModel.concat([a, b])
    assert both.targets == ["a", "b"] and not both.single and a.targets == ["a"]  # the parts are not changed
    np.testing.assert_array_equal(both.predict(frame), np.stack([a.predict(frame), b.predict(frame)], axis=1))
    np.testing.assert_array_equal(both.select("b").predict(frame), b.predict(frame))
    assert both.select("b").targets == ["b"] and both.select(0).single
    with pytest.raises(ValueError, match="other mixture columns"):
        regmix.RegMixModel.concat([a, regmix.fit(X[:, :4], y, model="linear")])
    with pytest.raises(ValueError, match="at least one"):
        regmix.RegMixModel.concat([])


def test_fit_early_stopping_uses_a_training_split_only():
    X, y = synthetic()
    model = regmix.fit(X, y, gp_weight=0.0, early_stopping_fraction=0.2)
    booster = model.members[0][0][1].booster
    assert 1 <= booster.n_estimators <= 1000
    assert regmix.evaluate(model, X, y)["spearman"] > 0.95


def test_fit_and_evaluate_errors(tmp_path):
    X, y = synthetic()
    with pytest.raises(ValueError, match="model must be one of"):
        regmix.fit(X, y, model="xgboost")
    with pytest.raises(ValueError, match="rows"):
        regmix.fit(X, y[:-1])
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf at row 3"):
        regmix.fit(bad, y)
    model = regmix.fit(X, y, model="linear")
    with pytest.raises(ValueError, match="top_k"):
        regmix.search(model, np.ones(5), n=10, top_k=11)
    with pytest.raises(ValueError, match="5 domains"):
        regmix.search(model, np.ones(4))
    path = tmp_path / "m.pkl"
    regmix.save_model(model, path)
    np.testing.assert_array_equal(regmix.load_model(path).predict(X), model.predict(X))


def test_multi_target_evaluate_reports_each_target():
    X, y = synthetic()
    Y = pd.DataFrame({"metric/the_pile_a_val_loss": y, "metric/the_pile_b_val_loss": -y + X[:, 2]})
    model = regmix.fit(pd.DataFrame(X, columns=list("vwxyz")), Y, model="linear")
    m = regmix.evaluate(model, pd.DataFrame(X, columns=list("vwxyz")), Y)
    assert set(m["per_target"]) == set(Y.columns)
    assert m["spearman"] == pytest.approx(np.mean([v["spearman"] for v in m["per_target"].values()]))
    assert model.predict(X).shape == (200, 2)
    assert model.predict(X, target="b").shape == (200,)
    with pytest.raises(ValueError, match="pass target="):
        regmix.search(model, np.ones(5), n=100, top_k=4)


# ---- CSV conventions ----------------------------------------------------------------------------------------
def test_read_pair_joins_on_index_and_rejects_mismatches(tmp_path):
    mix = pd.DataFrame({"index": [3, 1, 2], "train_the_pile_a": [0.2, 0.5, 1.0], "train_the_pile_b": [0.8, 0.5, 0.0]})
    loss = pd.DataFrame({"index": [1, 2, 3], "metric/the_pile_a_val_loss": [1.0, 2.0, 3.0]})
    mix.to_csv(tmp_path / "m.csv", index=False)
    loss.to_csv(tmp_path / "l.csv", index=False)
    X, Y = read_pair(tmp_path / "m.csv", tmp_path / "l.csv")
    assert list(Y["metric/the_pile_a_val_loss"]) == [3.0, 1.0, 2.0]  # aligned to the mixtures' order
    loss.assign(index=[1, 2, 4]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="do not join"):
        read_pair(tmp_path / "m.csv", tmp_path / "bad.csv")
    mix.rename(columns={"index": "id"}).to_csv(tmp_path / "noidx.csv", index=False)
    with pytest.raises(ValueError, match="no index column"):
        read_pair(tmp_path / "noidx.csv", tmp_path / "l.csv")


def test_read_pair_detects_swapped_files_and_names_rows(tmp_path):
    mix = pd.DataFrame({"index": [1, 2, 3, 4], "a": [0.2, 0.5, 1.0, 0.0], "b": [0.8, 0.5, 0.0, 1.0]})
    loss = pd.DataFrame({"index": [1, 2, 3, 4], "metric/the_pile_a_val_loss": [3.1, 2.9, 2.5, 3.3]})
    mix.to_csv(tmp_path / "m.csv", index=False)
    loss.to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(ValueError, match=r"look swapped: .*m\.csv holds mixture weights .*l\.csv has loss columns"):
        read_pair(tmp_path / "l.csv", tmp_path / "m.csv")
    mix.assign(b=[0.8, 0.5, 0.5, 1.0]).to_csv(tmp_path / "sum.csv", index=False)  # row 2 sums to 1.5
    with pytest.raises(ValueError, match=r"sum\.csv: row 2 \(line 4\) is not a mixture: its weights sum to 1\.5"):
        read_pair(tmp_path / "sum.csv", tmp_path / "l.csv")
    mix.assign(index=[1, 2, 2, 4]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match=r"dup\.csv: row 2 \(line 4\): index 2 appears twice"):
        read_pair(tmp_path / "dup.csv", tmp_path / "l.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty file"):
        read_pair(tmp_path / "empty.csv", tmp_path / "l.csv")


def test_load_model_refuses_other_files(tmp_path):
    (tmp_path / "best.json").write_text('{"weights": {"a": 1.0}}')
    with pytest.raises(ValueError, match=r"best\.json: not a model file"):
        regmix.load_model(tmp_path / "best.json")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pkl: not a model file .*EOFError"):
        regmix.load_model(tmp_path / "empty.pkl")


def test_resolve_target_short_names():
    cols = ["metric/the_pile_pile_cc_val_loss", "metric/the_pile_arxiv_val_loss"]
    assert resolve_target(cols, "pile_cc") == cols[0]
    assert resolve_target(cols, cols[1]) == cols[1]
    with pytest.raises(ValueError, match="matches 2 columns"):
        resolve_target(cols, "the_pile")


def test_search_pruning_matches_brute_force():
    X, y = synthetic(n=300, seed=4)
    model = regmix.fit(X, y, n_estimators=300, gp_maxiter=20)
    g = np.random.default_rng(7).standard_gamma(np.full(5, 0.2), size=(20_000, 5))
    s = g.sum(axis=1)
    W = g[s > 0] / s[s > 0, None]
    got = regmix._top_k(model, W, 0, 64)
    ref = np.argsort(model.predict(W), kind="stable")[:64]
    assert set(got.tolist()) == set(ref.tolist())
    best = regmix.search(model, np.ones(5), n=20_000, top_k=64, seed=7)
    shares = np.ones(5) / 5
    g = np.random.default_rng(7).standard_gamma(shares, size=(20_000, 5))
    W = g / g.sum(axis=1, keepdims=True)
    ref = W[np.argsort(model.predict(W), kind="stable")[:64]].mean(axis=0)
    np.testing.assert_allclose(best, ref / ref.sum(), atol=1e-12)


def test_gp_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    X = np.log(rng.dirichlet(np.ones(5), 60) + 0.01)
    y = rng.normal(size=60)
    theta = np.concatenate([rng.uniform(0, 1.5, 5), [0.1, np.log(0.05)]])
    f, g = regmix._gp_nll(theta, X, y)
    eps = 1e-6
    num = np.array([(regmix._gp_nll(theta + eps * e, X, y)[0] - regmix._gp_nll(theta - eps * e, X, y)[0]) / (2 * eps)
                    for e in np.eye(len(theta))])
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-5)


@needs_data
def test_raw_csv_frames_join_on_index_and_full_loss_tables_select_the_target():
    mix = pd.read_csv(os.path.join(DATA, "train_mixture_1m.csv"))
    loss = pd.read_csv(os.path.join(DATA, "train_pile_loss_1m.csv"))
    shuffled = loss.sample(frac=1.0, random_state=0)  # same runs, other row order: joined on `index`
    a = regmix.fit(mix, shuffled[["index", PILE_CC]], model="linear")
    b = regmix.fit(mix.drop(columns=["index"]), loss[PILE_CC], model="linear")
    np.testing.assert_allclose(a.predict(mix), b.predict(mix))
    m = regmix.evaluate(a, mix, shuffled)  # the whole loss table: the model's own target is scored
    assert m["spearman"] > 0.85  # in-sample linear fit: ~0.895; misaligned rows would give ~0
    with pytest.raises(ValueError, match="do not join"):
        regmix.fit(mix, shuffled.assign(index=shuffled["index"] + 1)[["index", PILE_CC]])
