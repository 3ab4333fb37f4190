"""manifest.json of a model-repository entry: what the engine checks before it loads the graphs.

Torch-free. Keys (the engine relies on these exact names):
    signature_version  service.signature.SIGNATURE_VERSION the graphs were built against
    name, version      the entry's name and version (model_repository/NAME/VERSION)
    precision          "fp32" | "fp16" | "int8"
    source_lang, target_lang
    opset              ONNX opset of both graphs
    model_config       ModelConfig.to_dict()
    special_ids        {"pad", "bos", "eos", "unk"}
    graphs             {"encoder": {"file": "encoder.onnx", "inputs": [...], "outputs": [...]},
                        "decoder": {"file": "decoder.onnx", ...}}  (GraphSignature.to_dict())
    files              {filename: sha256 hex} of every file of the entry except manifest.json
    library_versions   {"torch", "onnx", "onnxruntime", ...} used for the export
    quality            measured quality, e.g. {"test_2016_flickr": {"bleu": 36.1, "signature": "..."},
                        "vs_fp32": {"bleu_delta": -0.2, ...}}; {} when not measured
    export_seconds     wall time of the whole export (tracing, variant conversion, check, evaluation)
    timings            {"trace_seconds", "write_seconds", "check_seconds", "evaluate_seconds",
                        "cpu_seconds"}: where that time went (wall, cumulative for write; CPU of the process)
    parity             the parity report (export/parity.py) when exported with --check
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
PRECISIONS = ("fp32", "fp16", "int8")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(entry: Path) -> dict[str, str]:
    """sha256 of every file in the entry folder except the manifest, by file name (sorted)."""
    return {p.name: sha256_of(p) for p in sorted(Path(entry).iterdir()) if p.is_file() and p.name != MANIFEST}


def library_versions(names: tuple[str, ...] = ("torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime",
                                               "numpy", "tokenizers")) -> dict[str, str]:
    """Installed versions of the export toolchain (absent packages are left out)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def read_manifest(entry: Path) -> dict[str, Any]:
    return dict(json.loads((Path(entry) / MANIFEST).read_text()))


def write_manifest(entry: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` with `files` recomputed from the folder; returns the manifest path."""
    manifest = {**manifest, "files": file_hashes(entry)}
    path = Path(entry) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify_files(entry: Path) -> list[str]:
    """Problems with the entry's files against its manifest (missing, extra, hash mismatch); [] if none."""
    manifest = read_manifest(entry)
    want: dict[str, str] = manifest.get("files", {})
    got = file_hashes(Path(entry))
    problems = [f"missing file {n!r}" for n in sorted(want.keys() - got.keys())]
    problems += [f"file {n!r} not in manifest" for n in sorted(got.keys() - want.keys())]
    problems += [f"file {n!r} sha256 differs from manifest" for n in sorted(want.keys() & got.keys())
                 if want[n] != got[n]]
    return problems
