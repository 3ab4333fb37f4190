"""Fixtures shared by every test package: where the data is, and a tiny trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Multi30k raw text: ../shared/data/multi30k beside the checkout, or $ROSETTA_DATA_DIR."""
    path = Path(os.environ.get("ROSETTA_DATA_DIR", REPO.parent / "shared" / "data" / "multi30k"))
    if not (path / "val.de.gz").exists():
        pytest.fail(f"Multi30k data not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 2+2-layer d_model-32 model trained for a few seconds to copy German sentences."""
    pytest.importorskip("torch")
    from model.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", data_dir)
