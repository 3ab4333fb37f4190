"""Weights stored as fp16 where fp16 holds them exactly: half the file, the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from export.graphs import store_exact_fp16


def matmul_graph(weight: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, weight.shape[0]])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, weight.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fp16_exact_weights_are_stored_half_size_and_compute_the_same() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float16).astype(np.float32)  # an fp16 checkpoint's values
    x = rng.standard_normal((2, 64)).astype(np.float32)
    before = matmul_graph(weight)
    after = matmul_graph(weight)
    assert store_exact_fp16(after.graph) == 1
    assert after.graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
    assert after.ByteSize() < 0.6 * before.ByteSize()
    onnx.checker.check_model(after)
    np.testing.assert_array_equal(run(after, x), run(before, x))  # bit for bit


def test_weights_fp16_cannot_hold_stay_float32() -> None:
    weight = np.full((64, 32), 0.1, dtype=np.float32)  # 0.1 is not an fp16 value
    model = matmul_graph(weight)
    assert store_exact_fp16(model.graph) == 0
    assert model.graph.initializer[0].data_type == onnx.TensorProto.FLOAT


def test_shipped_entries_store_their_weights_as_fp16() -> None:
    """The fp16 checkpoint's weights are fp16 in both shipped entries; what stays float32 is computed, not
    trained (the sinusoidal position table, 512 x 256), or quantization's scales."""
    root = Path(__file__).resolve().parents[2] / "models" / "model_repository"
    for entry in ("de-en/1", "de-en-int8/1"):
        for graph_file in ("encoder.onnx", "decoder.onnx"):
            graph = onnx.load(str(root / entry / graph_file), load_external_data=False).graph
            float32 = [int(np.prod(t.dims)) for t in graph.initializer
                       if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= 1024]
            assert float32 in ([], [512 * 256]), (entry, graph_file, float32)
