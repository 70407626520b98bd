"""``datapipe regmix``: propose mixtures, fit and score the regression, search the optimum (RegMix, ICLR 2025).

Reads CSV files in the column conventions of the authors' ``data/`` folder (an ``index`` column, one
``train_the_pile_<domain>`` weight column per domain, one ``metric/the_pile_<domain>_val_loss`` column per
target) and JSON objects domain -> weight. Outputs name domains by their short names (``arxiv``): ``propose``'s
columns, ``search``'s ``best.json`` (``{"weights": ..., "target": <loss column>, ...}``), which
``mixtures.Constant.from_json`` reads as a schedule. Logic lives in ``mixtures.regmix``; this module only parses.
"""

from __future__ import annotations

import json

import click

from datapipe.cli._progress import progress_bar


@click.group("regmix")
def regmix() -> None:
    """RegMix (Liu et al., ICLR 2025): data mixture as regression.

    \b
    Example:
      datapipe regmix fit --mixtures train_mixture_1m.csv --losses train_pile_loss_1m.csv --target pile_cc --out m.pkl
      datapipe regmix evaluate m.pkl --mixtures test_mixture_1m.csv --losses test_pile_loss_1m.csv --json
      datapipe regmix search m.pkl --shares prior.json --out best.json --plot best.png
      python -c 'import mixtures; print(mixtures.Constant.from_json("best.json"))'
    """


@regmix.command("propose")
@click.option("--shares", "shares_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON object domain -> available tokens (or share).")
@click.option("-n", "--n", "n", required=True, type=int, help="Number of distinct mixtures.")
@click.option("--temperature", default=0.5, show_default=True, type=float, help="Exponent on the token prior.")
@click.option("--max-repeat", default=15.0, show_default=True, type=float,
              help="Largest number of passes over a domain's tokens (0: no bound).")
@click.option("--target-tokens", default=None, type=float,
              help="Tokens of the large run, in the units of --shares (default: all of them).")
