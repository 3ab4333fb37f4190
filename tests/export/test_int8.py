"""The int8 variant: made by the CLI with --check, loads in ONNX Runtime and decodes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
import pytest

from export.manifest import read_manifest, verify_files
from export.ort_graphs import OrtGraphs, greedy_decode
from export.parity import source_ids


def test_int8_entry_records_its_precision_and_passed_check(tiny_int8_entry: Path) -> None:
    manifest = read_manifest(tiny_int8_entry)
    assert manifest["precision"] == "int8" and manifest["name"] == "tiny-int8"
    assert manifest["parity"]["failures"] == []
    assert verify_files(tiny_int8_entry) == []


def test_int8_graphs_hold_quantized_matmuls(tiny_int8_entry: Path) -> None:
    ops = {n.op_type for n in onnx.load(str(tiny_int8_entry / "decoder.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops or "DynamicQuantizeMatMul" in ops
    assert "Gemm" not in ops  # the output projection was rewritten as a quantizable MatMul


def test_every_weight_matmul_of_the_int8_decoder_is_quantized(tiny_int8_entry: Path) -> None:
    """No float GEMM on a constant weight is left, the fused q/k/v projection included."""
    graph = onnx.load(str(tiny_int8_entry / "decoder.onnx")).graph
    weights = {t.name for t in graph.initializer}
    float_gemms = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert float_gemms == []


def test_decoder_projects_q_k_v_with_one_constant_weight_per_layer(tiny_repository_entry: Path) -> None:
    graph = onnx.load(str(tiny_repository_entry / "decoder.onnx")).graph
    weights = {t.name: t for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Concat" and all(i in weights for i in n.input)]
    manifest = read_manifest(tiny_repository_entry)
    d, layers = manifest["model_config"]["d_model"], manifest["model_config"]["decoder_layers"]
    fused = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights
             and 3 * d in weights[n.input[1]].dims]
    assert len(fused) == layers


def test_int8_entry_loads_and_decodes_like_fp32(tiny_int8_entry: Path, tiny_repository_entry: Path,
                                                tiny_model) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny_model
    sources = source_ids(tok, model.cfg.eos_id)
    int8 = greedy_decode(OrtGraphs(tiny_int8_entry), sources, max_len=20)
    fp32 = greedy_decode(OrtGraphs(tiny_repository_entry), sources, max_len=20)
    assert all(len(t) > 0 for t in int8)
    same = sum(a == b for x, y in zip(int8, fp32, strict=True) for a, b in zip(x, y, strict=False))
    total = sum(min(len(x), len(y)) for x, y in zip(int8, fp32, strict=True))
    assert same / total > 0.5


# -- the int8 form right for the machine ------------------------------------------------------------------


def test_default_int8_form_is_the_reduce_range_one_safe_anywhere(tiny_int8_entry: Path) -> None:
    from service.engine import Engine, EngineConfig

    assert read_manifest(tiny_int8_entry)["int8_form"] == "avx2"
    assert Engine.load(tiny_int8_entry, EngineConfig(provider="cpu")).int8_form == "avx2"


def test_vnni_form_keeps_full_range_weights_and_the_engine_says_so(
        tmp_path: Path, tiny_checkpoint: Path, caplog: Any) -> None:
    from onnx import numpy_helper

    from service.cli import main
    from service.engine import Engine, EngineConfig
    from service.engine.cpu import int8_dot_product

    out = tmp_path / "tiny-int8-vnni" / "1"
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--precision", "int8",
                 "--int8-form", "vnni"]) == 0
    assert read_manifest(out)["int8_form"] == "vnni"
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(out / "decoder.onnx")).graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    assert max(int(abs(w.astype(int)).max()) for w in weights) > 64  # 8-bit range used; reduce-range stays <= 64
    with caplog.at_level(logging.INFO, logger="service.engine.engine"):
        engine = Engine.load(out, EngineConfig(provider="cpu"))
    assert engine.int8_form == "vnni"
    said = [r for r in caplog.records if "int8 form vnni" in r.getMessage()]
    assert said and said[0].levelno == (logging.INFO if int8_dot_product() else logging.WARNING)


def test_unknown_int8_form_is_refused() -> None:
    from export.config import ExportConfig

    with pytest.raises(ValueError, match="int8_form"):
        ExportConfig(precision="int8", int8_form="int4")
