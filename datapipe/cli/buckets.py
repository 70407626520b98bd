"""``datapipe buckets``: duration bins for the speech samplers (1D, or 2D with output tokens)."""

from __future__ import annotations

import json

import click

from datapipe.cli._progress import progress_bar


@click.group("buckets")
def buckets() -> None:
    """Duration buckets for DurationBucketSampler (Żelasko et al., 2025; Lhotse / NeMo bins).

    \b
    Example:
      datapipe buckets estimate librispeech_ds --num-buckets 30 --out bins.json
    """


@buckets.command("estimate")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--num-buckets", default=30, show_default=True, type=int, help="Duration buckets.")
@click.option("--2d", "two_d", is_flag=True, help="Also split each bucket by output tokens (NeMo 2D bins).")
@click.option("--num-sub-buckets", default=2, show_default=True, type=int, help="Token sub-buckets (with --2d).")
@click.option("--duration-column", default="duration", show_default=True, help="Index column of durations.")
@click.option("--tokens-column", default="num_tokens", show_default=True, help="Index column of output tokens.")
@click.option("--token-outlier-threshold", default=4.0, show_default=True, type=float,
              help="Tokens-per-second z-score above which a cut is left out of the 2D estimate.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
def estimate_cmd(dataset_dir, num_buckets, two_d, num_sub_buckets, duration_column, tokens_column,
                 token_outlier_threshold, out):
    """Estimate bins with equal total duration (1D) or equal total tokens per sub-bucket (2D) from the index.

    The JSON holds ``bins`` (pass as DurationBucketSampler(bucket_bins=...)), ``num_buckets`` and, in 2D,
    ``max_tps`` per bin.

    \b
    Example:
      datapipe buckets estimate speech_ds --num-buckets 30 --out bins.json
      datapipe buckets estimate speech_ds --num-buckets 30 --2d --num-sub-buckets 2 --out bins2d.json
    """
    from datapipe.dataset import ArrowDataset
    from samplers.bins import estimate_duration_bins, estimate_duration_bins_2d

    index = ArrowDataset.open(dataset_dir).index
    for col in [duration_column] + ([tokens_column] if two_d else []):
        if col not in index:
            raise click.BadParameter(f"{dataset_dir} has no index column {col!r} (index: {sorted(index)})",
                                     param_hint="DATASET_DIR")
    with progress_bar("estimating bins") as update:
        if two_d:
            bins, tps = estimate_duration_bins_2d(index[duration_column], index[tokens_column], num_buckets,
                                                  num_sub_buckets, token_outlier_threshold=token_outlier_threshold,
                                                  return_max_tps=True)
            doc = {"kind": "2d", "num_buckets": int(len(bins)), "bins": bins.tolist(), "max_tps": tps.tolist()}
        else:
            bins = estimate_duration_bins(index[duration_column], num_buckets)
            doc = {"kind": "1d", "num_buckets": int(len(bins) + 1), "bins": bins.tolist()}
        update(1)
    doc.update(dataset=str(dataset_dir), duration_column=duration_column, rows=int(len(index[duration_column])))
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    click.echo(f"wrote {out}: {doc['num_buckets']} buckets ({doc['kind']}) from {doc['rows']} cuts")


COMMANDS = [buckets]
