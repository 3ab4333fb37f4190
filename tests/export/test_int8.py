"""The int8 variant: made by the CLI with --check, loads in ONNX Runtime and decodes."""

from __future__ import annotations

from pathlib import Path

import onnx

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
