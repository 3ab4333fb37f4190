"""The int8 variant: ONNX Runtime dynamic quantization of the fp32 graphs (for CPU serving).

Weights of every MatMul become int8 (per output channel); activations are quantized to uint8 on
the fly per call (DynamicQuantizeLinear), so no calibration data is needed. Inputs and outputs
keep the fp32 signature: the engine treats an int8 entry exactly like an fp32 one.

Two properties the engine must know (measured, see export/README.md):
- `reduce_range` (7-bit weights) is on in the "avx2" form, the default: without VNNI, x86 multiplies
  u8 x s8 pairs into int16 with saturation, and on our models full-range weights flipped the argmax of
  many steps. The "vnni" form keeps full-range weights for CPUs with VNNI or AMX (service/engine/cpu.py).
- The activation scale is per tensor, i.e. over the whole batch: an int8 graph's log-probs for
  a sentence depend slightly on the other sentences and the padding in its batch. Padding
  invariance holds only approximately; token-exact agreement with the fp32 oracle is not expected.

The output projection is exported as `Gemm(x, E, transB=1)` over the (tied) embedding matrix E,
and dynamic quantization only handles MatMul; `gemm_to_matmul` rewrites it as MatMul(x, E^T)
first, since that projection is about a quarter of a decoder step on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from service.engine.cpu import INT8_FORMS

QUANTIZED_OPS = ("MatMul",)  # "Gather" would also shrink the embedding tables; see README for why not


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == onnx.AttributeProto.FLOAT else a.i
    return default


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite in place each Gemm(A, B[, C]) with constant B, alpha = beta = 1 (or no C) and
    transA = 0 as MatMul(A, B or B^T) [+ Add C]. Returns how many nodes were rewritten."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        has_c = len(node.input) > 2 and node.input[2] != ""
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "transA", 0) != 0 or (
                has_c and _attr(node, "beta", 1.0) != 1.0):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if _attr(node, "transB", 0):
            weight = np.ascontiguousarray(weight.T)
        w_name = node.input[1] + ".matmul"
        graph.initializer.append(numpy_helper.from_array(weight, w_name))
        out = node.output[0]
        mm_out = out + ".matmul" if has_c else out
        new = [onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=(node.name or out) + "_matmul")]
        if has_c:
            new.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [out], name=(node.name or out) + "_bias"))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(position + offset, n)
        rewritten += 1
    # Drop initializers nothing reads any more (the untransposed weight if it was only the Gemm's).
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return rewritten


def quantize_int8(src: Path, dst: Path, per_channel: bool = True, form: str = "avx2") -> None:
    """Dynamic int8 quantization of the graph at `src` into `dst` (may be the same path), in `form`:
    "avx2" (reduce_range, 7-bit weights: u8 x s8 pair sums cannot saturate int16, right on any x86) or
    "vnni" (full-range 8-bit weights, for CPUs with VNNI or AMX; see service/engine/cpu.py)."""
    if form not in INT8_FORMS:
        raise ValueError(f"int8 form must be one of {INT8_FORMS}, got {form!r}")
    reduce_range = form == "avx2"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    gemm_to_matmul(model)
    with tempfile.TemporaryDirectory(prefix="rosetta-int8-") as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(model, str(prepared))
        quantize_dynamic(prepared, Path(tmp) / "quantized.onnx", op_types_to_quantize=list(QUANTIZED_OPS),
                         per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         # ONNX shape inference types nothing after a com.microsoft attention node; the
                         # tensors there are float32 (the int8 variant is made from the fp32 graphs)
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        Path(dst).write_bytes((Path(tmp) / "quantized.onnx").read_bytes())


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer logs one INFO line per node on the root logger; keep that out of the CLI."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)
