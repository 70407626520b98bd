"""``datapipe verify``: check every file of a dataset directory (shards, index, manifest digest, extra files,
decomposition, sealed cluster/pair files) and name each bad one."""

from __future__ import annotations

import sys

import click


@click.command("verify")
@click.argument("dataset_dir", type=click.Path(exists=True))
def verify_cmd(dataset_dir):
    """Verify every file of DATASET_DIR against its checksum; exit 1 naming each bad file.

    Checks the manifest's own digest, the shards and index (checksum and structure), extra files listed in the
    manifest (a TAS pairs.arrow), the decomposition (pieces, sequences, materialized buckets) and cluster files
    that carry their own digest. DATASET_DIR may also be one such file (clusters.arrow).

    \b
    Example:
      datapipe verify stdlib_ds
      datapipe verify clusters.arrow
    """
    from datapipe.integrity import verify_tree

    report = verify_tree(dataset_dir)
    if report["problems"]:
        for f, msg in report["problems"]:
            click.echo(f"FAILED {msg}" if msg.startswith(f) else f"FAILED {f}: {msg}", err=True)
        click.echo(f"{len(report['problems'])} bad file(s) in {dataset_dir}", err=True)
        sys.exit(1)
    click.echo(f"ok: {report['files']} files, {report['bytes']} bytes match their checksums")
    if report["unchecked"]:
        click.echo(f"not covered by any checksum: {', '.join(report['unchecked'])}")


COMMANDS = [verify_cmd]
