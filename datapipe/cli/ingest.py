"""``datapipe ingest``: text or token files -> a dataset directory."""

from __future__ import annotations

import contextlib
import warnings

import click


@contextlib.contextmanager
def _file_bar():
    """A rich bar on stderr over sources (files/folders), its total set on each update; off when stderr is not a
    terminal (logs stay clean)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from rich.console import Console

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=console,
                  disable=not console.is_terminal) as prog:
        task = prog.add_task("tokenizing sources", total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


@click.command("ingest")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset directory to create.")
@click.option("--text-column", default="text", show_default=True, help="Column holding the text to tokenize.")
@click.option("--tokens-column", default=None,
              help="Take token ids from this column instead of tokenizing (null, negative, > int32 or >= the "
                   "--tokenizer's vocabulary size are refused).")
@click.option("--tokenizer", default=None,
              help="'bytes' (default: raw bytes 0-255, EOS 256) or a path to a tokenizer.json, whose own truncation "
                   "and padding are disabled: documents are never cut or padded.")
@click.option("--skip-binary", is_flag=True,
              help="Skip (and count) files that look binary (NUL bytes, or a gzip/zip/WAV/PNG/... magic number) "
                   "instead of stopping at the first one.")
@click.option("--num-proc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tokenize in this many processes (same output as 1).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="'ray': tokenize as Ray tasks over files (same output as local).")
@click.option("--ray-address", default=None, help="Ray cluster address for --engine ray (default: a local one).")
@click.option("--shard-rows", default=65536, show_default=True, type=click.IntRange(min=1), help="Rows per shard file.")
@click.option("--compression", type=click.Choice(["lz4", "zstd"]), default=None, help="Compress shards.")
@click.option("--keep-text", is_flag=True, help="Keep the text column beside input_ids.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def ingest_cmd(sources, out, text_column, tokens_column, tokenizer, skip_binary, num_proc, engine, ray_address,
               shard_rows, compression, keep_text, overwrite):
    """Tokenize SOURCES into a dataset directory: plain text files (one document each, stored with their path),
    Parquet/JSONL files (tables), or Hugging Face save_to_disk folders.

    Every row is the document's token ids plus EOS, nothing truncated or padded. An existing path is taken
    literally; otherwise a glob is expanded (quote it to let datapipe expand '**'). Binary files stop the ingest
    with an error naming them, unless --skip-binary.

    \b
    Example:
      datapipe ingest '/usr/lib/python3.11/**/*.py' --out stdlib_ds --num-proc 2
      datapipe ingest data/*.jsonl --tokenizer tokenizer.json --out ds --engine ray
      datapipe ingest data/*.parquet --tokens-column ids --out ds --shard-rows 100000
      datapipe ingest hf_saved_dataset/ --out ds
    """
    from datapipe.ingestion import expand_sources, ingest

    paths = expand_sources(sources)  # FileNotFoundError naming the path: "Error: ..." through the CLI's error path
    with warnings.catch_warnings(record=True) as caught, _file_bar() as update:
        warnings.simplefilter("always", UserWarning)
        path = ingest(paths, out, text_column=text_column, tokens_column=tokens_column, tokenizer=tokenizer,
                      keep_text=keep_text, shard_rows=shard_rows, compression=compression, overwrite=overwrite,
                      skip_binary=skip_binary, num_proc=num_proc, engine=engine, ray_address=ray_address,
                      file_progress=update)
    for w in caught:  # skipped binary files are reported below, from the manifest
        if issubclass(w.category, UserWarning) and not str(w.message).startswith("ingest skipped"):
            click.echo(f"Warning: {w.message}", err=True)
    from datapipe.dataset import ArrowDataset

    ds = ArrowDataset.open(path)
    click.echo(f"wrote {path}: {len(ds)} rows, {ds.num_shards} shards, {int(ds.index['length'].sum())} tokens")
    skipped = ds.manifest["params"].get("skipped_binary")
    if skipped:
        click.echo(f"skipped {skipped} binary files (listed in the manifest's params.skipped_binary_files)")


COMMANDS = [ingest_cmd]
