"""An entry's manifest is not trusted: file paths stay inside the entry folder and name regular files,
name/version match the folder, and the graphs cover model_config's vocab_size and max_positions.

Each test copies the tiny entry to tmp_path/model_repository/tiny/1 and breaks one thing in the copy
(updating the sha256 in `files` where needed, so that only the intended check can fail).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from service.engine import Engine, EngineConfig
from service.engine.entry import CLIP, ModelEntryError, check_sessions, read_entry, sha256_of

CPU1 = EngineConfig(provider="cpu", intra_op_threads=1, parallel_batches=1)


@pytest.fixture()
def entry(tiny_entry: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny entry, laid out as model_repository/tiny/1."""
    return Path(shutil.copytree(tiny_entry, tmp_path / "model_repository" / "tiny" / "1"))


def edit_manifest(entry: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = entry / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def serve_decoder_from(entry: Path, name: str) -> None:
    """Point graphs.decoder.file at `name`, listed in `files` with the sha256 of the entry's own decoder."""
    digest = sha256_of(entry / "decoder.onnx")

    def change(m: dict[str, Any]) -> None:
        m["files"][name] = digest
        m["graphs"]["decoder"]["file"] = name

    edit_manifest(entry, change)


# -- file paths ------------------------------------------------------------------------------------------


def test_file_path_with_dotdot_leaving_the_entry_is_refused(entry: Path) -> None:
    other = entry.parent.parent / "other" / "1"
    other.mkdir(parents=True)
    shutil.copyfile(entry / "decoder.onnx", other / "decoder.onnx")  # another entry's graph, same sha256
    serve_decoder_from(entry, "../../other/1/decoder.onnx")
    with pytest.raises(ModelEntryError, match=r"model entry .*/tiny/1: manifest file '../../other/1/decoder.onnx' "
                                              r"leaves the entry folder"):
        read_entry(entry)


def test_absolute_file_path_is_refused(entry: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(entry / "decoder.onnx", outside)
    serve_decoder_from(entry, str(outside))
    with pytest.raises(ModelEntryError, match=r"manifest file '/.*outside.onnx' leaves the entry folder"):
        read_entry(entry)


def test_symlink_to_a_file_outside_the_entry_is_refused(entry: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "decoder.onnx"
    outside.parent.mkdir()
    shutil.move(entry / "decoder.onnx", outside)  # same bytes: the sha256 in the manifest still matches
    (entry / "decoder.onnx").symlink_to(outside)
    with pytest.raises(ModelEntryError, match=r"file 'decoder.onnx' resolves outside the entry folder"):
        read_entry(entry)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_symlink_to_a_device_is_refused_as_not_a_regular_file(entry: Path) -> None:
    (entry / "decoder.onnx").unlink()
    (entry / "decoder.onnx").symlink_to("/dev/zero")  # hashing it would never end
    with pytest.raises(ModelEntryError, match=r"file 'decoder.onnx' is not a regular file \(a character device\)"):
        read_entry(entry)


@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_fifo_or_directory_listed_as_a_file_is_refused(entry: Path, kind: str) -> None:
    if kind == "FIFO":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(entry / "extra")  # opening it to hash it would wait for a writer forever
    else:
        (entry / "extra").mkdir()
    edit_manifest(entry, lambda m: m["files"].update(extra="0" * 64))
    with pytest.raises(ModelEntryError, match=rf"file 'extra' is not a regular file \(a {kind}\)"):
        read_entry(entry)


def test_symlink_to_a_file_inside_the_entry_is_accepted(entry: Path) -> None:
    (entry / "tokenizer.json").rename(entry / "tokenizer.real.json")
    (entry / "tokenizer.json").symlink_to("tokenizer.real.json")
    assert read_entry(entry).tokenizer.vocab_size == 300


# -- name and version --------------------------------------------------------------------------------------


def test_manifest_name_other_than_the_folder_is_refused(entry: Path) -> None:
    edit_manifest(entry, lambda m: m.update(name="de-en"))
    with pytest.raises(ModelEntryError, match=r"manifest name/version 'de-en'/'1' differ from the entry folder's "
                                              r"tiny/1"):
        Engine.load(entry, CPU1)


def test_manifest_version_other_than_the_folder_is_refused(entry: Path) -> None:
    edit_manifest(entry, lambda m: m.update(version="2"))
    with pytest.raises(ModelEntryError, match=r"manifest name/version 'tiny'/'2' differ from the entry folder's "
                                              r"tiny/1"):
        read_entry(entry)


def test_numeric_manifest_version_matches_its_folder(entry: Path) -> None:
    edit_manifest(entry, lambda m: m.update(version=1))
    assert read_entry(entry).version == "1"


def test_entry_in_a_folder_of_another_layout_loads_only_when_the_caller_says_so(entry: Path, tmp_path: Path) -> None:
    scratch = Path(shutil.copytree(entry, tmp_path / "scratch"))
    with pytest.raises(ModelEntryError, match=r"differ from the entry folder's .*/scratch"):
        read_entry(scratch)
    assert read_entry(scratch, expect_name_version=False).name == "tiny"


# -- the graphs against model_config -------------------------------------------------------------------


def test_max_positions_beyond_the_graphs_positional_table_is_refused(entry: Path) -> None:
    edit_manifest(entry, lambda m: m["model_config"].update(max_positions=600))  # the graphs' tables have 256
    with pytest.raises(ModelEntryError, match=r"model entry .*/tiny/1: encoder.onnx cannot encode a source of "
                                              r"model_config.max_positions=600 tokens: its positional table"):
        Engine.load(entry, CPU1)


def test_vocab_size_beyond_the_graphs_vocabulary_is_refused(entry: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(entry / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])  # 310 tokens: the tokenizer check passes
    tok.save(str(entry / "tokenizer.json"))
    digest = sha256_of(entry / "tokenizer.json")

    def change(m: dict[str, Any]) -> None:
        m["model_config"]["vocab_size"] = 310
        m["files"]["tokenizer.json"] = digest

    edit_manifest(entry, change)
    # onnxruntime reports the log_probs width it inferred (300); if it did not, the probe of token 309 fails.
    with pytest.raises(ModelEntryError, match=r"decoder.onnx outputs 300 log-probs per row, model_config.vocab_size "
                                              r"is 310|encoder.onnx has no embedding for token 309"):
        Engine.load(entry, CPU1)


class ReportsCuda:
    """A CPU session that claims to run on CUDA, whose kernels do not bounds-check gathers."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def test_sessions_on_another_provider_are_probed_on_cpu(entry: Path) -> None:
    edit_manifest(entry, lambda m: m["model_config"].update(max_positions=600))
    checked = read_entry(entry)
    encoder, decoder = (ReportsCuda(ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]))
                        for f in (checked.encoder_file, checked.decoder_file))
    with pytest.raises(ModelEntryError, match=r"encoder.onnx cannot encode a source of model_config.max_positions=600"):
        check_sessions(checked, encoder, decoder)


# -- messages ----------------------------------------------------------------------------------------------


def test_refusal_messages_stay_bounded(entry: Path) -> None:
    edit_manifest(entry, lambda m: m.update(name="x" * 100_000))
    with pytest.raises(ModelEntryError) as err:
        read_entry(entry)
    message = str(err.value)
    assert message.startswith(f"model entry {entry}: manifest name/version 'xxx")
    assert len(message) < len(str(entry)) + 2 * CLIP + 200
