"""``datapipe decompose``: build the dataset-decomposition index (Pouransari et al., NeurIPS 2024) of a dataset."""

from __future__ import annotations

import click


@click.command("decompose")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--min-log2", type=int, default=8, show_default=True, help="Smallest bucket: 2^min-log2 tokens.")
@click.option("--max-log2", type=int, default=13, show_default=True, help="Largest bucket: 2^max-log2 tokens.")
@click.option("--remainder", type=click.Choice(["pack", "pad", "drop"]), default="pack", show_default=True,
              help="Tails shorter than 2^min-log2: pack them padding-free, pad each, or drop them.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the long-document size draws.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Build in this process, or with the same kernels on Ray Data (byte-identical).")
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local cluster).")
@click.option("--materialize", is_flag=True, help="Also write per-bucket token files (contiguous 2^k rows).")
def decompose_cmd(dataset_dir, min_log2, max_log2, remainder, seed, engine, ray_address, materialize):
    """Cut every document of DATASET_DIR into 2^k-token pieces (buckets D_k) and store the index beside it.

    \b
    Example:
      datapipe decompose stdlib_ds --min-log2 8 --max-log2 13 --remainder pack
      datapipe decompose stdlib_ds --engine ray --ray-address auto --materialize
      datapipe inspect stdlib_ds        # shows the bucket histogram
    """
    from datapipe.cli._progress import progress_bar
    from datapipe.decomposition import decompose

    with progress_bar("decomposing", total=100) as update:  # errors: `Error: ...` from the group (datapipe.cli)
        index = decompose(dataset_dir, min_log2=min_log2, max_log2=max_log2, remainder=remainder, seed=seed,
                          engine=engine, materialize=materialize, ray_address=ray_address,
                          progress=lambda stage, frac: update(int(100 * frac)))
    for line in index.histogram_lines():
        click.echo(line)
    click.echo(f"written to {index.path}")


COMMANDS = [decompose_cmd]
