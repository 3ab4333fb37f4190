"""A graph whose inputs or outputs differ from service/signature.py is refused, naming the difference."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from export.manifest import read_manifest, write_manifest
from export.ort_graphs import OrtGraphs
from service import signature as sig


def _decoder_signature(entry: Path, float_dtype: str = "float32") -> sig.GraphSignature:
    cfg = read_manifest(entry)["model_config"]
    return sig.decoder_signature(cfg["decoder_layers"], cfg["heads"], cfg["d_model"] // cfg["heads"], float_dtype)


def _renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    return model


def test_renamed_input_is_rejected_naming_both_names(tiny_repository_entry: Path) -> None:
    model = _renamed(onnx.load(str(tiny_repository_entry / "decoder.onnx")), "cache_indirection", "beam_index")
    with pytest.raises(sig.SignatureMismatch) as err:
        sig.check_onnx("decoder.onnx", _decoder_signature(tiny_repository_entry), model)
    assert "missing input 'cache_indirection'" in str(err.value)
    assert "unexpected input 'beam_index'" in str(err.value)


def test_missing_output_is_rejected(tiny_repository_entry: Path) -> None:
    model = onnx.load(str(tiny_repository_entry / "decoder.onnx"))
    keep = [o for o in model.graph.output if o.name != sig.TOPK_IDS]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    with pytest.raises(sig.SignatureMismatch, match="missing output 'topk_ids'"):
        sig.check_onnx("decoder.onnx", _decoder_signature(tiny_repository_entry), model)


def test_wrong_dtype_and_pinned_dynamic_axis_are_named(tiny_repository_entry: Path) -> None:
    model = onnx.load(str(tiny_repository_entry / "decoder.onnx"))
    past = next(v for v in model.graph.input if v.name == sig.past_k(0))
    past.type.tensor_type.shape.dim[2].Clear()
    past.type.tensor_type.shape.dim[2].dim_value = 7
    with pytest.raises(sig.SignatureMismatch) as err:
        sig.check_onnx("decoder.onnx", _decoder_signature(tiny_repository_entry, "float16"), model)
    text = str(err.value)
    assert "input 'past_k.0' has dtype float32, expected float16" in text
    assert "input 'past_k.0' axis 2 is fixed to 7, expected dynamic 'max_len'" in text


def test_loading_an_entry_with_a_foreign_decoder_fails_before_any_step(
        tiny_repository_entry: Path, tmp_path: Path) -> None:
    entry = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repository_entry, entry)
    model = _renamed(onnx.load(str(entry / "decoder.onnx")), "eos_log_probs", "eos_scores")
    onnx.save(model, str(entry / "decoder.onnx"))
    write_manifest(entry, read_manifest(entry))
    with pytest.raises(sig.SignatureMismatch, match="missing output 'eos_log_probs'.*unexpected output 'eos_scores'"):
        OrtGraphs(entry)
