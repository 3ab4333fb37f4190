"""An exported entry: its files, its manifest and the signature its graphs declare."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.manifest import read_manifest, sha256_of, verify_files
from service import signature as sig

MANIFEST_KEYS = {
    "signature_version", "name", "version", "precision", "source_lang", "target_lang", "opset", "model_config",
    "special_ids", "graphs", "files", "library_versions", "quality", "export_seconds",
}


def test_entry_holds_graphs_tokenizer_and_manifest(tiny_repository_entry: Path) -> None:
    names = sorted(p.name for p in tiny_repository_entry.iterdir())
    assert names == ["decoder.onnx", "encoder.onnx", "manifest.json", "tokenizer.json"]
    manifest = read_manifest(tiny_repository_entry)
    assert MANIFEST_KEYS <= manifest.keys()
    assert manifest["name"] == "tiny" and manifest["version"] == "1" and manifest["precision"] == "fp32"
    assert manifest["signature_version"] == sig.SIGNATURE_VERSION
    assert manifest["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert manifest["export_seconds"] > 0
    assert {"torch", "onnx"} <= manifest["library_versions"].keys()


def test_manifest_records_the_declared_signature(tiny_repository_entry: Path) -> None:
    manifest = read_manifest(tiny_repository_entry)
    cfg = manifest["model_config"]
    args = (cfg["decoder_layers"], cfg["heads"], cfg["d_model"] // cfg["heads"])
    graphs = manifest["graphs"]
    assert graphs["encoder"] == {"file": "encoder.onnx", **sig.encoder_signature(*args).to_dict()}
    assert graphs["decoder"] == {"file": "decoder.onnx", **sig.decoder_signature(*args).to_dict()}


def test_manifest_hashes_every_file(tiny_repository_entry: Path) -> None:
    files = read_manifest(tiny_repository_entry)["files"]
    assert set(files) == {"encoder.onnx", "decoder.onnx", "tokenizer.json"}
    for name, digest in files.items():
        assert sha256_of(tiny_repository_entry / name) == digest
    assert verify_files(tiny_repository_entry) == []


def test_a_changed_file_no_longer_matches_its_hash(tiny_repository_entry: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repository_entry, copy)
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    (copy / "stray.txt").write_text("x")
    assert verify_files(copy) == [
        "file 'stray.txt' not in manifest",
        "file 'tokenizer.json' sha256 differs from manifest",
    ]


def test_graphs_declare_exactly_the_signature(tiny_repository_entry: Path) -> None:
    import onnxruntime as ort

    cfg = read_manifest(tiny_repository_entry)["model_config"]
    args = (cfg["decoder_layers"], cfg["heads"], cfg["d_model"] // cfg["heads"])
    for file, spec in (("encoder.onnx", sig.encoder_signature(*args)), ("decoder.onnx", sig.decoder_signature(*args))):
        sig.check_onnx(file, spec, tiny_repository_entry / file)
        session = ort.InferenceSession(str(tiny_repository_entry / file), providers=["CPUExecutionProvider"])
        sig.check_session(file, spec, session)
        inputs, _ = sig.specs_from_onnx(tiny_repository_entry / file)
        assert [t.name for t in inputs] == spec.input_names()


def test_export_cli_registers_without_importing_torch_or_onnx() -> None:
    code = (
        "import argparse, sys, export.cli\n"
        "export.cli.register(argparse.ArgumentParser().add_subparsers())\n"
        "print(json.dumps(sorted(m for m in ('torch', 'onnx') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_unknown_precision_is_refused() -> None:
    from export.api import ExportConfig

    with pytest.raises(ValueError, match="precision"):
        ExportConfig(precision="int4")
