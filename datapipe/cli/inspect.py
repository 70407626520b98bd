"""``datapipe inspect``: rows, tokens, length histogram, shards, checksum status (and a PNG with --plot)."""

from __future__ import annotations

import json
import sys

import click


@click.command("inspect")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a length histogram PNG.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check shard checksums.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(dataset_dir, plot, verify, as_json):
    """Summarise DATASET_DIR: rows, tokens, lengths, shards, checksums, decomposition buckets.

    Exits 1 when a file fails its checksum (the summary names each bad file).

    \b
    Example:
      datapipe inspect stdlib_ds --plot lengths.png
    """
    from datapipe.inspect import summarize, plot_summary

    summary = summarize(dataset_dir, verify=verify)
    if plot:
        plot_summary(dataset_dir, plot)
        summary["plot"] = plot
    if as_json:
        click.echo(json.dumps(summary, indent=1, default=str))
    else:
        for line in summary.pop("text"):
            click.echo(line)
    if str(summary.get("checksums", "")).startswith("FAILED"):
        click.echo(f"Error: {dataset_dir} failed its integrity check (see `datapipe verify {dataset_dir}`)", err=True)
        sys.exit(1)


COMMANDS = [inspect_cmd]
