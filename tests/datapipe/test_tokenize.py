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
