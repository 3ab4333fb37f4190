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


@pytest.fixture(scope="session")
def tiny_repository_entry(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """`tiny_checkpoint` exported to an fp32 model-repository entry folder (.../model_repository/tiny/1).

    Holds encoder.onnx, decoder.onnx, tokenizer.json and manifest.json (see export/manifest.py).
    """
    pytest.importorskip("onnx")
    from export.api import export_entry

    return export_entry(tiny_checkpoint, tmp_path_factory.mktemp("model_repository") / "tiny" / "1")
