"""``datapipe plan``: the dry run of a recipe (``datapipe.Recipe.plan``): the whole run's plan from metadata only."""

from __future__ import annotations

import json

import click


@click.command("plan")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--world-size", type=int, default=1, show_default=True, help="Ranks of the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw domain shares and bucket shares over steps (PNG, PDF or SVG).")
def plan_cmd(recipe, world_size, as_json, plot_path):
    """Plan RECIPE (.toml, .json or .yaml) without reading a token: units and passes per domain, buckets over
    steps, padding, drops and repeats.

    \b
    Example:
      datapipe plan recipe.toml --world-size 8
      datapipe plan recipe.json --world-size 2 --json > plan.json
      datapipe plan recipe.yaml --world-size 8 --plot plan.png
    """
    import warnings

    from datapipe.recipe import Recipe, plot_plan

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # they are in plan["warnings"], printed below
            plan = Recipe.load(recipe).plan(world_size=world_size)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if plot_path:
        plot_plan(plan, plot_path)
    if as_json:
        click.echo(json.dumps(plan))
        return
    unit = plan["unit"]
    click.echo(f"{plan['kind']} plan: {plan['total_steps']:,} steps x {plan['world_size']} ranks, "
               f"{plan['units_total']:,.0f} {unit}")
    click.echo(f"  {'domain':<16}{unit:>16}{'share':>9}{'target':>9}{'passes':>9}{'repeated rows':>15}")
    for d, v in plan[unit].items():
        click.echo(f"  {d:<16}{v:>16,.0f}{plan['realised_shares'][d]:>9.4f}{plan['target_shares'][d]:>9.4f}"
                   f"{plan['passes'][d]:>9.2f}{plan['repeated_rows'][d]:>15,}")
    for ph in plan["phases"]:
        got = ", ".join(f"{d} {v:.3f}/{ph['target'][d]:.3f}" for d, v in ph["realised"].items())
        click.echo(f"  steps {ph['start']:,}-{ph['end']:,}: realised/target {got}")
    click.echo("  buckets: " + ", ".join(f"{b} x{v['rows_per_batch']}: {v['steps']:,} steps"
                                         for b, v in plan["buckets"].items()))
    pad = plan["padding"]
    if pad["fraction"] is not None:
        click.echo(f"  padding: {100 * pad['fraction']:.2f} % of {pad['padded']:,.0f} {unit}")
    if plan["dropped"]:
        click.echo(f"  dropped rows: {plan['dropped']}")
    for w in plan["warnings"]:
        click.echo(f"  warning: {w}", err=True)
    if plot_path:
        click.echo(f"wrote {plot_path}")


COMMANDS = [plan_cmd]
