"""``datapipe ingest-audio`` and ``datapipe import-lhotse``: the speech path into a dataset directory.

Both call the library (:func:`datapipe.ingest_audio`, :func:`datapipe.import_lhotse_cuts`) and show a progress
bar; the samplers then read ``index.arrow``'s ``duration`` (and ``num_tokens``) columns.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import click

from datapipe.cli._progress import progress_bar

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".sph", ".aiff", ".aif", ".npy")


def expand_sources(sources, param_hint: str = "SOURCES") -> list[Path]:
    """Existing paths as they are (``doc[1].wav`` is a file name), then globs; a directory gives its audio files
    (``AUDIO_SUFFIXES``, recursively, sorted)."""
    out: list[Path] = []
    for s in sources:
        if os.path.exists(s):
            hits = [s]
        elif any(c in s for c in "*?["):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise click.BadParameter(f"no file matches {s!r}", param_hint=param_hint)
        else:
            raise click.BadParameter(f"{s}: no such file or directory", param_hint=param_hint)
        for h in map(Path, hits):
            if h.is_dir():
                found = sorted(p for p in h.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
                if not found:
                    raise click.BadParameter(f"{h}: a directory without audio files ({', '.join(AUDIO_SUFFIXES)})",
                                             param_hint=param_hint)
                out.extend(found)
            else:
                out.append(h)
    return out


def read_transcripts(path: str) -> dict[str, str]:
    """Transcripts keyed by file id (stem), file name or path: a JSON object, or a TSV of ``key<TAB>text`` lines
    (a first line ``id<TAB>text`` is a header). Errors name the file and line (from 1)."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{path}: line {e.lineno}: not JSON ({e.msg})", param_hint="--transcripts")
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise click.BadParameter(f"{path}: expected a JSON object file id -> transcript string",
                                     param_hint="--transcripts")
        return doc
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, tab, value = line.partition("\t")
        if not tab:
            raise click.BadParameter(f"{path}: line {n}: no tab; expected 'id<TAB>transcript'",
                                     param_hint="--transcripts")
        if n == 1 and key.strip().lower() in ("id", "utt", "utterance", "file", "path", "cut_id"):
            continue  # a header line, not an utterance
        out[key.strip()] = value
    return out


def _token_counter(spec: str | None):
    """``text -> ids`` for ``num_tokens`` (the ids of the text, its EOS not counted), or None."""
    if spec is None:
        return None
    from datapipe.tokenize import load_tokenizer

    tok = load_tokenizer(spec)
    return lambda text: tok.encode_batch([text]).values[:-1]


@click.command("ingest-audio")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset directory to create.")
@click.option("--transcripts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TSV (id<TAB>text) or JSON object of transcripts, keyed by file stem, file name or path.")
@click.option("--tokenizer", default=None,
              help="Count output tokens of the transcripts (index column num_tokens, for 2D buckets): "
                   "'bytes' or a tokenizer.json.")
@click.option("--frame-shift", default=0.01, show_default=True, type=float,
              help="Seconds per frame of .npy feature files.")
@click.option("--channels", type=click.Choice(["mix", "first", "error"]), default="mix", show_default=True,
              help="Multi-channel audio: average, keep the first channel, or refuse.")
@click.option("--shard-rows", default=4096, show_default=True, type=click.IntRange(min=1), help="Rows per shard.")
@click.option("--compression", type=click.Choice(["lz4", "zstd"]), default=None, help="Compress shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def ingest_audio_cmd(sources, out, transcripts, tokenizer, frame_shift, channels, shard_rows, compression, overwrite):
    """Write audio files (WAV, FLAC, OGG, ... one cut each) or .npy feature matrices as a dataset directory.

    Columns: id, audio_path, audio (mono float32 samples), sampling_rate, num_samples, duration (or, for
    .npy features: features_path, features, num_frames, feature_dim, duration); text and num_tokens with
    --transcripts / --tokenizer. SOURCES are files, directories (their audio files) or quoted globs.

    \b
    Example:
      datapipe ingest-audio 'wavs/**/*.wav' --transcripts text.tsv --tokenizer bytes --out speech_ds
      datapipe buckets estimate speech_ds --num-buckets 30 --out bins.json
      datapipe inspect speech_ds --plot durations.png
    """
    from datapipe.audio import ingest_audio
    from datapipe.dataset import ArrowDataset

    paths = expand_sources(sources)
    texts = read_transcripts(transcripts) if transcripts else None
    if tokenizer is not None and texts is None:
        raise click.BadParameter("--tokenizer counts the tokens of transcripts: pass --transcripts too",
                                 param_hint="--tokenizer")
    with progress_bar("ingesting audio", total=len(paths)) as update:
        path = ingest_audio(paths, out, texts=texts, tokenizer=_token_counter(tokenizer), frame_shift=frame_shift,
                            channels=channels, shard_rows=shard_rows, compression=compression, overwrite=overwrite,
                            progress=update)
    ds = ArrowDataset.open(path)
    d = ds.index["duration"]
    click.echo(f"wrote {path}: {len(ds)} cuts, {d.sum() / 3600:.3f} h (duration {d.min():.2f}-{d.max():.2f} s), "
               f"{ds.num_shards} shards")


@click.command("import-lhotse")
@click.argument("cuts", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset directory to create.")
@click.option("--load-audio", is_flag=True, help="Also store each cut's samples (read from its file source).")
@click.option("--tokenizer", default=None,
              help="Count output tokens of the supervisions' text (index column num_tokens): 'bytes' or a "
                   "tokenizer.json.")
@click.option("--channels", type=click.Choice(["mix", "first", "error"]), default="mix", show_default=True,
              help="Multi-channel audio (with --load-audio): average, keep the first channel, or refuse.")
@click.option("--shard-rows", default=65536, show_default=True, type=click.IntRange(min=1), help="Rows per shard.")
@click.option("--compression", type=click.Choice(["lz4", "zstd"]), default=None, help="Compress shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def import_lhotse_cmd(cuts, out, load_audio, tokenizer, channels, shard_rows, compression, overwrite):
    """Import a Lhotse CutSet manifest (cuts.jsonl or cuts.jsonl.gz; Lhotse itself is not needed).

    Columns: id, duration, start, channel, recording_id, audio_path, sampling_rate, text, language, speaker
    (and num_tokens with --tokenizer, audio with --load-audio). The same bins as Lhotse's sampler follow from
    `datapipe buckets estimate`.

    \b
    Example:
      datapipe import-lhotse librispeech_cuts_train.jsonl.gz --out libri_ds --tokenizer bytes
      datapipe buckets estimate libri_ds --num-buckets 30 --2d --out bins2d.json
    """
    from datapipe.audio import import_lhotse_cuts
    from datapipe.dataset import ArrowDataset

    with progress_bar("importing cuts") as update:
        path = import_lhotse_cuts(cuts, out, load_audio=load_audio, tokenizer=_token_counter(tokenizer),
                                  channels=channels, shard_rows=shard_rows, compression=compression,
                                  overwrite=overwrite, progress=update)
    ds = ArrowDataset.open(path)
    d = ds.index["duration"]
    click.echo(f"wrote {path}: {len(ds)} cuts, {d.sum() / 3600:.3f} h (duration {d.min():.2f}-{d.max():.2f} s), "
               f"{ds.num_shards} shards")


COMMANDS = [ingest_audio_cmd, import_lhotse_cmd]
