"""A model-repository entry as the engine loads it: manifest, hashes and graphs checked first.

An entry folder (`model_repository/NAME/VERSION/`) holds encoder.onnx, decoder.onnx, tokenizer.json
and manifest.json (written by export/). `read_entry` refuses, with a `ModelEntryError` naming the
problem, any entry whose manifest is incomplete or disagrees with itself, with the signature module
or with the tokenizer, and any file whose sha256 differs from the manifest. The graphs themselves
are checked against the signature once they are loaded (`check_sessions`).

Torch-free: `model.config` is a plain-dataclass module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from service import signature as sig
from service.tokenizer import Tokenizer

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED_KEYS = ("signature_version", "name", "version", "precision", "model_config", "special_ids",
                 "graphs", "files")


class ModelEntryError(ValueError):
    """A model-repository entry cannot be served; the message names the entry and what is wrong."""


@dataclass(frozen=True)
class ModelEntry:
    """A checked entry: everything the engine needs to open its sessions."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    float_dtype: str  # "float32" or "float16": element type of the K/V tensors of both graphs
    encoder_file: Path
    decoder_file: Path
    tokenizer: Tokenizer

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    def signatures(self) -> tuple[sig.GraphSignature, sig.GraphSignature]:
        """(encoder, decoder) signatures this entry's graphs must have."""
        c = self.config
        args = (c.decoder_layers, c.heads, c.head_dim, self.float_dtype)
        return sig.encoder_signature(*args), sig.decoder_signature(*args)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_entry(path: str | Path) -> ModelEntry:
    """Read and check the entry folder `path` (everything but the graphs' contents).

    Raises ModelEntryError naming the first class of problem found: a missing or malformed manifest,
    a signature version this code does not speak, a model config or special ids that disagree, a
    file missing or whose sha256 differs from the manifest, graph declarations that differ from
    the signature the model config implies, or a tokenizer that does not fit the model.
    """
    path = Path(path)
    where = f"model entry {path}"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelEntryError(f"{where}: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelEntryError(f"{where}: {MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ModelEntryError(f"{where}: {MANIFEST} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelEntryError(f"{where}: {MANIFEST} lacks keys {missing}")
    if manifest["signature_version"] != sig.SIGNATURE_VERSION:
        raise ModelEntryError(f"{where}: signature_version is {manifest['signature_version']!r}, this engine "
                              f"speaks {sig.SIGNATURE_VERSION}; re-export the model")
    precision = manifest["precision"]
    if precision not in PRECISIONS:
        raise ModelEntryError(f"{where}: precision {precision!r} is not one of {PRECISIONS}")
    try:
        config = ModelConfig.from_dict(dict(manifest["model_config"]))
    except (TypeError, ValueError) as err:
        raise ModelEntryError(f"{where}: model_config is invalid ({err})") from err
    want_ids = {"pad": config.pad_id, "bos": config.bos_id, "eos": config.eos_id, "unk": config.unk_id}
    if manifest["special_ids"] != want_ids:
        raise ModelEntryError(f"{where}: special_ids {manifest['special_ids']} differ from model_config's {want_ids}")

    _check_files(where, path, manifest["files"])
    graphs = manifest["graphs"]
    float_dtype = "float16" if precision == "fp16" else "float32"
    files: dict[str, Path] = {}
    args = (config.decoder_layers, config.heads, config.head_dim, float_dtype)
    for graph, expected in (("encoder", sig.encoder_signature(*args)), ("decoder", sig.decoder_signature(*args))):
        declared = graphs.get(graph) if isinstance(graphs, dict) else None
        if not isinstance(declared, dict) or "file" not in declared:
            raise ModelEntryError(f"{where}: manifest graphs.{graph} is missing or has no 'file'")
        if declared["file"] not in manifest["files"]:
            raise ModelEntryError(f"{where}: {declared['file']} has no sha256 in the manifest's files")
        files[graph] = path / declared["file"]
        try:
            sig.check_graph(f"{where}: manifest graphs.{graph}", expected, _specs(declared.get("inputs")),
                            _specs(declared.get("outputs")))
        except (sig.SignatureMismatch, KeyError, TypeError) as err:
            raise ModelEntryError(f"{err}" if isinstance(err, sig.SignatureMismatch)
                                  else f"{where}: manifest graphs.{graph} is malformed ({err!r})") from err
    if TOKENIZER not in manifest["files"]:
        raise ModelEntryError(f"{where}: {TOKENIZER} has no sha256 in the manifest's files")
    try:
        tokenizer = Tokenizer.load(path / TOKENIZER)
    except Exception as err:  # the tokenizers library raises its own exception types
        raise ModelEntryError(f"{where}: {TOKENIZER} does not load ({err})") from err
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelEntryError(f"{where}: {TOKENIZER} has {tokenizer.vocab_size} tokens, model_config.vocab_size "
                              f"is {config.vocab_size}")
    return ModelEntry(path, manifest, config, float_dtype, files["encoder"], files["decoder"], tokenizer)


def check_sessions(entry: ModelEntry, encoder: object, decoder: object) -> None:
    """Raise ModelEntryError if a loaded onnxruntime session differs from the signature."""
    enc, dec = entry.signatures()
    try:
        sig.check_session(f"model entry {entry.path}: {entry.encoder_file.name}", enc, encoder)
        sig.check_session(f"model entry {entry.path}: {entry.decoder_file.name}", dec, decoder)
    except sig.SignatureMismatch as err:
        raise ModelEntryError(str(err)) from err


def _check_files(where: str, path: Path, files: object) -> None:
    if not isinstance(files, dict) or not files:
        raise ModelEntryError(f"{where}: manifest 'files' must map file names to sha256")
    for name, digest in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise ModelEntryError(f"{where}: file {name!r} listed in the manifest is missing")
        actual = sha256_of(file)
        if actual != digest:
            raise ModelEntryError(f"{where}: file {name!r} is corrupted or was replaced: sha256 {actual[:16]}... "
                                  f"differs from the manifest's {str(digest)[:16]}...")


def _specs(items: object) -> list[sig.TensorSpec]:
    if not isinstance(items, list):
        raise TypeError(f"expected a list of tensors, got {type(items).__name__}")
    return [sig.TensorSpec(str(t["name"]), str(t["dtype"]), tuple(t["dims"])) for t in items]
