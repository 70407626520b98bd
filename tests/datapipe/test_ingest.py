"""Lossless ingest (issue 13): tokenizer settings, binary files, raw bytes, literal paths, HF folders, long JSONL
lines, bad ids named by file/row/column, and parallel tokenization identical to one process."""

import gzip
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import datapipe
from datapipe.cli import main
from datapipe.format import DatasetError

WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jovial pack of "
         "boxing kangaroos near the old mill by the river").split()


def _docs(n=12, seed=0):
    rng = np.random.default_rng(seed)
    # lengths from 3 to ~150 words: most exceed the tokenizer's max_length=16 and padding length=32
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 150)))) for _ in range(n)]


@pytest.fixture
def trunc_pad_tokenizer(tmp_path):
    """A WordPiece-free WordLevel tokenizer.json with truncation (16) and padding (32) enabled, as shipped ones are."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_docs(50, seed=1), trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "</s>"]))
    tok.enable_truncation(max_length=16)
    tok.enable_padding(length=32, pad_id=1, pad_token="[PAD]")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _rows(path):
    ds = datapipe.ArrowDataset.open(path)
    return [ds[i]["input_ids"].tolist() for i in range(len(ds))]


# --- acceptance: tokenizer.json truncation and padding are not applied --------------------------------------------
def test_tokenizer_json_truncation_and_padding_disabled(tmp_path, trunc_pad_tokenizer):
    from tokenizers import Tokenizer

    docs = _docs()
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    out = datapipe.ingest(str(src), tmp_path / "ds", tokenizer=str(trunc_pad_tokenizer))
    ref = Tokenizer.from_file(str(trunc_pad_tokenizer))
    assert len(ref.encode(docs[0], add_special_tokens=False).ids) == 32  # the file does truncate/pad on its own
    ref.no_truncation()
    ref.no_padding()
    eos = ref.token_to_id("</s>")
    want = [ref.encode(d, add_special_tokens=False).ids + [eos] for d in docs]
    assert _rows(out) == want
    assert max(len(r) for r in want) > 100 and ref.token_to_id("[PAD]") not in sum(want, [])


# --- acceptance: binary files ----------------------------------------------------------------------------------
def _wav_bytes():
    return b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + bytes(range(40))


@pytest.mark.parametrize("kind", ["nul", "gzip", "wav", "png"])
def test_binary_file_among_text_is_refused_by_name(tmp_path, kind):
    files = []
    for i in range(3):
        p = tmp_path / f"t{i}.txt"
        p.write_text(f"text file {i}\n")
        files.append(p)
    data = {"nul": b"abc\x00def", "gzip": gzip.compress(b"hello"), "wav": _wav_bytes(),
            "png": b"\x89PNG\r\n\x1a\n" + b"IHDR" * 10}[kind]
    bad = tmp_path / f"blob_{kind}.txt"
    bad.write_bytes(data)
    with pytest.raises(DatasetError, match=rf"blob_{kind}\.txt: looks binary"):
        datapipe.ingest([*files[:2], bad, files[2]], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    with pytest.warns(UserWarning, match=r"skipped 1 binary files: .*blob_"):
        out = datapipe.ingest([*files[:2], bad, files[2]], tmp_path / "ds", skip_binary=True)
    ds = datapipe.ArrowDataset.open(out)
    assert [ds[i]["path"] for i in range(len(ds))] == [str(f) for f in files]
    assert ds.manifest["params"]["skipped_binary"] == 1
    assert ds.manifest["params"]["skipped_binary_files"] == [str(bad)]


def test_binary_reason():
    from datapipe.ingestion import binary_reason

    assert binary_reason(b"RIFF is a container format; ID3 tags live in MP3 files.\n") is None
    assert binary_reason("%PDF- and BZh are magic words in plain text ü\n".encode()) is None
    assert binary_reason(_wav_bytes()) == "RIFF (WAV/AVI/WebP) magic number"
    assert binary_reason(b"ID3\x04\x00\x00\x00\x00\x00") == "MP3 magic number"
    assert binary_reason(b"\x7fELF\x02\x01") == "ELF executable magic number"
    assert "UTF-16" in binary_reason("text".encode("utf-16"))
    assert binary_reason(b"") is None


def test_only_binary_files_with_skip_says_so(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DatasetError, match=r"no documents to ingest \(1 binary files skipped\)"):
        datapipe.ingest(str(tmp_path / "a.bin"), tmp_path / "ds", skip_binary=True)


# --- acceptance: the byte tokenizer stores raw bytes -------------------------------------------------------------
def test_non_utf8_file_is_its_bytes_plus_eos(tmp_path):
    raw = "café déjà vu, naïve façade".encode("latin-1") + bytes([0xFF, 0xFE, 0x80])
    p = tmp_path / "latin1.txt"
    p.write_bytes(raw)
    ok = tmp_path / "utf8.txt"
    ok.write_text("héllo")
    rows = _rows(datapipe.ingest([str(p), str(ok)], tmp_path / "ds"))
    assert rows[0] == list(raw) + [256]
    assert rows[1] == list("héllo".encode()) + [256]


def test_byte_tokenizer_takes_bytes_and_str():
    tok = datapipe.ByteTokenizer()
    r = tok.encode_batch([b"\xff\x00a", "é"])
    assert r[0].tolist() == [255, 0, 97, 256] and r[1].tolist() == [0xC3, 0xA9, 256]
    assert tok.decode_bytes(r[0]) == b"\xff\x00a"


# --- acceptance: literal paths before globs ------------------------------------------------------------------
def test_cli_literal_path_before_glob(tmp_path):
    (tmp_path / "doc[1].txt").write_text("the bracket one")
    (tmp_path / "doc1.txt").write_text("the plain one, longer")
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "doc[1].txt"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    ds = datapipe.ArrowDataset.open(out)
    assert len(ds) == 1 and ds[0]["path"] == str(tmp_path / "doc[1].txt")
    assert ds[0]["input_ids"].tolist() == list(b"the bracket one") + [256]
    # a pattern that names no existing file is still expanded
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "doc?.txt"), "--out", str(tmp_path / "ds2")])
    assert r.exit_code == 0, r.output
    assert datapipe.ArrowDataset.open(tmp_path / "ds2")[0]["path"] == str(tmp_path / "doc1.txt")


def test_expand_sources(tmp_path):
    from datapipe.ingestion import expand_sources

    (tmp_path / "a[1].txt").write_text("x")
    (tmp_path / "a1.txt").write_text("y")
    assert expand_sources(str(tmp_path / "a[1].txt")) == [tmp_path / "a[1].txt"]
    assert expand_sources([str(tmp_path / "a*.txt")]) == [tmp_path / "a1.txt", tmp_path / "a[1].txt"]
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: no such file"):
        expand_sources([str(tmp_path / "a1.txt"), str(tmp_path / "missing.txt")])


# --- acceptance: CLI errors are messages, not tracebacks ---------------------------------------------------------
def test_cli_errors_without_traceback(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["ingest", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "missing.txt" in r.output and "Traceback" not in r.output
    x = tmp_path / "x.jsonl"
    x.write_text('{"text": "a"}\n')
    r = runner.invoke(main, ["ingest", str(x), "--text-column", "nope", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "no text column 'nope'" in r.output and "x.jsonl" in r.output and "--text-column" in r.output
    b = tmp_path / "a.wav"
    b.write_bytes(_wav_bytes())
    r = runner.invoke(main, ["ingest", str(b), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "a.wav: looks binary" in r.output and "--skip-binary" in r.output
    r = runner.invoke(main, ["ingest", "--help"])
    assert "truncation" in r.output and "padding" in r.output


# --- acceptance: Hugging Face save_to_disk folders --------------------------------------------------------------
def test_save_to_disk_folder_gives_its_rows(tmp_path):
    import datasets

    docs = _docs(7)
    hf = datasets.Dataset.from_dict({"text": docs, "domain": [i % 2 for i in range(7)]})
    hf.save_to_disk(str(tmp_path / "hf"))
    ds = datapipe.ArrowDataset.open(datapipe.ingest(str(tmp_path / "hf"), tmp_path / "ds"))
    assert _rows(ds.path) == [list(d.encode()) + [256] for d in docs]
    assert ds.index["domain"].tolist() == [i % 2 for i in range(7)]
    # the loaded object, a selection of it and a DatasetDict folder (splits in order) too
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert _rows(datapipe.ingest(loaded.select([3, 1]), tmp_path / "ds2")) == [list(docs[i].encode()) + [256]
                                                                             for i in (3, 1)]
    dd = datasets.DatasetDict({"train": hf.select(range(5)), "test": hf.select(range(5, 7))})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "hfdict"), "--out", str(tmp_path / "ds3")])
    assert r.exit_code == 0, r.output
    assert _rows(tmp_path / "ds3") == [list(d.encode()) + [256] for d in docs]


def test_tokenized_hf_folder_keeps_its_ids(tmp_path):
    import datasets

    ids = [[5, 6, 7], [1], [], [9, 2**20]]
    datasets.Dataset.from_dict({"input_ids": ids, "label": [0, 1, 0, 1]}).save_to_disk(str(tmp_path / "hf"))
    ds = datapipe.ArrowDataset.open(datapipe.ingest(str(tmp_path / "hf"), tmp_path / "ds"))
    assert _rows(ds.path) == ids and ds.index["length"].tolist() == [3, 1, 0, 2]
    assert ds.manifest["params"]["eos_id"] is None and ds[3]["label"] == 1
    with pytest.raises(DatasetError, match=r"hf: row 3, column 'input_ids': token id 1048576 is >= the vocabulary "
                                           r"size 1000"):
        datapipe.ingest(str(tmp_path / "hf"), tmp_path / "ds2", vocab_size=1000)
    with pytest.raises(DatasetError, match=r"hf: no text column 'text'"):  # a tokenizer asks for text
        datapipe.ingest(str(tmp_path / "hf"), tmp_path / "ds3", tokenizer="bytes")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"a\.txt: a plain text file has no column 'ids'"):
        datapipe.ingest(str(tmp_path / "a.txt"), tmp_path / "ds4", tokens_column="ids")


def test_in_memory_sources_with_num_proc(tmp_path):
    import datasets

    from datapipe import ingest_sources

    docs = _docs(9, seed=5)
    want = [list(d.encode()) + [256] for d in docs]
    old = ingest_sources.HF_ROWS_PER_TASK
    ingest_sources.HF_ROWS_PER_TASK = 2  # several tasks, each a slice of one in-memory table
    try:
        hf = datasets.Dataset.from_dict({"text": docs})
        assert _rows(datapipe.ingest(hf, tmp_path / "a", num_proc=2)) == want
        table = pa.table({"text": docs})
        seen = []
        out = datapipe.ingest(table.to_reader(max_chunksize=4), tmp_path / "b", num_proc=2,
                              file_progress=lambda d, t: seen.append((d, t)))
        assert _rows(out) == want and seen[-1] == (0, None)
    finally:
        ingest_sources.HF_ROWS_PER_TASK = old


def test_plain_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match=r"d: is a directory.*save_to_disk"):
        datapipe.ingest(str(tmp_path / "d"), tmp_path / "ds")


# --- JSONL lines longer than Arrow's block ---------------------------------------------------------------------
def test_jsonl_line_longer_than_block(tmp_path):
    long = "x" * (3 << 20)  # 3 MiB: three default 1 MiB blocks
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": long}) + "\n")
    ds = datapipe.ArrowDataset.open(datapipe.ingest(str(p), tmp_path / "ds"))
    assert ds.index["length"].tolist() == [6, len(long) + 1]


# --- pre-tokenized ids: refused naming file, row within that file, column -----------------------------------------
@pytest.mark.parametrize("bad, why", [(None, "null token list"), ([1, None], "null token id"),
                                      ([1, -3], "token id -3 is negative"),
                                      ([1, 2**31], "token id 2147483648 is above the int32 maximum")])
def test_bad_ids_name_file_row_column(tmp_path, bad, why):
    a = tmp_path / "a.parquet"
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"ids": pa.array([[1, 2]] * 10, pa.list_(pa.int64()))}), a)
    ids = [[3]] * 10
    ids[5] = bad
    pq.write_table(pa.table({"ids": pa.array(ids, pa.list_(pa.int64()))}), b)
    with pytest.raises(DatasetError, match=rf"b\.parquet: row 5, column 'ids': {why}"):
        datapipe.ingest([str(a), str(b)], tmp_path / "ds", tokens_column="ids")


def test_ids_checked_against_vocab_size_and_type(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"ids": [1, i]}) for i in range(300)))
    with pytest.raises(DatasetError, match=r"a\.jsonl: row 257, column 'ids': token id 257 is >= the vocabulary "
                                           r"size 257"):
        datapipe.ingest(str(p), tmp_path / "ds", tokens_column="ids", tokenizer="bytes")
    ds = datapipe.ArrowDataset.open(datapipe.ingest(str(p), tmp_path / "ds", tokens_column="ids"))
    assert ds[299]["input_ids"].tolist() == [1, 299]
    f = tmp_path / "f.jsonl"
    f.write_text(json.dumps({"ids": [1.5, 2.0]}))
    with pytest.raises(DatasetError, match=r"f\.jsonl: column 'ids' holds lists of double, not integer token ids"):
        datapipe.ingest(str(f), tmp_path / "ds2", tokens_column="ids")
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"text": 5}))
    with pytest.raises(DatasetError, match=r"t\.jsonl: column 'text' holds int64, not text"):
        datapipe.ingest(str(t), tmp_path / "ds3")


def test_source_length_column_must_be_the_token_count(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"text": "abc", "length": 4 if i != 2 else 3}) for i in range(4)))
    with pytest.raises(DatasetError, match=r"a\.jsonl: row 2, column 'length': 3 is not the row's token count \(4"):
        datapipe.ingest(str(p), tmp_path / "ds")


def test_schema_mismatch_names_second_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"text": "x", "k": 1}))
    b.write_text(json.dumps({"text": "y", "other": 1}))
    with pytest.raises(DatasetError, match=r"b\.jsonl"):
        datapipe.ingest([str(a), str(b)], tmp_path / "ds")


# --- parallel tokenization: byte-identical to one process ---------------------------------------------------------
def _shard_checksums(path):
    m = datapipe.ArrowDataset.open(path).manifest
    return [s["checksum"] for s in m["shards"]], m["index"]["checksum"]


def test_num_proc_is_byte_identical(tmp_path, trunc_pad_tokenizer):
    from datapipe import ingest_sources

    files = []
    for i, d in enumerate(_docs(40, seed=3)):
        p = tmp_path / f"d{i:02d}.txt"
        p.write_text(d)
        files.append(str(p))
    old = ingest_sources.FILES_PER_TASK
    ingest_sources.FILES_PER_TASK = 3  # 14 tasks over 2 processes: results come back out of order
    try:
        one = datapipe.ingest(files, tmp_path / "one", tokenizer=str(trunc_pad_tokenizer), shard_rows=7)
        seen = []
        two = datapipe.ingest(files, tmp_path / "two", tokenizer=str(trunc_pad_tokenizer), shard_rows=7, num_proc=2,
                              file_progress=lambda done, total: seen.append((done, total)))
    finally:
        ingest_sources.FILES_PER_TASK = old
    assert _shard_checksums(one) == _shard_checksums(two)
    assert _rows(one) == _rows(two) and len(_rows(one)) == 40
    assert seen[-1] == (40, 40) and len(seen) == 14
    with pytest.raises(ValueError, match="num_proc must be an integer >= 1"):
        datapipe.ingest(files, tmp_path / "x", num_proc=0)
    with pytest.raises(ValueError, match="engine must be one of"):
        datapipe.ingest(files, tmp_path / "x", engine="spark")


def test_cli_num_proc(tmp_path):
    files = []
    for i, d in enumerate(_docs(5, seed=4)):
        p = tmp_path / f"c{i}.txt"
        p.write_text(d)
        files.append(str(p))
    runner = CliRunner()
    r1 = runner.invoke(main, ["ingest", *files, "--out", str(tmp_path / "a"), "--shard-rows", "2"])
    r2 = runner.invoke(main, ["ingest", *files, "--out", str(tmp_path / "b"), "--shard-rows", "2", "--num-proc", "2"])
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    assert "5 rows, 3 shards" in r2.output
    assert _shard_checksums(tmp_path / "a") == _shard_checksums(tmp_path / "b")
    r = runner.invoke(main, ["ingest", *files, "--out", str(tmp_path / "c"), "--num-proc", "0"])
    assert r.exit_code == 2 and "--num-proc" in r.output


def test_num_proc_error_names_file(tmp_path):
    files = []
    for i in range(4):
        p = tmp_path / f"p{i}.jsonl"
        p.write_text("\n".join(json.dumps({"ids": [1, 2] if (i, r) != (2, 3) else [1, -1]}) for r in range(5)))
        files.append(str(p))
    with pytest.raises(DatasetError, match=r"p2\.jsonl: row 3, column 'ids': token id -1 is negative"):
        datapipe.ingest(files, tmp_path / "ds", tokens_column="ids", num_proc=2)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_is_byte_identical(tmp_path, trunc_pad_tokenizer):
    import ray

    from datapipe import ingest_sources

    src = []
    for i in range(6):
        p = tmp_path / f"s{i}.jsonl"
        p.write_text("\n".join(json.dumps({"text": d}) for d in _docs(9, seed=10 + i)))
        src.append(str(p))
    local = datapipe.ingest(src, tmp_path / "local", tokenizer=str(trunc_pad_tokenizer), shard_rows=10)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = datapipe.ingest(src, tmp_path / "ray", tokenizer=str(trunc_pad_tokenizer), shard_rows=10,
                                 engine="ray")
        old = ingest_sources.FILES_PER_TASK
        ingest_sources.FILES_PER_TASK = 2
        try:
            txt = [str(tmp_path / f"t{i}.txt") for i in range(5)]
            for i, t in enumerate(txt):
                open(t, "w").write(_docs(1, seed=i)[0])
            a = datapipe.ingest(txt, tmp_path / "ta", shard_rows=2)
            b = tmp_path / "tb"
            r = CliRunner().invoke(main, ["ingest", *txt, "--out", str(b), "--shard-rows", "2", "--engine", "ray"])
            assert r.exit_code == 0, r.output
        finally:
            ingest_sources.FILES_PER_TASK = old
        good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
        good.write_text("\n".join(json.dumps({"ids": [1, 2]}) for r in range(6)))
        bad.write_text("\n".join(json.dumps({"ids": [1, -2 if r == 4 else 2]}) for r in range(6)))
        with pytest.raises(DatasetError, match=r"bad\.jsonl: row 4, column 'ids': token id -2 is negative"):
            datapipe.ingest([str(good), str(bad)], tmp_path / "bad", tokens_column="ids", engine="ray")
    finally:
        ray.shutdown()
    assert _shard_checksums(local) == _shard_checksums(remote)
    assert _rows(local) == _rows(remote) and len(_rows(local)) == 54
    assert _shard_checksums(a) == _shard_checksums(b)
