"""A model-repository entry as the engine loads it: manifest, hashes and graphs checked first.

An entry folder (`model_repository/NAME/VERSION/`) holds encoder.onnx, decoder.onnx, tokenizer.json
and manifest.json (written by export/). `read_entry` refuses, with a `ModelEntryError` naming the
problem, any entry whose manifest is incomplete or disagrees with itself, with its folder's
NAME/VERSION, with the signature module or with the tokenizer, any file path that leaves the entry
folder or is not a regular file, and any file whose sha256 differs from the manifest. The graphs
themselves are checked once they are loaded (`check_sessions`): against the signature, and against
the model config's vocab_size and max_positions.

Torch-free: `service.model_config` is a plain-dataclass module.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service import signature as sig
from service.model_config import ModelConfig
from service.tokenizer import TOKENIZER_FILES, AnyTokenizer, load_tokenizer

MANIFEST = "manifest.json"
TOKENIZER_KINDS = tuple(TOKENIZER_FILES)  # manifest "tokenizer"
PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED_KEYS = ("signature_version", "name", "version", "precision", "model_config", "special_ids",
                 "graphs", "files")
CLIP = 120  # longest manifest value or library message quoted in a ModelEntryError


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
    tokenizer: AnyTokenizer

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


def read_entry(path: str | Path, expect_name_version: bool = True) -> ModelEntry:
    """Read and check the entry folder `path` (everything but the graphs' contents).

    Raises ModelEntryError naming the first class of problem found: a missing or malformed manifest,
    a manifest name/version other than the folder's NAME/VERSION (`expect_name_version`), a signature
    version this code does not speak, a model config or special ids that disagree, a file path that
    leaves the entry folder or is not a regular file, a file missing or whose sha256 differs from
    the manifest, graph declarations that differ from the signature the model config implies, or a
    tokenizer that does not fit the model.

    `expect_name_version=False` is for tools that read an entry from a folder of another layout: the
    server serves an entry under its manifest name, so that name must be the one it was asked for.
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
    if expect_name_version:
        _check_name_version(where, path, manifest["name"], manifest["version"])
    if manifest["signature_version"] != sig.SIGNATURE_VERSION:
        raise ModelEntryError(f"{where}: signature_version is {_clip(manifest['signature_version'])}, this engine "
                              f"speaks {sig.SIGNATURE_VERSION}; re-export the model from its checkpoint "
                              "(rosetta export CHECKPOINT --out model_repository/NAME/VERSION)")
    precision = manifest["precision"]
    if precision not in PRECISIONS:
        raise ModelEntryError(f"{where}: precision {_clip(precision)} is not one of {PRECISIONS}")
    try:
        config = ModelConfig.from_dict(dict(manifest["model_config"]))
    except (TypeError, ValueError) as err:
        raise ModelEntryError(f"{where}: model_config is invalid ({_short(str(err))})") from err
    want_ids = {"pad": config.pad_id, "bos": config.bos_id, "eos": config.eos_id, "unk": config.unk_id}
    if manifest["special_ids"] != want_ids:
        raise ModelEntryError(f"{where}: special_ids {_clip(manifest['special_ids'])} differ from model_config's "
                              f"{want_ids}")

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
            raise ModelEntryError(f"{where}: graphs.{graph}.file {_clip(declared['file'])} has no sha256 in the "
                                  "manifest's files")
        files[graph] = _entry_file(where, path, declared["file"])  # checked by _check_files; a Path here
        try:
            sig.check_graph(f"{where}: manifest graphs.{graph}", expected, _specs(declared.get("inputs")),
                            _specs(declared.get("outputs")))
        except (sig.SignatureMismatch, KeyError, TypeError) as err:
            raise ModelEntryError(f"{err}" if isinstance(err, sig.SignatureMismatch)
                                  else f"{where}: manifest graphs.{graph} is malformed ({_clip(err)})") from err
    kind = manifest.get("tokenizer", TOKENIZER_KINDS[0])  # entries from before the key: tokenizer.json
    if kind not in TOKENIZER_KINDS:
        raise ModelEntryError(f"{where}: tokenizer kind {_clip(kind)} is not one of {TOKENIZER_KINDS}")
    names = TOKENIZER_FILES[kind]
    unlisted = [n for n in names if n not in manifest["files"]]
    if unlisted:
        raise ModelEntryError(f"{where}: {', '.join(unlisted)} has no sha256 in the manifest's files")
    tokenizer: AnyTokenizer
    try:
        tokenizer = load_tokenizer(path, kind)
    except Exception as err:  # the tokenizers and sentencepiece libraries raise their own exception types
        raise ModelEntryError(f"{where}: the {kind} tokenizer does not load ({_short(str(err))})") from err
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelEntryError(f"{where}: the {kind} tokenizer has {tokenizer.vocab_size} tokens, "
                              f"model_config.vocab_size is {config.vocab_size}")
    return ModelEntry(path, manifest, config, float_dtype, files["encoder"], files["decoder"], tokenizer)


def check_sessions(entry: ModelEntry, encoder: Any, decoder: Any) -> None:
    """Raise ModelEntryError if a loaded onnxruntime session differs from the signature, or if the
    graphs do not cover the model config's vocab_size and max_positions (`check_tables`)."""
    enc, dec = entry.signatures()
    try:
        sig.check_session(f"model entry {entry.path}: {entry.encoder_file.name}", enc, encoder)
        sig.check_session(f"model entry {entry.path}: {entry.decoder_file.name}", dec, decoder)
    except sig.SignatureMismatch as err:
        raise ModelEntryError(str(err)) from err
    check_tables(entry, encoder, decoder)


def check_tables(entry: ModelEntry, encoder: Any, decoder: Any) -> None:
    """Raise ModelEntryError unless the graphs have exactly model_config.vocab_size tokens and a
    positional table of at least model_config.max_positions rows (the lengths the engine admits).

    The table sizes are initializers that an onnxruntime session does not expose, so the graphs are
    probed: the encoder runs once on a max_positions-long source and once on token vocab_size-1, the
    decoder once at position max_positions-1 and once on token vocab_size-1 with a top-k as wide as
    vocab_size, which must return vocab_size distinct ids. The probes run on CPU, whose Gather/GatherND
    refuse an index past the table; CUDA kernels read past it silently, so sessions on another
    provider are probed through throwaway CPU sessions of the same files. Costs one encoder pass over
    max_positions tokens per load.
    """
    import onnxruntime as ort  # only here: reading a manifest needs no onnxruntime

    where = f"model entry {entry.path}"
    if encoder.get_providers()[0] != "CPUExecutionProvider" or decoder.get_providers()[0] != "CPUExecutionProvider":
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # quicker to create
        cpu = ["CPUExecutionProvider"]
        try:
            encoder = ort.InferenceSession(str(entry.encoder_file), so, providers=cpu)
            decoder = ort.InferenceSession(str(entry.decoder_file), so, providers=cpu)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelEntryError(f"{where}: the graphs do not load on CPU for the vocab/position check "
                                  f"({_short(str(err))})") from err
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # a failing probe is reported below, not logged by onnxruntime too
    _probe_tables(where, entry, encoder, decoder, run_options)


def _probe_tables(where: str, entry: ModelEntry, encoder: Any, decoder: Any, run_options: Any) -> None:
    cfg = entry.config
    enc_name, dec_name = entry.encoder_file.name, entry.decoder_file.name
    positions, last_token = cfg.max_positions, cfg.vocab_size - 1
    kv_dtype = np.float16 if entry.float_dtype == "float16" else np.float32
    cross_names = [o.name for o in encoder.get_outputs()]

    def run(session: Any, feeds: dict[str, np.ndarray], problem: str, outputs: list[str] | None = None
            ) -> list[np.ndarray]:
        try:
            return list(session.run(outputs, feeds, run_options))
        except Exception as err:  # onnxruntime's InvalidArgument / RuntimeException
            raise ModelEntryError(f"{where}: {problem} ({_short(str(err))})") from err

    run(encoder, {sig.SRC_IDS: np.full((1, positions), cfg.eos_id, dtype=np.int64)},
        f"{enc_name} cannot encode a source of model_config.max_positions={positions} tokens: its positional "
        "table is shorter")
    cross = run(encoder, {sig.SRC_IDS: np.array([[last_token]], dtype=np.int64)},
                f"{enc_name} has no embedding for token {last_token}: model_config.vocab_size={cfg.vocab_size} "
                "is larger than its table")
    cache = np.zeros((1, cfg.heads, 1, cfg.head_dim), dtype=kv_dtype)  # (R, H, M=1, Dh)
    feeds: dict[str, np.ndarray] = {
        sig.SELF_MASK: np.ones((1, 1), dtype=np.int32),
        sig.CACHE_SLOT: np.zeros(1, dtype=np.int32),
        sig.BEAM_WIDTH: np.ones(1, dtype=np.int32),
        sig.CACHE_INDIRECTION: np.zeros((1, 1, 1), dtype=np.int32),
        sig.SRC_MASK: np.ones((1, 1), dtype=np.int32),
        sig.TOPK: np.ones(1, dtype=np.int64),
        **dict(zip(cross_names, cross, strict=True)),
        **{n: cache for i in range(cfg.decoder_layers) for n in (sig.past_k(i), sig.past_v(i))},
    }
    run(decoder, {**feeds, sig.INPUT_IDS: np.array([cfg.bos_id], dtype=np.int64),
                  sig.POSITION: np.array([positions - 1], dtype=np.int64)},
        f"{dec_name} cannot decode at position {positions - 1}: its positional table is shorter than "
        f"model_config.max_positions={positions}")
    wide = {sig.TOPK: np.array([cfg.vocab_size], dtype=np.int64)}
    ids = run(decoder, {**feeds, **wide, sig.INPUT_IDS: np.array([last_token], dtype=np.int64),
                        sig.POSITION: np.zeros(1, dtype=np.int64)},
              f"{dec_name} has no embedding for token {last_token} or fewer than {cfg.vocab_size} log-probs per "
              f"row: model_config.vocab_size={cfg.vocab_size} is larger than its tables", [sig.TOPK_IDS])[0]  # (1, V)
    if ids.shape[-1] != cfg.vocab_size or np.unique(ids).size != cfg.vocab_size or ids.max() >= cfg.vocab_size:
        raise ModelEntryError(f"{where}: {dec_name} does not output vocab_size={cfg.vocab_size} log-probs per row")


def _check_name_version(where: str, path: Path, name: object, version: object) -> None:
    """The server serves an entry under its manifest name/version: they must be the folder's NAME/VERSION."""
    folder = Path(os.path.abspath(path))  # "." and trailing slashes named; symlinked folders keep their names
    if str(version) != folder.name or str(name) != folder.parent.name:
        raise ModelEntryError(f"{where}: manifest name/version {_clip(name)}/{_clip(version)} differ from the "
                              f"entry folder's {folder.parent.name}/{folder.name} (model_repository/NAME/VERSION)")


def _entry_file(where: str, root: Path, name: object) -> Path:
    """root / name, after checking that `name` stays inside the entry folder and is a regular file.

    Refused: a name that is not a relative path without '..' (absolute, "../other/1/decoder.onnx"), a
    missing file, anything but a regular file (directory, FIFO, device, a symlink to one), and a
    symlink that resolves outside the entry folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelEntryError(f"{where}: manifest file name {_clip(name)} is not a file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ModelEntryError(f"{where}: manifest file {_clip(name)} leaves the entry folder (absolute or '..'); "
                              "entry files are named relative to it")
    file = root / relative
    try:
        mode = file.stat().st_mode  # follows symlinks: a link to /dev/zero is a character device
    except FileNotFoundError:
        raise ModelEntryError(f"{where}: file {_clip(name)} listed in the manifest is missing") from None
    except OSError as err:
        raise ModelEntryError(f"{where}: file {_clip(name)} cannot be read ({_short(str(err))})") from err
    if not stat.S_ISREG(mode):
        raise ModelEntryError(f"{where}: file {_clip(name)} is not a regular file ({_file_kind(mode)})")
    if not file.resolve().is_relative_to(root.resolve()):
        raise ModelEntryError(f"{where}: file {_clip(name)} resolves outside the entry folder (a symlink?)")
    return file


def _check_files(where: str, path: Path, files: object) -> None:
    if not isinstance(files, dict) or not files:
        raise ModelEntryError(f"{where}: manifest 'files' must map file names to sha256")
    for name, digest in sorted(files.items()):
        file = _entry_file(where, path, name)
        try:
            actual = _sha256_of_regular(file)
        except OSError as err:
            raise ModelEntryError(f"{where}: file {_clip(name)} cannot be read ({_short(str(err))})") from err
        if actual != digest:
            raise ModelEntryError(f"{where}: file {_clip(name)} is corrupted or was replaced: sha256 {actual[:16]}... "
                                  f"differs from the manifest's {str(digest)[:16]}...")


def _sha256_of_regular(path: Path) -> str:
    """sha256_of, refusing (OSError) anything that is not a regular file once opened: a file swapped for
    a FIFO or a device after `_entry_file` looked at it is never read (O_NONBLOCK: opening a FIFO
    does not wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "of another kind"


def _clip(value: object) -> str:
    """repr of a manifest value, cut to CLIP characters: a hostile manifest cannot flood the log."""
    return _short(repr(value))


def _short(text: str) -> str:
    """`text` (e.g. a library's error message) cut to CLIP characters."""
    return text if len(text) <= CLIP else text[: CLIP - 3] + "..."


def _specs(items: object) -> list[sig.TensorSpec]:
    if not isinstance(items, list):
        raise TypeError(f"expected a list of tensors, got {type(items).__name__}")
    return [sig.TensorSpec(str(t["name"]), str(t["dtype"]), tuple(t["dims"])) for t in items]
