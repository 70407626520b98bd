import json

from click.testing import CliRunner

import datapipe
from datapipe.cli import main


def test_ingest_inspect_verify(tmp_path):
    for i in range(4):
        (tmp_path / f"m{i}.py").write_text("x = 1\n" * (10 * i + 1))
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "*.py"), "--out", str(out), "--shard-rows", "2"])
    assert r.exit_code == 0, r.output
    assert "4 rows, 2 shards" in r.output
    png = tmp_path / "h.png"
    r = CliRunner().invoke(main, ["inspect", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "checksums ok" in r.output and png.stat().st_size > 1000
    r = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    summary = json.loads(r.output)
    assert summary["rows"] == 4 and summary["tokens"] == int(datapipe.ArrowDataset.open(out).index["length"].sum())
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "ok: 3 files" in r.output
    shard = out / "shards" / "00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 1
    shard.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "00001.arrow: checksum mismatch" in r.output


def test_ingest_no_match(tmp_path):
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "*.nothing"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no file matches" in r.output


def test_every_command_has_help_with_example():
    runner = CliRunner()
    for name, cmd in main.commands.items():
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Example" in r.output, name


def test_top_level_cluster_command(tmp_path):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 10
    x = (centers[rng.integers(0, 4, 400)] + rng.normal(size=(400, 8))).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    out = tmp_path / "clusters.arrow"
    r = CliRunner().invoke(main, ["cluster", str(tmp_path / "emb.npy"), "--k", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    t = pa.ipc.open_file(pa.memory_map(str(out))).read_all()
    ids = t.column(t.column_names[-1]).to_numpy()
    assert len(ids) == 400 and len(np.unique(ids)) == 4
