"""Speech in dataset directories: audio files (WAV/FLAC/... via ``soundfile``) or precomputed features, and
Lhotse CutSet manifests, written with ``duration`` (and ``num_tokens``) in the index for the duration samplers.

Part of the speech batching of "Training and Inference Efficiency of Encoder-Decoder Speech Models"
(Żelasko et al., 2025): the samplers need only ``index.arrow``'s ``duration`` / ``num_tokens`` columns, so a
Lhotse user imports a ``cuts.jsonl.gz`` (metadata only, or with the audio) and keeps their bins and budgets.

Row layout (one naming for every audio path, Lhotse's: ``audio_path``, ``sampling_rate``):

* audio: ``id`` (str), ``audio_path`` (str), ``audio`` (``list<float32>`` mono samples), ``sampling_rate``
  (int32), ``num_samples`` (int64), ``duration`` (float64 s);
* features: ``id``, ``features_path`` (str), ``features`` (``list<float32>``, ``num_frames * feature_dim`` values,
  frame-major), ``num_frames`` (int64), ``feature_dim`` (int32), ``duration`` (``num_frames * frame_shift``);
* Lhotse cuts: see :func:`import_lhotse_cuts` (``audio_path``, ``sampling_rate`` and, with audio, ``audio``);
* optional ``text`` (str) and ``num_tokens`` (int64).

Datasets written before this naming stored ``path`` and ``sample_rate``; :func:`audio_columns` maps the
canonical names to the stored ones and warns (``DeprecationWarning``) when a dataset uses the old names, which
stay readable for one release.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from datapipe.format import DatasetError
from datapipe.writer import write_dataset

__all__ = ["LEGACY_AUDIO_COLUMNS", "audio_columns", "import_lhotse_cuts", "ingest_audio", "read_lhotse_cuts"]

_FEATURE_SUFFIXES = (".npy",)
_BATCH_FILES = 64
_BATCH_ROWS = 8192  # cuts per batch when only metadata is imported
# the names ingest_audio wrote before the Lhotse names became the only ones (readable until the next release)
LEGACY_AUDIO_COLUMNS = {"sampling_rate": "sample_rate", "audio_path": "path"}


def audio_columns(column_names: Iterable[str], *, where: str = "dataset") -> dict[str, str]:
    """The stored column of each canonical audio column name (``sampling_rate``, ``audio_path``).

    Args:
        column_names: the dataset's columns (``[c["name"] for c in ds.manifest["columns"]]``).
        where: the dataset's path, for the warning.

    Returns:
        ``{canonical: stored}`` for the canonical names the data holds under either name.

    Warns:
        DeprecationWarning: when the data stores an old name (``sample_rate``, ``path``); re-ingest it.
    """
    names = set(column_names)
    out, old = {}, []
    for new, legacy in LEGACY_AUDIO_COLUMNS.items():
        if new in names:
            out[new] = new
        elif legacy in names and ("audio" in names or "features" in names or new == "sampling_rate"):
            out[new] = legacy
            old.append(f"{legacy!r} (now {new!r})")
    if old:
        warnings.warn(f"{where} stores the audio columns {', '.join(old)} under their old names, readable until "
                      "the next release; re-ingest it with ingest_audio / datapipe ingest-audio",
                      DeprecationWarning, stacklevel=2)
    return out


def _mono(samples: np.ndarray, channels: str, name: str) -> np.ndarray:
    if samples.ndim == 1 or samples.shape[1] == 1:
        return samples.reshape(-1)
    if channels == "mix":
        return samples.mean(axis=1, dtype=np.float32)
    if channels == "first":
        return samples[:, 0]
    raise DatasetError(f"{name}: {samples.shape[1]} channels; pass channels='mix' or 'first'")


def _read_audio(path: Path, channels: str, start: float = 0.0, duration: float | None = None,
                channel: int | None = None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            a = int(round(start * sr))
            n = -1 if duration is None else int(round(duration * sr))
            f.seek(a)
            data = f.read(frames=n, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DatasetError(f"{path}: cannot read audio ({e})") from None
    if channel is not None and data.shape[1] > 1:
        if channel >= data.shape[1]:
            raise DatasetError(f"{path}: channel {channel} requested but the file has {data.shape[1]}")
        data = data[:, channel]
    return np.ascontiguousarray(_mono(data, channels, str(path)), dtype=np.float32), sr


def _list_array(arrays: Sequence[np.ndarray]) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.float32, copy=False) if arrays else np.zeros(0, np.float32)
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _per_path(value, paths: Sequence[Path], ids: Sequence[str], name: str) -> list | None:
    """``value`` aligned with ``paths``: a sequence of the same length or a mapping keyed by path or id."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = []
        for p, i in zip(paths, ids):
            for key in (str(p), p.name, i):
                if key in value:
                    out.append(value[key])
                    break
            else:
                raise DatasetError(f"{name} has no entry for {p} (keys are paths, file names or ids)")
        return out
    value = list(value)
    if len(value) != len(paths):
        raise ValueError(f"{name} must have one entry per path ({len(paths)}); got {len(value)}")
    return value


