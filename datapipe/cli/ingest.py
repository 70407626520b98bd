"""``datapipe ingest``: text or token files -> a dataset directory."""

from __future__ import annotations

import glob

import click

from datapipe.cli._progress import progress_bar


@click.command("ingest")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset directory to create.")
@click.option("--text-column", default="text", show_default=True, help="Column holding the text to tokenize.")
@click.option("--tokens-column", default=None, help="Take token ids from this column instead of tokenizing.")
@click.option("--tokenizer", default="bytes", show_default=True, help="'bytes' or a path to a tokenizer.json.")
@click.option("--shard-rows", default=65536, show_default=True, type=int, help="Rows per shard file.")
@click.option("--compression", type=click.Choice(["lz4", "zstd"]), default=None, help="Compress shards.")
@click.option("--keep-text", is_flag=True, help="Keep the text column beside input_ids.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def ingest_cmd(sources, out, text_column, tokens_column, tokenizer, shard_rows, compression, keep_text, overwrite):
    """Tokenize SOURCES (plain text files: one document each; Parquet/JSONL: tables) into a dataset directory.

    Globs are expanded (quote them to let datapipe expand '**').

    \b
    Example:
      datapipe ingest '/usr/lib/python3.11/**/*.py' --out stdlib_ds
      datapipe ingest data/*.parquet --tokens-column ids --out ds --shard-rows 100000
    """
    from datapipe.ingestion import ingest

    paths = []
    for s in sources:
        hits = sorted(glob.glob(s, recursive=True)) if any(c in s for c in "*?[") else [s]
        if not hits:
            raise click.BadParameter(f"no file matches {s!r}", param_hint="SOURCES")
        paths.extend(hits)
    with progress_bar("ingesting rows") as update:
        path = ingest(paths, out, text_column=text_column, tokens_column=tokens_column, tokenizer=tokenizer,
                      keep_text=keep_text, shard_rows=shard_rows, compression=compression, overwrite=overwrite,
                      progress=update)
    from datapipe.dataset import ArrowDataset

    ds = ArrowDataset.open(path)
    click.echo(f"wrote {path}: {len(ds)} rows, {ds.num_shards} shards, {int(ds.index['length'].sum())} tokens")


COMMANDS = [ingest_cmd]
