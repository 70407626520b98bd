import json

import numpy as np
import pytest

import datapipe
from datapipe.format import DatasetError
from datapipe.tokenize import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    texts = ["héllo", "", "a\nb"]
    r = tok.encode_batch(texts)
    assert r.values.dtype == np.int32
    for j, t in enumerate(texts):
        ids = r[j]
        assert ids[-1] == tok.eos_id and tok.decode(ids) == t
        assert len(ids) == len(t.encode()) + 1


def test_ingest_text_files(tmp_path):
    files = []
    for i in range(5):
        p = tmp_path / f"f{i}.py"
        p.write_text(f"print({i})\n" * (i + 1))
        files.append(str(p))
    ds = datapipe.ArrowDataset.open(datapipe.ingest(files, tmp_path / "ds", shard_rows=2))
    assert len(ds) == 5 and ds.num_shards == 3
    assert ds.index["length"].tolist() == [len(open(f, "rb").read()) + 1 for f in files]
    assert ds[2]["path"] == files[2]
    assert ds.manifest["params"]["eos_id"] == 256


def test_ingest_jsonl_and_pretokenized(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "ids": [1, 2]}) for t in ["ab", "c"]))
    ds = datapipe.ArrowDataset.open(datapipe.ingest(str(p), tmp_path / "ds"))
    assert ds[0]["input_ids"].tolist() == [97, 98, 256]
    ds2 = datapipe.ArrowDataset.open(datapipe.ingest(str(p), tmp_path / "ds2", tokens_column="ids"))
    assert ds2[1]["input_ids"].tolist() == [1, 2] and ds2[1]["text"] == "c"
    with pytest.raises(DatasetError, match="no text column 'body'"):
        datapipe.ingest(str(p), tmp_path / "ds3", text_column="body")


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world", "hello there"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    t = load_tokenizer(str(path))
    r = t.encode_batch(["hello world"])
    assert r[0].tolist()[-1] == t.eos_id == tok.token_to_id("</s>")
    assert len(r[0]) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))


def _trunc_pad_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c d e f g h"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "</s>"]))
    tok.enable_truncation(max_length=3)
    tok.enable_padding(length=6, pad_id=1, pad_token="[PAD]")
    return tok


def test_hf_tokenizer_object_is_copied_and_lossless():
    tok = _trunc_pad_tokenizer()
    t = load_tokenizer(tok)
    ids = t.encode_batch(["a b c d e f g h", "a"])
    assert len(ids[0]) == 9 and ids[0][-1] == tok.token_to_id("</s>") and len(ids[1]) == 2
    assert tok.truncation is not None and tok.padding is not None  # the caller's object is untouched
    with pytest.raises(TypeError, match="tokenizer must be 'bytes'"):
        load_tokenizer(3.5)


def test_bad_tokenizer_file_is_a_value_error(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizer\.json"):
        load_tokenizer(str(p))


def test_hf_tokenizer_warns_on_non_utf8_file(tmp_path):
    path = tmp_path / "tok.json"
    _trunc_pad_tokenizer().save(str(path))
    f = tmp_path / "latin1.txt"
    f.write_bytes("a b \xe9".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"decoded 1 files that are not valid UTF-8.*latin1\.txt"):
        out = datapipe.ingest(str(f), tmp_path / "ds", tokenizer=str(path))
    assert len(datapipe.ArrowDataset.open(out)[0]["input_ids"]) == 4  # a, b, [UNK] for U+FFFD, EOS
