"""The CLI's one error path: a user error is ``Error: <message>`` and exit code 1 (2 for usage), no traceback
unless ``--debug``; library parameter names in messages become the command's flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

import datapipe
from datapipe.cli import cli_message, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, env=None):
    """Run the command in a child process the way a user does; returns (exit code, stdout + stderr)."""
    p = subprocess.run([sys.executable, "-c", "from datapipe.cli import main; main()", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "DATAPIPE_DEBUG": "", **(env or {})})
    return p.returncode, p.stdout + p.stderr


def invoke(*args):
    """CliRunner with catch_exceptions=False: an exception that escapes the error path fails the test."""
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    return p


# ---- the acceptance list, in child processes -------------------------------------------------------------------
def test_acceptance_commands_exit_nonzero_without_traceback(tmp_path, jsonl):
    notcsv = tmp_path / "shares.json"
    notcsv.write_text(json.dumps({"a": 1.0, "b": 2.0}))
    cases = [
        (["ingest", tmp_path / "missing.txt", "--out", tmp_path / "o1"], 1, "missing.txt"),
        (["ingest", jsonl, "--text-column", "nope", "--out", tmp_path / "o2"], 1, "'nope'"),
        (["inspect", tmp_path / "no_dir"], 2, "no_dir"),
        (["buckets", "estimate", tmp_path / "no_dir", "--out", tmp_path / "b.json"], 2, "no_dir"),
        (["regmix", "fit", "--mixtures", notcsv, "--losses", notcsv, "--out", tmp_path / "m.pkl"], 1, "shares.json"),
    ]
    for args, code, named in cases:
        rc, out = cli(*args)
        assert rc == code, (args, rc, out)
        assert "Traceback" not in out and "Error: " in out and named in out, (args, out)
    assert not (tmp_path / "o2").exists()


def test_debug_flag_and_env_show_the_traceback(tmp_path):
    rc, out = cli("--debug", "ingest", tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert rc == 1 and "Traceback" in out and "missing.txt" in out
    rc, out = cli("ingest", tmp_path / "missing.txt", "--out", tmp_path / "o", env={"DATAPIPE_DEBUG": "1"})
    assert rc == 1 and "Traceback" in out


# ---- every command group, in process ----------------------------------------------------------------------------
def test_library_flag_names_become_cli_flags(tmp_path, jsonl):
    r = invoke("ingest", jsonl, "--out", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    r = invoke("ingest", jsonl, "--out", tmp_path / "ds")
    assert r.exit_code == 1 and "--overwrite" in r.output and "overwrite=True" not in r.output, r.output


def test_cli_message_rewrites_only_known_parameters():
    flags = {"overwrite": ("--overwrite", True), "num_buckets": ("--num-buckets", False),
             "channels": ("--channels", False)}
    assert cli_message("x (pass overwrite=True to replace it)", flags) == "x (pass --overwrite to replace it)"
    assert cli_message("instead of num_buckets=30: why", flags) == "instead of --num-buckets 30: why"
    assert cli_message("pass channels='mix' or 'first'", flags) == "pass --channels mix or 'first'"
    assert cli_message("pass eos_token= or eos_id=", flags) == "pass eos_token= or eos_id="  # no such flag
    assert cli_message("see a/b.py?x=1 and path=/x", flags) == "see a/b.py?x=1 and path=/x"
    assert cli_message("num_buckets must be <= 5 (got num_buckets=9)", flags) == "num_buckets must be <= 5 (got " \
        "--num-buckets 9)"


def test_speech_and_buckets_errors(tmp_path):
    ds = datapipe.write_dataset(pa.table({"duration": np.linspace(1, 5, 50)}), tmp_path / "ds")
    r = invoke("buckets", "estimate", ds, "--duration-column", "dur", "--out", tmp_path / "b.json")
    assert r.exit_code == 2 and "Invalid value for --duration-column: " in r.output, r.output
    assert "Invalid value for 'DATASET_DIR'" not in r.output
    r = invoke("buckets", "estimate", ds, "--num-buckets", "500", "--out", tmp_path / "b.json")
    assert r.exit_code == 1 and "(got --num-buckets 500 for 50 cuts)" in r.output, r.output
    r = invoke("ingest-audio", tmp_path / "none.wav", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "none.wav" in r.output
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not a wav")
    r = invoke("ingest-audio", bad, "--out", tmp_path / "a")
    assert r.exit_code == 1 and "bad.wav: cannot read audio" in r.output
    r = invoke("import-lhotse", bad, "--out", tmp_path / "a")
    assert r.exit_code == 1 and "bad.wav" in r.output
    assert not (tmp_path / "a").exists()


def test_regmix_and_tas_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    r = invoke("regmix", "fit", "--mixtures", empty, "--losses", empty, "--out", tmp_path / "m.pkl")
    assert r.exit_code == 1 and "empty.csv: empty file" in r.output
    model = tmp_path / "model.json"
    model.write_text("{}")
    shares = tmp_path / "shares.json"
    shares.write_text(json.dumps({"a": 1.0, "b": 1.0}))
    r = invoke("regmix", "search", model, "--shares", shares, "--out", tmp_path / "best.json")
    assert r.exit_code == 1 and "model.json: not a model file" in r.output, r.output
    q, p = tmp_path / "q.tsv", tmp_path / "p.tsv"
    q.write_text("qid\ttext\n1\thello\n")
    p.write_text("1.0\t0.5\t1\t10\t11\n")
    r = invoke("tas", "ingest", q, p, "--out", tmp_path / "tas")
    assert r.exit_code == 1 and "line 1 is a header" in r.output, r.output


def test_an_unexpected_exception_is_named_not_dumped(tmp_path, monkeypatch):
    import datapipe.inspect

    def boom(*a, **k):
        raise IndexError("index 3 is out of bounds")

    monkeypatch.setattr(datapipe.inspect, "summarize", boom)
    ds = datapipe.write_dataset(pa.table({"x": [1, 2]}), tmp_path / "ds")
    r = invoke("inspect", ds)
    assert r.exit_code == 1 and "internal error (IndexError: index 3" in r.output and "--debug" in r.output


def test_every_command_answers_a_user_error_with_error_line(tmp_path):
    """One user error per command (group) not covered above: exit 1 or 2 with `Error: `, no exception escapes."""
    ds = datapipe.write_dataset(pa.table({"input_ids": [[1, 2, 3], [4, 5]]}), tmp_path / "ds")
    (tmp_path / "shares.json").write_text("[1, 2]")
    (tmp_path / "m.csv").write_text("index,a,b\n1,0.5,0.5\n")
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04K\x01.")  # a pickled int, not a model
    cases = {
        "verify": ["verify", tmp_path / "no_dir"],
        "decompose": ["decompose", ds, "--min-log2", "9", "--max-log2", "4"],
        "cluster": ["cluster", tmp_path / "m.csv", "--k", "2", "--out", tmp_path / "c.arrow"],
        "tas cluster": ["tas", "cluster", tmp_path / "m.csv", "--k", "2", "--out", tmp_path / "c.arrow"],
        "regmix propose": ["regmix", "propose", "--shares", tmp_path / "shares.json", "-n", "4", "--out",
                           tmp_path / "p.csv"],
        "regmix evaluate": ["regmix", "evaluate", tmp_path / "model.pkl", "--mixtures", tmp_path / "m.csv",
                            "--losses", tmp_path / "m.csv"],
        "import-lhotse": ["import-lhotse", tmp_path / "shares.json", "--out", tmp_path / "lh"],
    }
    for name, args in cases.items():
        r = invoke(*args)
        assert r.exit_code in (1, 2) and "Error: " in r.output and "Traceback" not in r.output, (name, r.output)
        assert "internal error" not in r.output, (name, r.output)  # a user error, not a bug of ours
