"""Fixtures of the export tests: the int8 entry (made through the CLI) and loaded graphs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def tiny_int8_entry(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint exported as int8 by `rosetta export ... --precision int8 --check`."""
    from service.cli import main

    out = tmp_path_factory.mktemp("model_repository") / "tiny-int8" / "1"
    rc = main(["export", str(tiny_checkpoint), "--out", str(out), "--precision", "int8", "--check"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    """(Transformer, Tokenizer) of the tiny checkpoint, fp32, eval mode."""
    import torch

    from model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_graphs(tiny_repository_entry: Path):  # type: ignore[no-untyped-def]
    """The fp32 entry loaded in ONNX Runtime (CPU, one thread)."""
    from export.ort_graphs import OrtGraphs

    return OrtGraphs(tiny_repository_entry, threads=1)
