"""Imports run one way: model -> export -> service. The serving side never imports the training side,
and the training side never imports the engine's runtime (onnxruntime sessions) at import time.

Each check imports every module of a package in a fresh interpreter and reads sys.modules."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def modules_of(package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(REPO / package.replace(".", "/"))], prefix=package + "."):
        if ".proto.generate" not in info.name:  # a build script, not part of the package's code
            names.append(info.name)
    return names


def loaded_after_importing(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_service_imports_neither_model_nor_export_nor_torch() -> None:
    loaded = loaded_after_importing(modules_of("service"))
    offenders = sorted(m for m in loaded if m.split(".")[0] in ("model", "export", "torch"))
    assert not offenders, f"service/ imports the training side: {offenders}"
    assert "service.engine.runtime" in loaded  # the check saw the engine itself


@pytest.mark.parametrize("package", ["model", "export"])
def test_training_side_does_not_import_the_engine_runtime(package: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    loaded = loaded_after_importing(modules_of(package))
    forbidden = {"service.engine.engine", "service.engine.runtime", "service.engine.entry", "service.server"}
    if package == "model":  # the exporter runs onnxruntime itself (parity, quantization); the model never
        forbidden.add("onnxruntime")
    runtime = sorted(loaded & forbidden)
    assert not runtime, f"{package}/ imports the serving runtime at import time: {runtime}"
    assert f"{package}" in loaded


def test_export_api_and_evaluate_do_not_import_each_other_both_ways() -> None:
    pytest.importorskip("onnx")
    assert "export.api" not in loaded_after_importing(["export.evaluate"])
