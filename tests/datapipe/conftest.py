import numpy as np
import pytest

import datapipe
from tests.datapipe.s3server import server  # noqa: F401  (the S3 server fixture of the remote tests)


def make_rows(n=97, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 50000, rng.integers(0, 40)).astype(np.int32).tolist(),
             "text": f"doc {i}", "score": float(i) * 0.5, "domain": int(i % 3)} for i in range(n)]


@pytest.fixture
def rows():
    return make_rows()


@pytest.fixture
def small_ds(tmp_path, rows):
    return datapipe.ArrowDataset.open(datapipe.write_dataset(rows, tmp_path / "ds", shard_rows=20))