def ingest_audio(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
                 texts: Sequence[str] | Mapping[str, str] | None = None,
                 num_tokens: Sequence[int] | Mapping[str, int] | None = None,
                 tokenizer: Callable[[str], Sequence[int]] | None = None, frame_shift: float = 0.01,
                 channels: str = "mix", shard_rows: int = 4096, compression: str | None = None,
                 overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Write audio files, or precomputed feature matrices, as a dataset directory with ``duration`` indexed.

    Files ending in ``.npy`` are features ``[num_frames, feature_dim]`` (or ``[num_frames]``); anything else is
    read with ``soundfile`` (WAV, FLAC, OGG, ...), one cut per file. Mixing the two kinds is an error. Columns
    are those of the module docstring (audio: ``id``, ``audio_path``, ``audio``, ``sampling_rate``,
    ``num_samples``, ``duration``; features: ``features_path`` and ``features`` instead).

    Args:
        paths: audio or ``.npy`` feature files.
        out_dir: the dataset directory to create.
        texts: optional transcripts, one per path or keyed by path / file name / id (the file stem).
        num_tokens: optional output lengths (same forms as ``texts``); indexed for 2D buckets.
        tokenizer: optional ``text -> token ids``; gives ``num_tokens`` from ``texts``.
        frame_shift: seconds per feature frame (features only).
        channels: multi-channel audio is averaged (``"mix"``), reduced to its first channel (``"first"``) or
            refused (``"error"``).
        shard_rows, compression, overwrite, progress: as in :func:`datapipe.write_dataset`.

    Returns:
        The dataset directory; ``ArrowDataset.open(path).index["duration"]`` feeds the duration samplers.

    Raises:
        DatasetError: a file that cannot be read, is empty, or a missing transcript (naming the file).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise DatasetError("no audio files given")
    if channels not in ("mix", "first", "error"):
        raise ValueError(f"channels must be 'mix', 'first' or 'error' (got {channels=})")
    if not frame_shift > 0:
        raise ValueError(f"frame_shift must be > 0 seconds (got {frame_shift=})")
    kinds = {p.suffix.lower() in _FEATURE_SUFFIXES for p in paths}
    if len(kinds) > 1:
        raise DatasetError("paths mix .npy feature files and audio files; ingest them into separate datasets")
    features = kinds.pop()
    ids = [p.stem for p in paths]
    text_list = _per_path(texts, paths, ids, "texts")
    tok_list = _per_path(num_tokens, paths, ids, "num_tokens")
    if tokenizer is not None:
        if text_list is None:
            raise ValueError("tokenizer needs texts")
        if tok_list is not None:
            raise ValueError("pass num_tokens or tokenizer, not both")
        tok_list = [len(tokenizer(t)) for t in text_list]

    def batches() -> Iterator[pa.RecordBatch]:
        for s in range(0, len(paths), _BATCH_FILES):
            chunk = range(s, min(s + _BATCH_FILES, len(paths)))
            cols: dict[str, pa.Array] = {"id": pa.array([ids[i] for i in chunk], pa.string()),
                                         "features_path" if features else "audio_path":
                                             pa.array([str(paths[i]) for i in chunk], pa.string())}
            if features:
                mats = []
                for i in chunk:
                    try:
                        m = np.load(paths[i], allow_pickle=False)
                    except (OSError, ValueError) as e:
                        raise DatasetError(f"{paths[i]}: cannot read features ({e})") from None
                    m = m.reshape(len(m), -1) if m.ndim >= 1 else m.reshape(1, 1)
                    if len(m) == 0:
                        raise DatasetError(f"{paths[i]}: no feature frames")
                    if not np.all(np.isfinite(m)):
                        raise DatasetError(f"{paths[i]}: features hold NaN or inf")
                    mats.append(np.ascontiguousarray(m, dtype=np.float32))
                frames = np.array([len(m) for m in mats], dtype=np.int64)
                cols["features"] = _list_array([m.reshape(-1) for m in mats])
                cols["num_frames"] = pa.array(frames)
                cols["feature_dim"] = pa.array(np.array([m.shape[1] for m in mats], dtype=np.int32))
                cols["duration"] = pa.array(frames * float(frame_shift))
            else:
                audio, rates = [], []
                for i in chunk:
                    a, sr = _read_audio(paths[i], channels)
                    if len(a) == 0:
                        raise DatasetError(f"{paths[i]}: no audio samples (duration 0)")
                    audio.append(a)
                    rates.append(sr)
                n = np.array([len(a) for a in audio], dtype=np.int64)
                cols["audio"] = _list_array(audio)
                cols["sampling_rate"] = pa.array(np.array(rates, dtype=np.int32))
                cols["num_samples"] = pa.array(n)
                cols["duration"] = pa.array(n / np.array(rates, dtype=np.float64))
            if text_list is not None:
                cols["text"] = pa.array([str(text_list[i]) for i in chunk], pa.string())
            if tok_list is not None:
                cols["num_tokens"] = pa.array(np.array([int(tok_list[i]) for i in chunk], dtype=np.int64))
            yield pa.RecordBatch.from_pydict(cols)

    def named() -> Iterator[tuple[str, pa.RecordBatch]]:
        # one (file, row) pair per cut: write_dataset's errors then name the audio or feature file itself
        i = 0
        for b in batches():
            for j in range(b.num_rows):
                yield str(paths[i + j]), b.slice(j, 1)
            i += b.num_rows

    index = ["duration"] + (["num_tokens"] if tok_list is not None else []) + (["num_frames"] if features else [])
    return write_dataset(named(), out_dir, shard_rows=shard_rows, index_columns=index, compression=compression,
                         overwrite=overwrite, progress=progress,
                         params={"kind": "features" if features else "audio",
                                 **({"frame_shift": frame_shift} if features else {})})


def _chain(first, rest):
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------------------------------
# Lhotse manifests
# ---------------------------------------------------------------------------------------------------------------
def read_lhotse_cuts(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the cuts of a Lhotse manifest (``.jsonl`` or ``.jsonl.gz``) as dicts, with their line number
    (``_line``). Reads the JSON directly: Lhotse itself is not needed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    cut = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}: line {n}: not JSON ({e.msg})") from None
                if not isinstance(cut, dict):
                    raise DatasetError(f"{path}: line {n}: expected a cut object")
                cut["_line"] = n
                yield cut
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None


def _cut_row(cut: dict, where: str, tokenizer, load_audio: bool, channels: str) -> dict:
    kind = cut.get("type", "MonoCut")
    if kind not in ("MonoCut", "MultiCut"):
        raise DatasetError(f"{where}: cut type {kind!r} is not supported (MonoCut and MultiCut are); "
                           "use cuts.to_eager() with Lhotse to materialise mixed or padding cuts first")
    for key in ("id", "duration"):
        if key not in cut:
            raise DatasetError(f"{where}: the cut has no {key!r} field")
    dur = cut["duration"]
    if not isinstance(dur, (int, float)) or not np.isfinite(dur) or dur <= 0:
        raise DatasetError(f"{where}: cut {cut['id']!r}, column 'duration': {dur!r} is not a positive number")
    rec = cut.get("recording") or {}
    sources = rec.get("sources") or []
    src = sources[0] if sources else {}
    sups = cut.get("supervisions") or []
    text = " ".join(s.get("text") or "" for s in sups).strip()
    channel = cut.get("channel", 0)

    def number(value, column: str, kind=int):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: cut {cut['id']!r}, column {column!r}: {value!r} is not a number") from None

    row = {
        "id": str(cut["id"]),
        "duration": float(dur),
        "start": number(cut.get("start", 0.0), "start", float),
        "channel": number(channel[0] if isinstance(channel, list) and channel else channel, "channel"),
        "recording_id": str(rec.get("id", "")),
        "audio_path": str(src.get("source", "")) if src.get("type") == "file" else "",
        "sampling_rate": number(rec.get("sampling_rate", 0), "sampling_rate"),
        "text": text,
        "language": str(next((s["language"] for s in sups if s.get("language")), "")),
        "speaker": str(next((s["speaker"] for s in sups if s.get("speaker")), "")),
    }
    if tokenizer is not None:
        row["num_tokens"] = int(len(tokenizer(text)))
    if load_audio:
        if src.get("type") != "file":
            raise DatasetError(f"{where}: cut {cut['id']!r} has a {src.get('type')!r} audio source; only files "
                               "can be loaded (import metadata only with load_audio=False)")
        # a MonoCut names one channel of a (possibly multi-channel) file; a MultiCut is mixed down
        a, sr = _read_audio(Path(src["source"]), channels, start=row["start"], duration=row["duration"],
                            channel=None if isinstance(channel, list) else int(channel))
        row["audio"] = a
        row["sampling_rate"] = int(sr)  # the file's rate: the samples stored are at this rate
    return row


def import_lhotse_cuts(cuts_jsonl_gz: str | os.PathLike, out_dir: str | os.PathLike, *, load_audio: bool = False,
                       tokenizer: Callable[[str], Sequence[int]] | None = None, channels: str = "mix",
                       shard_rows: int = 65_536, compression: str | None = None, overwrite: bool = False,
                       progress: Callable[[int], None] | None = None) -> Path:
    """Import a Lhotse CutSet manifest (``cuts.jsonl.gz``) as a dataset directory.

    Each cut becomes a row: ``id``, ``duration``, ``start``, ``channel``, ``recording_id``, ``audio_path``,
    ``sampling_rate``, ``text`` (its supervisions' texts joined), ``language``, ``speaker``; with a tokenizer
    also ``num_tokens``; with ``load_audio`` the cut's samples (``audio``, ``list<float32>``, at
    ``sampling_rate``) read from its file source. The names are those of :func:`ingest_audio` too. ``duration``
    (and ``num_tokens``) go in the index, so
    ``DurationBucketSampler(ArrowDataset.open(out).index["duration"], ...)`` replaces Lhotse's sampler.

    Args:
        cuts_jsonl_gz: a Lhotse ``.jsonl`` or ``.jsonl.gz`` CutSet manifest (MonoCut / MultiCut).
        out_dir: the dataset directory to create.
        load_audio: also store each cut's audio.
        tokenizer: optional ``text -> token ids`` for ``num_tokens``.
        channels: how multi-channel audio becomes mono (``"mix"``, ``"first"``, ``"error"``).
        shard_rows, compression, overwrite, progress: as in :func:`datapipe.write_dataset`.

    Returns:
        The dataset directory.

    Raises:
        DatasetError: unreadable manifest, a cut without id/duration, a non-positive duration, or an audio source
            that cannot be read (naming the file and line).
    """
    path = Path(cuts_jsonl_gz)

    def rows() -> Iterator[dict]:
        for cut in read_lhotse_cuts(path):
            yield _cut_row(cut, f"{path}: line {cut['_line']}", tokenizer, load_audio, channels)

    def batches() -> Iterator[tuple[str, pa.RecordBatch]]:
        # (manifest, batch) pairs: write_dataset's errors name the manifest and the cut's row in it (from 0)
        chunk: list[dict] = []
        for r in rows():
            chunk.append(r)
            if len(chunk) == (_BATCH_FILES if load_audio else _BATCH_ROWS):
                yield str(path), _rows_to_batch(chunk)
                chunk = []
        if chunk:
            yield str(path), _rows_to_batch(chunk)

    it = batches()
    try:
        first = next(it)
    except StopIteration:
        raise DatasetError(f"{path}: no cuts") from None
    source = _chain(first, it)
    index = ["duration"] + (["num_tokens"] if tokenizer is not None else [])
    return write_dataset(source, out_dir, shard_rows=shard_rows, index_columns=index, compression=compression,
                         overwrite=overwrite, progress=progress, params={"kind": "lhotse", "source": str(path)})


def _rows_to_batch(rows: list[dict]) -> pa.RecordBatch:
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "audio"}
    arrays = {k: pa.array(v) for k, v in cols.items()}
    if "audio" in rows[0]:
        arrays["audio"] = _list_array([r["audio"] for r in rows])
    return pa.RecordBatch.from_pydict(arrays)
