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
@click.option("--num-buckets", default=30, show_default=True, type=click.IntRange(min=1), help="Duration buckets.")
@click.option("--2d", "two_d", is_flag=True, help="Also split each bucket by output tokens (NeMo 2D bins).")
@click.option("--num-sub-buckets", default=2, show_default=True, type=click.IntRange(min=1),
              help="Token sub-buckets (with --2d).")
@click.option("--duration-column", default="duration", show_default=True, help="Index column of durations.")
@click.option("--tokens-column", default="num_tokens", show_default=True, help="Index column of output tokens.")
@click.option("--token-outlier-threshold", default=4.0, show_default=True, type=float,
              help="Tokens-per-second z-score above which a cut is left out of the 2D estimate.")
@click.option("--strict", is_flag=True,
              help="Fail (exit 1) instead of writing fewer buckets than asked for (repeated edges on skewed data).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
def estimate_cmd(dataset_dir, num_buckets, two_d, num_sub_buckets, duration_column, tokens_column,
                 token_outlier_threshold, strict, out):
    """Estimate bins with equal total duration (1D) or equal total tokens per sub-bucket (2D) from the index.

    The JSON holds ``bins`` (pass as DurationBucketSampler(bucket_bins=...)), ``num_buckets`` (the count
    written) and ``requested_buckets`` and, in 2D, ``max_tps`` per bin. When the data cannot fill the count
    asked for (many cuts of one duration repeat an edge), the bins are written without the repeats and a
    note on stderr says how many buckets there are and why; --strict makes that an error.

    \b
    Example:
      datapipe buckets estimate speech_ds --num-buckets 30 --out bins.json
      datapipe buckets estimate speech_ds --num-buckets 30 --2d --num-sub-buckets 2 --out bins2d.json
    """
    import warnings

    from datapipe.cli import for_cli
    from datapipe.dataset import ArrowDataset
    from samplers.bins import BinsWarning, estimate_duration_bins, estimate_duration_bins_2d

    index = ArrowDataset.open(dataset_dir).index
    for col, hint in [(duration_column, "--duration-column")] + ([(tokens_column, "--tokens-column")] if two_d else []):
        if col not in index:
            raise click.BadParameter(f"{dataset_dir} has no index column {col!r} (index columns: {sorted(index)})",
                                     param_hint=hint)
    requested = num_buckets * (num_sub_buckets if two_d else 1)
    with progress_bar("estimating bins") as update, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BinsWarning)
        if two_d:
            bins, tps = estimate_duration_bins_2d(index[duration_column], index[tokens_column], num_buckets,
                                                  num_sub_buckets, token_outlier_threshold=token_outlier_threshold,
                                                  return_max_tps=True, strict=strict)
            doc = {"kind": "2d", "num_buckets": int(len(bins)), "bins": bins.tolist(), "max_tps": tps.tolist()}
        else:
            bins = estimate_duration_bins(index[duration_column], num_buckets, strict=strict)
            doc = {"kind": "1d", "num_buckets": int(len(bins) + 1), "bins": bins.tolist()}
        update(1)
    for w in caught:
        if issubclass(w.category, BinsWarning):
            click.echo(f"note: {for_cli(str(w.message))} (--strict makes this an error)", err=True)
        else:  # pragma: no cover - other warnings pass through unchanged
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    doc.update(requested_buckets=requested, dataset=str(dataset_dir), duration_column=duration_column,
               rows=int(len(index[duration_column])))
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    short = f" (asked for {requested})" if doc["num_buckets"] < requested else ""
    click.echo(f"wrote {out}: {doc['num_buckets']} buckets ({doc['kind']}){short} from {doc['rows']} cuts")


COMMANDS = [buckets]