@click.option("--min-weight", default=2e-4, show_default=True, type=float, help="Smallest non-zero weight.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="CSV to write (index + one column per domain).")
def propose_cmd(shares_path, n, temperature, max_repeat, target_tokens, min_weight, seed, out):
    """Propose N Dirichlet mixtures for proxy runs (the paper's synthesize_mixture.py).

    \b
    Example:
      datapipe regmix propose --shares pile_tokens.json -n 512 --out train_mixture.csv
    """
    from mixtures.regmix import propose
    from mixtures.regmix_io import read_shares, short_names, write_mixtures

    shares = read_shares(shares_path)
    names = short_names(shares)  # `arxiv`, also for `train_the_pile_arxiv` keys: one naming to the schedule
    with progress_bar("proposing mixtures"):
        W = propose(shares, n, temperature=temperature, max_repeat=max_repeat or None, target_tokens=target_tokens,
                    min_weight=min_weight, seed=seed)
    write_mixtures(out, W, names)
    click.echo(f"wrote {len(W)} mixtures over {len(shares)} domains to {out}")


@regmix.command("fit")
@click.option("--mixtures", "mix_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training mixtures CSV (index + weights).")
@click.option("--losses", "loss_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training losses CSV (index + one column per target).")
@click.option("--target", "targets", multiple=True,
              help="Target column or short name (pile_cc); repeat for several (default: all).")
@click.option("--model", "kind", default="lightgbm+gp", show_default=True,
              type=click.Choice(["lightgbm+gp", "gp", "linear", "lightgbm"]),
              help="lightgbm+gp: LightGBM averaged with an ARD GP (\"lightgbm\" is its deprecated old name).")
@click.option("--gp-weight", default=0.5, show_default=True, type=float,
              help="GP share of the lightgbm+gp blend (0: trees alone).")
@click.option("--early-stopping-fraction", default=None, type=float,
              help="Hold out this fraction of the training rows to pick the boosting rounds.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (pickle).")
def fit_cmd(mix_path, loss_path, targets, kind, gp_weight, early_stopping_fraction, seed, out):
    """Fit mixture -> loss regressors on the training rows (no test data is read).

    \b
    Example:
      datapipe regmix fit --mixtures train_mixture_1m.csv --losses train_pile_loss_1m.csv --target pile_cc --out m.pkl
    """
    from mixtures.regmix import RENAMED, RegMixModel, fit, save_model
    from mixtures.regmix_io import read_pair, select_targets

    if kind in RENAMED:
        click.echo(f"warning: --model {kind} is the LightGBM + GP blend, now named {RENAMED[kind]}; the old name goes "
                   "in the next release", err=True)
        kind = RENAMED[kind]

    X, Y = read_pair(mix_path, loss_path)
    Y = select_targets(Y, targets)
    with progress_bar(f"fitting {Y.shape[1]} target(s)", total=Y.shape[1]) as update:
        parts = []
        for i, col in enumerate(Y.columns):
            parts.append(fit(X, Y[[col]], model=kind, gp_weight=gp_weight,
                             early_stopping_fraction=early_stopping_fraction, seed=seed))
            update(i + 1)
    model = RegMixModel.concat(parts)
    save_model(model, out)
    click.echo(f"fitted {kind} on {len(X)} rows, {Y.shape[1]} target(s); wrote {out}")


@regmix.command("evaluate")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--mixtures", "mix_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--losses", "loss_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--target", default=None, help="Score one target (default: every target of the model).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics dict as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Save predicted vs actual (one target) to this image.")
def evaluate_cmd(model_path, mix_path, loss_path, target, as_json, plot_path):
    """Spearman, Pearson and MSE of the model's predictions on held-out mixtures.

    \b
    Example:
      datapipe regmix evaluate m.pkl --mixtures test_mixture_1B.csv --losses test_pile_loss_1B.csv --json
    """
    from mixtures.regmix import evaluate, load_model
    from mixtures.regmix_io import plot_predictions, read_pair, resolve_target

    model = load_model(model_path)
    X, Y = read_pair(mix_path, loss_path)
    if target is not None:
        col = resolve_target(Y.columns, target)
        sub = _one_target(model, col)
        metrics = evaluate(sub, X, Y[col])
        cols = [col]
    else:
        cols = model.targets if model.targets else list(Y.columns)
        missing = [c for c in cols if c not in Y.columns]
        if missing:
            raise click.BadParameter(f"{loss_path} lacks the model's targets {missing}", param_hint="--losses")
        metrics = evaluate(model, X, Y[cols] if len(cols) > 1 else Y[cols[0]])
    if plot_path:
        sub = _one_target(model, cols[0])
        plot_predictions(sub.predict(X), Y[cols[0]].to_numpy(), plot_path, title=cols[0])
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        rows = metrics.get("per_target", {cols[0]: metrics})
        for name, m in rows.items():
            click.echo(f"{name}: spearman={m['spearman']:.4f} pearson={m['pearson']:.4f} mse={m['mse']:.5g} n={m['n']}")


def _one_target(model, column):
    """The model of one target column, or a usage error naming ``--target``."""
    if not model.targets:
        if len(model.members) == 1:
            return model
        raise click.BadParameter("the model's targets are unnamed; fit it from the CLI", param_hint="--target")
    if column not in model.targets:
        raise click.BadParameter(f"the model was not fitted on {column!r} (its targets: {model.targets})",
                                 param_hint="--target")
    return model.select(column)


@regmix.command("search")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--shares", "shares_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON object domain -> tokens: the Dirichlet prior of the simulated mixtures.")
@click.option("--target", default=None, help="Target to minimise (required when the model has several).")
@click.option("-n", "--n", "n", default=100_000, show_default=True, type=int, help="Simulated mixtures.")
@click.option("--top-k", default=128, show_default=True, type=int, help="Best mixtures averaged.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="JSON to write: weights (short domain name -> weight), target, n, top_k, seed.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Save a bar chart of the mixture (next to the prior) to this image.")
def search_cmd(model_path, shares_path, target, n, top_k, seed, out, plot_path):
    """Average the top-k of N simulated mixtures ranked by predicted loss (the paper's search).

    \b
    Example:
      datapipe regmix search m.pkl --shares pile_tokens.json --target pile_cc --out best.json --plot best.png
    """
    import numpy as np

    from mixtures.regmix import load_model, search
    from mixtures.regmix_io import plot_mixture, read_shares, shares_vector, short_names

    model = load_model(model_path)
    shares = read_shares(shares_path)
    target_name = model.target_name(target)
    with progress_bar(f"searching {n} mixtures"):
        best = search(model, shares, n=n, top_k=top_k, seed=seed, target=target)
    # one naming of domains from propose to the schedule: the short names (`arxiv`, not `train_the_pile_arxiv`)
    domains = short_names(model.domains or list(shares))
    with open(out, "w") as f:
        json.dump({"weights": dict(zip(domains, best.tolist())), "target": target_name, "model": str(model_path),
                   "n": n, "top_k": top_k, "seed": seed}, f, indent=2)
    if plot_path:
        plot_mixture(best, domains, plot_path, prior=shares_vector(shares, model.domains),
                     title=f"RegMix search: lowest predicted {target_name}")
    top = np.argsort(-best)[:5]
    click.echo("top domains: " + ", ".join(f"{domains[i]}={best[i]:.3f}" for i in top) + f"; wrote {out} "
               f"(target {target_name}; mixtures.Constant.from_json({str(out)!r}) makes it a schedule)")


COMMANDS = [regmix]
