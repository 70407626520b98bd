"""TAS ingest: TSV files -> dataset directory + pair table; clear errors naming file and line; k-means CLI."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from datapipe import ArrowDataset, ingest_tas
from datapipe.cli import main
from datapipe.format import DatasetError
from datapipe.tas_ingest import cluster_embeddings, load_pair_table, read_pairs_tsv, save_pair_table
from samplers import PairTable, TopicAwareBatchSampler
from tests.helpers import assert_exactly_once

QUERIES = "q10\thow do i sort a list\nq20\twhat is a dictionary\nq30\ta query without pairs\nq40\topen a file\n"
PAIRS = ("10.5\t3.25\tq10\t100\t101\n"
         "9.0\t9.0\tq40\t102\t103\n"
         "8.0\t1.0\tq10\t104\t105\n"
         "7.5\t-2.0\tq20\t106\t107\n")


@pytest.fixture
def tsvs(tmp_path):
    q = tmp_path / "queries.tsv"
    p = tmp_path / "pairs.tsv"
    q.write_text(QUERIES)
    p.write_text(PAIRS)
    return q, p


def test_ingest_round_trip(tsvs, tmp_path):
    out = ingest_tas(*tsvs, tmp_path / "ds")
    ds = ArrowDataset.open(out)
    assert len(ds) == 4
    assert ds[1] == {"qid": "q20", "text": "what is a dictionary", "num_pairs": 1}
    np.testing.assert_array_equal(ds.index["num_pairs"], [2, 1, 0, 1])
    pt = load_pair_table(out)
    assert pt.offsets.tolist() == [0, 2, 3, 3, 4]
    assert pt.pos_id.tolist() == [100, 104, 106, 102]
    assert pt.neg_id.tolist() == [101, 105, 107, 103]
    np.testing.assert_allclose(pt.margin, [7.25, 7.0, 9.5, 0.0])
    t = pa.ipc.open_file(str(out / "pairs.arrow")).read_all()
    np.testing.assert_allclose(t.column("s_pos").to_numpy(), [10.5, 8.0, 7.5, 9.0])
    assert ds.verify()["ok"]


def test_ingest_with_tokenizer_and_sampler(tsvs, tmp_path):
    out = ingest_tas(*tsvs, tmp_path / "ds", tokenizer="bytes")
    ds = ArrowDataset.open(out)
    assert ds.index["length"].tolist() == [len(t.split("\t")[1]) + 1 for t in QUERIES.splitlines()]
    assert bytes(ds[3]["input_ids"][:-1].astype(np.uint8)).decode() == "open a file"
    pt = load_pair_table(out)
    s = TopicAwareBatchSampler(np.array([0, 0, 1, 1]), batch_size=2, pairs=pt, seed=0)
    batches = list(s)
    assert_exactly_once([[pt.query_of(b) for b in batches]], 4, dropped=1)  # q30 has no pairs
    assert s.stats()["dropped"] == {"no_pairs": 1}


BAD_PAIRS = [
    ("10\t3\tq10\t100\t101\n1\t2\tq99\t1\t2\n", r"pairs.tsv: line 2: qid 'q99' is not in the queries file"),
    ("10\t3\tq10\t100\n", r"pairs.tsv: line 1: expected 5 tab-separated fields"),
    ("10\t3\tq10\t100\t101\n\n", r"pairs.tsv: line 2: expected 5 tab-separated fields"),
    ("10\tabc\tq10\t100\t101\n", r"pairs.tsv: line 1: column 's_neg' is not a number"),
    ("1\t2\tq10\t100\t101\nnan\t2\tq10\t100\t101\n", r"pairs.tsv: line 2: teacher scores must be finite"),
    ("1\t2\tq10\tdoc7\t101\n", r"pairs.tsv: line 1: column 'pid_pos' is not an integer id"),
    ("", r"pairs.tsv: the file is empty"),
]


@pytest.mark.parametrize("text, match", BAD_PAIRS)
def test_bad_pairs_name_file_and_line_and_write_nothing(tsvs, tmp_path, text, match):
    q, p = tsvs
    p.write_text(text)
    with pytest.raises(DatasetError, match=match):
        ingest_tas(q, p, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".ds")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("q1\tfoo\nq1\tbar\n", r"queries.tsv: qid 'q1' appears twice \(lines 1 and 2\)"),
        ("q1\tfoo\nq2\n", r"queries.tsv: line 2: expected 2 tab-separated fields"),
        ("q1\tfoo\n\tbar\n", r"queries.tsv: line 2: empty qid"),
    ],
)
def test_bad_queries(tsvs, tmp_path, text, match):
    q, p = tsvs
    q.write_text(text)
    with pytest.raises(DatasetError, match=match):
        ingest_tas(q, p, tmp_path / "ds")


def test_missing_file(tmp_path, tsvs):
    with pytest.raises(DatasetError, match="no such file"):
        ingest_tas(tmp_path / "nope.tsv", tsvs[1], tmp_path / "ds")


def test_pair_table_save_load_keeps_queries_without_pairs(tmp_path):
    pt = PairTable.from_arrays([3, 0, 3], [1, 2, 3], [4, 5, 6], [0.5, 1.5, -2.0], num_queries=6)
    path = save_pair_table(pt, tmp_path / "p.arrow")
    back = load_pair_table(path)
    for f in ("offsets", "pos_id", "neg_id", "margin"):
        np.testing.assert_array_equal(getattr(back, f), getattr(pt, f))
    pa.ipc.new_file(str(tmp_path / "x.arrow"), pa.schema([("a", pa.int64())])).close()
    with pytest.raises(DatasetError, match="not a pair table"):
        load_pair_table(tmp_path / "x.arrow")


def test_read_pairs_accepts_python_qids(tsvs):
    pt, s_pos, s_neg = read_pairs_tsv(tsvs[1], ["q10", "q20", "q30", "q40"])
    assert pt.num_queries == 4 and pt.num_pairs == 4
    np.testing.assert_allclose(s_pos - s_neg, pt.margin)


def test_cluster_embeddings_npy_and_dataset_column(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6)) * 5
    x = (centers[np.repeat(np.arange(3), 50)] + 0.1 * rng.normal(size=(150, 6))).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    c, ids = cluster_embeddings(tmp_path / "emb.npy", 3, out=tmp_path / "cl.arrow")
    assert c.shape == (3, 6) and ids.shape == (150,)
    t = pa.ipc.open_file(str(tmp_path / "cl.arrow")).read_all()
    np.testing.assert_array_equal(t.column("cluster").to_numpy(), ids)
    assert (tmp_path / "cl.centroids.npy").exists()
    from datapipe import write_dataset

    write_dataset(pa.table({"emb": pa.array(list(x), pa.list_(pa.float32()))}), tmp_path / "ds")
    _, ids2 = cluster_embeddings(tmp_path / "ds", 3, column="emb")
    np.testing.assert_array_equal(ids2, ids)
    with pytest.raises(DatasetError, match="no column 'vec'"):
        cluster_embeddings(tmp_path / "ds", 3, column="vec")
    with pytest.raises(ValueError, match="k must be <= the number of points n=150"):
        cluster_embeddings(tmp_path / "emb.npy", 151)


def test_cli_ingest_and_cluster(tsvs, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["tas", "ingest", str(tsvs[0]), str(tsvs[1]), "--out", str(tmp_path / "ds")])
    assert r.exit_code == 0, r.output
    assert "4 queries, 4 pairs (1 queries without pairs)" in r.output
    np.save(tmp_path / "e.npy", np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32))
    r = runner.invoke(main, ["tas", "cluster", str(tmp_path / "e.npy"), "--k", "4", "--out", str(tmp_path / "c.arrow"),
                             "--gpu", "no"])
    assert r.exit_code == 0, r.output
    assert "40 queries in 4 clusters" in r.output
    r = runner.invoke(main, ["tas", "cluster", str(tmp_path / "e.npy"), "--k", "41",
                             "--out", str(tmp_path / "c.arrow")])
    assert r.exit_code != 0 and "k must be <= the number of points n=40" in r.output
    (tmp_path / "bad.tsv").write_text("1\t2\tq77\t1\t2\n")
    r = runner.invoke(main, ["tas", "ingest", str(tsvs[0]), str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "d2")])
    assert r.exit_code != 0 and "bad.tsv: line 1: qid 'q77'" in r.output
    for cmd in (["tas", "--help"], ["tas", "ingest", "--help"], ["tas", "cluster", "--help"]):
        assert "Example" in runner.invoke(main, cmd).output


def _bad_npy(path, kind):
    if kind == "1-D":
        np.save(path, np.arange(10, dtype=np.float32))
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "not npy":
        path.write_bytes(b"qid\temb\n1\t0.5\n")
    elif kind == "strings":
        np.save(path, np.array([["a", "b"]] * 10))
    elif kind == "objects":
        np.save(path, np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True)
    elif kind == "no rows":
        np.save(path, np.zeros((0, 4), np.float32))
    elif kind == "NaN row":
        x = np.ones((10, 4), np.float32)
        x[7, 2] = np.nan
        np.save(path, x)


@pytest.mark.parametrize("kind, message", [
    ("1-D", r"shape \(10,\) \(1-D\), expected 2-D \[n, d\]"),
    ("empty file", r"not a \.npy file \(empty\)"),
    ("not npy", r"not a \.npy file \(no NUMPY header\)"),
    ("strings", r"dtype <U1, expected numbers"),
    ("objects", r"cannot read a numeric \.npy array"),
    ("no rows", r"shape \(0, 4\), expected at least one row"),
    ("NaN row", r"row 7, column 2: nan"),
])
def test_cli_cluster_malformed_npy_is_one_error_line(tmp_path, kind, message):
    import re

    path = tmp_path / "x.npy"
    _bad_npy(path, kind)
    for cmd in (["cluster"], ["tas", "cluster"]):
        r = CliRunner().invoke(main, [*cmd, str(path), "--k", "2", "--out", str(tmp_path / "c.arrow"), "--gpu", "no"])
        assert r.exit_code == 1, r.output
        assert "Error: " in r.output and f"{path}: " in r.output and re.search(message, r.output), r.output
        assert "Traceback" not in r.output and "internal error" not in r.output, r.output
        assert not (tmp_path / "c.arrow").exists()
    with pytest.raises(DatasetError, match=message):
        cluster_embeddings(path, 2)


def test_cluster_dataset_column_of_scalars_names_the_column(tmp_path):
    from datapipe import write_dataset

    write_dataset(pa.table({"score": pa.array(np.arange(20, dtype=np.float32))}), tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"ds: column 'score': embeddings of shape \(20,\) \(1-D\)"):
        cluster_embeddings(tmp_path / "ds", 2, column="score")
