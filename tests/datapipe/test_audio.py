"""Audio and feature ingest, Lhotse CutSet import, and ``datapipe buckets estimate``, on real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner

from datapipe import ArrowDataset, import_lhotse_cuts, ingest_audio
from datapipe.dataset import DatasetError
from samplers import DurationBucketSampler, estimate_duration_bins, estimate_duration_bins_2d


@pytest.fixture
def audio_files(tmp_path):
    """Six real files: WAV and FLAC, 16 and 8 kHz, one stereo; returns (paths, samples, rates)."""
    rng = np.random.default_rng(0)
    paths, samples, rates = [], [], []
    for i, (n, sr, fmt, ch) in enumerate([(16000, 16000, "wav", 1), (4000, 8000, "flac", 1), (24000, 16000, "flac", 1),
                                          (8000, 16000, "wav", 2), (12345, 16000, "wav", 1), (800, 8000, "flac", 1)]):
        x = (rng.uniform(-0.5, 0.5, (n, ch)) if ch > 1 else rng.uniform(-0.5, 0.5, n)).astype(np.float32)
        p = tmp_path / f"utt{i}.{fmt}"
        sf.write(p, x, sr, subtype="PCM_16")
        y, _ = sf.read(p, dtype="float32")  # what PCM_16 stores
        paths.append(p)
        samples.append(y)
        rates.append(sr)
    return paths, samples, rates


def test_ingest_wav_and_flac(tmp_path, audio_files):
    paths, samples, rates = audio_files
    texts = ["a b c", "d", "e f", "g h i j", "k", "l m"]
    out = ingest_audio(paths, tmp_path / "ds", texts=texts, tokenizer=str.split, shard_rows=4)
    ds = ArrowDataset.open(out)
    assert len(ds) == 6 and ds.num_shards == 2
    np.testing.assert_allclose(ds.index["duration"], [len(s) / r for s, r in zip(samples, rates)])
    assert ds.index["num_tokens"].tolist() == [3, 1, 2, 4, 1, 2]
    for i, (s, r) in enumerate(zip(samples, rates)):
        row = ds[i]
        want = s.mean(axis=1) if s.ndim == 2 else s  # stereo is mixed down
        np.testing.assert_allclose(row["audio"], want, atol=1e-6)
        assert row["sampling_rate"] == r and row["text"] == texts[i] and row["id"] == f"utt{i}"
        assert row["audio_path"] == str(paths[i])
    s = DurationBucketSampler(ds.index["duration"], max_duration=3.0, num_buckets=2,
                              output_lengths=ds.index["num_tokens"])
    assert sorted(np.concatenate(list(s)).tolist()) == list(range(6))


def test_ingest_first_channel_and_mapping_texts(tmp_path, audio_files):
    paths, samples, _ = audio_files
    out = ingest_audio(paths, tmp_path / "ds", channels="first", num_tokens={p.name: i for i, p in enumerate(paths)})
    ds = ArrowDataset.open(out)
    np.testing.assert_allclose(ds[3]["audio"], samples[3][:, 0], atol=1e-6)
    assert ds.index["num_tokens"].tolist() == list(range(6))
    with pytest.raises(DatasetError, match="2 channels"):
        ingest_audio(paths, tmp_path / "ds2", channels="error")


def test_ingest_features(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i, t in enumerate([10, 250, 33]):
        p = tmp_path / f"f{i}.npy"
        np.save(p, rng.normal(size=(t, 80)).astype(np.float16))
        paths.append(p)
    ds = ArrowDataset.open(ingest_audio(paths, tmp_path / "ds", frame_shift=0.04))
    np.testing.assert_allclose(ds.index["duration"], [0.4, 10.0, 1.32])
    assert ds[0]["features_path"] == str(paths[0])
    assert ds.index["num_frames"].tolist() == [10, 250, 33]
    assert ds[1]["feature_dim"] == 80 and len(ds[1]["features"]) == 250 * 80


@pytest.mark.parametrize("make_bad, match", [
    (lambda p: p.write_bytes(b"RIFF not really a wav"), "cannot read audio"),
    (lambda p: sf.write(p, np.zeros(0, np.float32), 16000), "no audio samples"),
])
def test_bad_audio_names_the_file(tmp_path, make_bad, match):
    p = tmp_path / "bad.wav"
    make_bad(p)
    with pytest.raises(DatasetError, match=rf"bad\.wav: {match}"):
        ingest_audio([p], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()  # nothing half-written


@pytest.mark.parametrize("bad", ["corrupt", "negative num_tokens"])
def test_bad_file_among_good_ones_is_named(tmp_path, audio_files, bad):
    paths, _, _ = audio_files
    p = tmp_path / "bad.wav"
    if bad == "corrupt":
        p.write_bytes(b"RIFF not really a wav")
        num_tokens, match = None, r"bad\.wav: cannot read audio"
    else:  # a value write_dataset refuses: its error names the audio file and its row (0: one cut per file)
        sf.write(p, np.full(1600, 0.1, np.float32), 16000)
        num_tokens, match = {"bad": -3}, r"bad\.wav: row 0, column 'num_tokens'"
    files = paths[:3] + [p] + paths[3:]
    if num_tokens is not None:
        num_tokens.update({q.stem: 5 for q in paths})
    with pytest.raises(DatasetError, match=match) as e:
        ingest_audio(files, tmp_path / "ds", num_tokens=num_tokens)
    assert "<reader>" not in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_bad_arguments(tmp_path, audio_files):
    paths, _, _ = audio_files
    with pytest.raises(ValueError, match="texts must have one entry per path"):
        ingest_audio(paths, tmp_path / "ds", texts=["x"])
    with pytest.raises(ValueError, match="tokenizer needs texts"):
        ingest_audio(paths, tmp_path / "ds", tokenizer=str.split)
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    with pytest.raises(DatasetError, match="mix .npy feature files and audio"):
        ingest_audio([paths[0], tmp_path / "x.npy"], tmp_path / "ds")


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def lhotse_cuts(tmp_path, audio_files):
    """A real Lhotse CutSet manifest: one cut per recording, two of them truncated, with supervisions."""
    from lhotse import CutSet, Recording, SupervisionSegment

    paths, _, _ = audio_files
    cuts = []
    for i, p in enumerate(paths):
        rec = Recording.from_file(p, recording_id=f"rec{i}")
        cut = rec.to_cut()
        if i in (0, 2):
            cut = cut.truncate(offset=0.25, duration=0.5)
        cut.supervisions = [SupervisionSegment(id=f"sup{i}", recording_id=rec.id, start=0.0, duration=cut.duration,
                                               text=f"word{i} more", language="en", speaker=f"spk{i % 2}")]
        cuts.append(cut)
    cs = CutSet.from_cuts(cuts)
    path = tmp_path / "cuts.jsonl.gz"
    cs.to_file(path)
    return path, cs


def test_import_lhotse_metadata(tmp_path, lhotse_cuts):
    path, cs = lhotse_cuts
    ds = ArrowDataset.open(import_lhotse_cuts(path, tmp_path / "ds", tokenizer=str.split))
    assert len(ds) == len(cs)
    np.testing.assert_allclose(ds.index["duration"], [c.duration for c in cs])
    assert ds.index["num_tokens"].tolist() == [2] * len(cs)
    row = ds[2]
    assert row["id"] == cs[2].id and row["start"] == pytest.approx(0.25) and row["text"] == "word2 more"
    assert row["speaker"] == "spk0" and row["language"] == "en" and row["recording_id"] == "rec2"
    # the same bins as Lhotse would estimate
    from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

    np.testing.assert_allclose(estimate_duration_bins(ds.index["duration"], 3), estimate_duration_buckets(cs, 3))


def test_import_lhotse_with_audio_matches_lhotse(tmp_path, lhotse_cuts):
    path, cs = lhotse_cuts
    ds = ArrowDataset.open(import_lhotse_cuts(path, tmp_path / "ds", load_audio=True, channels="first"))
    for i, cut in enumerate(cs):
        ref = cut.load_audio()[0]  # [channels, samples] -> first channel
        got = ds[i]["audio"]
        assert ds[i]["sampling_rate"] == cut.sampling_rate and "sample_rate" not in ds[i]  # one naming
        assert len(got) == len(ref), (i, len(got), len(ref))
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_import_lhotse_errors(tmp_path):
    import gzip

    p = tmp_path / "bad.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"id": "a", "duration": 1.0, "type": "MonoCut"}) + "\n")
        f.write(json.dumps({"id": "b", "duration": -1.0, "type": "MonoCut"}) + "\n")
    with pytest.raises(DatasetError, match="line 2: cut 'b', column 'duration'"):
        import_lhotse_cuts(p, tmp_path / "ds")
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"id": "m", "type": "MixedCut", "tracks": []}) + "\n")
    with pytest.raises(DatasetError, match="line 1: cut type 'MixedCut' is not supported"):
        import_lhotse_cuts(p, tmp_path / "ds")
    with gzip.open(p, "wt") as f:
        f.write("{not json\n")
    with pytest.raises(DatasetError, match="line 1: not JSON"):
        import_lhotse_cuts(p, tmp_path / "ds")
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"id": "s", "duration": 1.0, "type": "MonoCut",
                            "recording": {"id": "r", "sampling_rate": "16k"}}) + "\n")
    with pytest.raises(DatasetError, match="line 1: cut 's', column 'sampling_rate': '16k' is not a number"):
        import_lhotse_cuts(p, tmp_path / "ds")


# ---------------------------------------------------------------------------------------------------------------
def test_cli_buckets_estimate(tmp_path):
    from datapipe import write_dataset
    from datapipe.cli import main

    rng = np.random.default_rng(0)
    d = rng.uniform(1, 20, 3000)
    tok = (d * 3 + rng.integers(0, 5, 3000)).astype(np.int64)
    import pyarrow as pa

    ds = write_dataset(pa.table({"duration": d, "num_tokens": tok}), tmp_path / "ds")
    runner = CliRunner()
    r = runner.invoke(main, ["buckets", "estimate", str(ds), "--num-buckets", "8", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "b.json").read_text())
    np.testing.assert_allclose(doc["bins"], estimate_duration_bins(d, 8))
    r = runner.invoke(main, ["buckets", "estimate", str(ds), "--num-buckets", "8", "--2d", "--num-sub-buckets", "3",
                             "--out", str(tmp_path / "b2.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "b2.json").read_text())
    np.testing.assert_allclose(doc["bins"], estimate_duration_bins_2d(d, tok, 8, 3))
    s = DurationBucketSampler(d, max_duration=100.0, output_lengths=tok, bucket_bins=doc["bins"])
    assert s.num_buckets == len(doc["bins"])
    r = runner.invoke(main, ["buckets", "estimate", str(ds), "--2d", "--tokens-column", "nope", "--out", "x.json"])
    assert r.exit_code != 0 and "no index column 'nope'" in r.output
    assert "Example" in runner.invoke(main, ["buckets", "estimate", "--help"]).output


def test_cli_buckets_estimate_says_how_many_and_why(tmp_path):
    """Skewed durations (40 % of cuts at exactly 20 s) cannot fill 30 equal-duration buckets: the CLI writes the
    distinct edges, says the count and the reason, and --strict refuses."""
    import pyarrow as pa

    from datapipe import write_dataset
    from datapipe.cli import main
    from samplers.bins import BinsWarning

    rng = np.random.default_rng(0)
    d = np.r_[rng.uniform(1, 20, 600), np.full(400, 20.0)]
    ds = write_dataset(pa.table({"duration": d}), tmp_path / "ds")
    r = CliRunner().invoke(main, ["buckets", "estimate", str(ds), "--num-buckets", "30", "--out",
                                  str(tmp_path / "b.json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "b.json").read_text())
    bins = np.asarray(doc["bins"])
    assert np.all(np.diff(bins) > 0) and doc["num_buckets"] == len(bins) + 1 < 30 and doc["requested_buckets"] == 30
    assert f"{doc['num_buckets']} buckets (1d) (asked for 30)" in r.output
    assert "400 of 1000 cuts last exactly 20 s" in r.output and "--num-buckets 30" in r.output
    # the same cuts share a bucket as with Lhotse's repeated edges
    from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

    class C:
        def __init__(self, x):
            self.duration = x

    ref = np.asarray(estimate_duration_buckets([C(x) for x in d], num_buckets=30))
    assert len(np.unique(ref)) < len(ref)  # Lhotse repeats an edge here
    np.testing.assert_array_equal(bins, np.unique(ref))
    with pytest.warns(BinsWarning, match="instead of num_buckets=30"):
        estimate_duration_bins(d, 30)
    with pytest.raises(ValueError, match="strict"):
        estimate_duration_bins(d, 30, strict=True)
    r = CliRunner().invoke(main, ["buckets", "estimate", str(ds), "--num-buckets", "30", "--strict", "--out",
                                  str(tmp_path / "s.json")], catch_exceptions=False)
    assert r.exit_code == 1 and "400 of 1000 cuts" in r.output and not (tmp_path / "s.json").exists()
    r = CliRunner().invoke(main, ["buckets", "estimate", str(ds), "--num-buckets", "3", "--strict", "--out",
                                  str(tmp_path / "ok.json")], catch_exceptions=False)
    assert r.exit_code == 0 and json.loads((tmp_path / "ok.json").read_text())["num_buckets"] == 3


def test_cli_ingest_audio_inspect_plot_and_lhotse(tmp_path, audio_files, lhotse_cuts):
    from matplotlib.image import imread

    from datapipe.cli import main

    paths, samples, rates = audio_files
    (tmp_path / "text.tsv").write_text("id\ttext\n" + "".join(f"utt{i}\tw{i} x\n" for i in range(6)))
    runner = CliRunner()
    r = runner.invoke(main, ["ingest-audio", str(tmp_path / "utt*.*"), "--transcripts", str(tmp_path / "text.tsv"),
                             "--tokenizer", "bytes", "--channels", "first", "--out", str(tmp_path / "sp")],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "6 cuts" in r.output
    ds = ArrowDataset.open(tmp_path / "sp")
    by_id = {ds[i]["id"]: i for i in range(len(ds))}
    for i, (s, rate) in enumerate(zip(samples, rates)):
        row = ds[by_id[f"utt{i}"]]
        assert row["sampling_rate"] == rate and row["text"] == f"w{i} x" and row["audio_path"] == str(paths[i])
        np.testing.assert_allclose(row["audio"], s[:, 0] if s.ndim == 2 else s, atol=1e-6)
    assert ds.index["num_tokens"].tolist() == [4] * 6  # the bytes of "wi x", EOS not counted
    png = tmp_path / "d.png"
    r = runner.invoke(main, ["inspect", str(tmp_path / "sp"), "--plot", str(png)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    img = imread(png)[..., :3]
    bar = np.abs(img - np.array([0x3B, 0x75, 0xAF]) / 255).max(axis=-1) < 0.02  # the histogram's bar colour
    assert bar.sum() > 500  # drawn bars, not empty axes
    cuts, cs = lhotse_cuts
    r = runner.invoke(main, ["import-lhotse", str(cuts), "--load-audio", "--channels", "first", "--tokenizer", "bytes",
                             "--out", str(tmp_path / "lh")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lh = ArrowDataset.open(tmp_path / "lh")
    assert len(lh) == len(cs) and lh[0]["sampling_rate"] == cs[0].sampling_rate
    assert lh.index["num_tokens"].tolist() == [len(c.supervisions[0].text.encode()) for c in cs]
    names = {c["name"] for c in lh.manifest["columns"]} & {c["name"] for c in ds.manifest["columns"]}
    assert {"audio_path", "sampling_rate", "audio", "duration", "id", "text"} <= names  # one naming
    r = runner.invoke(main, ["ingest-audio", str(paths[0]), "--out", str(tmp_path / "x"), "--tokenizer", "bytes"],
                      catch_exceptions=False)
    assert r.exit_code == 2 and "--transcripts" in r.output


def test_old_audio_column_names_stay_readable_with_a_warning(tmp_path):
    import pyarrow as pa

    from datapipe import write_dataset
    from datapipe.audio import audio_columns

    old = write_dataset(pa.table({"path": ["a.wav"], "audio": [[0.0, 0.1]],
                                  "sample_rate": pa.array([16000], pa.int32()), "duration": [2 / 16000]}),
                        tmp_path / "old")
    cols = [c["name"] for c in ArrowDataset.open(old).manifest["columns"]]
    with pytest.warns(DeprecationWarning, match="'sample_rate' \\(now 'sampling_rate'\\)"):
        names = audio_columns(cols, where=str(old))
    assert names == {"sampling_rate": "sample_rate", "audio_path": "path"}
    assert ArrowDataset.open(old)[0][names["sampling_rate"]] == 16000
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert audio_columns(["audio_path", "sampling_rate", "audio"]) == {"audio_path": "audio_path",
                                                                            "sampling_rate": "sampling_rate"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 7.5, 20.0]), min_size=1, max_size=200),
       st.integers(1, 40), st.integers(0, 2**31))
def test_bins_count_is_what_was_asked_or_warned(values, num_buckets, seed):
    """Strictly increasing edges; exactly num_buckets - 1 of them unless a BinsWarning (naming the count) says not."""
    import warnings

    from samplers.bins import BinsWarning

    rng = np.random.default_rng(seed)
    d = np.asarray(values) + rng.uniform(0, 0.01, len(values)) * rng.integers(0, 2, len(values))
    num_buckets = min(num_buckets, len(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BinsWarning)
        bins = estimate_duration_bins(d, num_buckets)
    assert np.all(np.diff(bins) > 0)
    said = [str(w.message) for w in caught if w.category is BinsWarning]
    if len(bins) == max(num_buckets - 1, 0):
        assert not said
    else:
        assert len(said) == 1 and said[0].startswith(f"{len(bins) + 1} duration buckets instead of "
                                                     f"num_buckets={num_buckets}")
        with pytest.raises(ValueError, match="strict"):
            estimate_duration_bins(d, num_buckets, strict=True)
