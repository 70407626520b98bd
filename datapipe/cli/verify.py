"""``datapipe verify``: check every file of a dataset directory against the manifest's checksums."""

from __future__ import annotations

import sys

import click


@click.command("verify")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
def verify_cmd(dataset_dir):
    """Verify DATASET_DIR's shards and index against their checksums; exit 1 naming the bad file.

    \b
    Example:
      datapipe verify stdlib_ds
    """
    from datapipe.dataset import ArrowDataset
    from datapipe.format import DatasetError

    try:
        report = ArrowDataset.open(dataset_dir).verify()
    except DatasetError as e:
        click.echo(f"FAILED: {e}", err=True)
        sys.exit(1)
    click.echo(f"ok: {report['files']} files, {report['bytes']} bytes match their checksums")


COMMANDS = [verify_cmd]
