"""PyTorch -> ONNX: the encoder graph and the one-step decoder graph of `service.signature`.

Shapes follow the legend of `model.config` (B batch, K beams, R = B*K rows, S source length,
H heads, Dh head dim, V vocab, L decoder layers).

encoder.onnx    src_ids (B, S) -> cross_k.i / cross_v.i (B, H, S, Dh) for every decoder layer.
                The cross-attention keys/values are computed once per source, never per step.
                Traced with `torch.onnx.export(dynamo=True)` (torch.export); `finalize_graph`
                renames every input/output dim to the signature's symbolic names and checks it.
decoder.onnx    one step for all live rows on an in-place K/V cache (signature v2): built node by
                node from the weights by export/step_graph.py, whose docstring has the design.

When sentences finish, the caller gathers the surviving sentences' cross K/V and src_mask itself
(once per finishing event, not per step). K/V tensors are float16 in the fp16 variant; the
log-probs are float32 in every precision.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from model.transformer import Transformer
from service import signature as sig

log = logging.getLogger(__name__)

OPSET = 18  # ONNX opset of the exported graphs (ORT >= 1.14 runs it)
# Example sizes for tracing: all >= 2 so torch.export does not specialise a dim to 0 or 1.
_B, _S = 2, 7


class EncoderGraph(nn.Module):
    """src_ids (B, S) -> (cross_k.0, cross_v.0, cross_k.1, ...) each (B, H, S, Dh)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor) -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        for k, v in self.model.cross_kv(self.model.encode(src_ids)):
            out += [k, v]
        return tuple(out)


def signatures(model: Transformer, float_dtype: str) -> tuple[sig.GraphSignature, sig.GraphSignature]:
    """(encoder, decoder) signatures of `model` with K/V in `float_dtype`."""
    cfg = model.cfg
    args = (cfg.decoder_layers, cfg.heads, cfg.head_dim, float_dtype)
    return sig.encoder_signature(*args), sig.decoder_signature(*args)


def _dynamic_shapes(spec: sig.GraphSignature, dims: dict[str, Any]) -> list[dict[int, Any] | None]:
    """torch.export dynamic shapes, per input in signature order, from the symbolic dims."""
    out: list[dict[int, Any] | None] = []
    for t in spec.inputs:
        axes = {a: dims[d] for a, d in enumerate(t.dims) if isinstance(d, str) and d in dims}
        out.append(axes or None)
    return out


# Loggers of the export toolchain that report every pass at INFO; kept at WARNING while tracing.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


def _export(module: nn.Module, args: tuple[Tensor, ...], spec: sig.GraphSignature,
            dynamic_shapes: Any, optimize: bool) -> onnx.ModelProto:
    if any(m.training for m in module.modules()):
        raise ValueError("export needs the model in eval mode (dropout would be traced): call model.eval()")
    saved = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    try:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            # "The axis name: past_len will not be used, since it shares the same shape constraints
            # with another axis": expected, finalize_graph names every axis from the signature.
            warnings.filterwarnings("ignore", message=r".*The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)  # torch-internal
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=OPSET, input_names=spec.input_names(),
                output_names=spec.output_names(), dynamic_shapes=dynamic_shapes, verbose=False, optimize=optimize,
            )
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    assert program is not None
    return program.model_proto


def export_encoder(model: Transformer, float_dtype: str = "float32", optimize: bool = True) -> onnx.ModelProto:
    """The encoder graph of `model` (eval mode, on CPU, in the dtype of its weights).

    `optimize` runs the exporter's graph optimiser (constant folding, common-subexpression and
    dead-code elimination): about half the nodes; see export/README.md for what it measures.
    """
    from torch.export import Dim

    enc_spec, _ = signatures(model, float_dtype)
    dims = {"batch": Dim("batch", min=1, max=65536), "src_len": Dim("src_len", min=1, max=model.cfg.max_positions)}
    src = torch.randint(4, model.cfg.vocab_size, (_B, _S))
    src[1, -2:] = model.cfg.pad_id
    proto = _export(EncoderGraph(model).eval(), (src,), enc_spec, tuple(_dynamic_shapes(enc_spec, dims)), optimize)
    return finalize_graph(proto, enc_spec)


def export_decoder(model: Transformer, float_dtype: str = "float32", optimize: bool = True) -> onnx.ModelProto:
    """The one-step decoder graph of `model` (signature v2): built from its weights by
    export/step_graph.py, not traced (`optimize` is the encoder's; the step graph is already minimal)."""
    from export.step_graph import build_decoder

    del optimize
    return build_decoder(model, float_dtype)


def finalize_graph(proto: onnx.ModelProto, spec: sig.GraphSignature) -> onnx.ModelProto:
    """Make a traced graph declare exactly `spec`: every input/output dim that the signature
    declares symbolic gets the signature's name (the exporter writes expressions or numbers).
    Raises SignatureMismatch if the graph still differs from `spec`.
    """
    graph = proto.graph
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(graph.input) + list(graph.output):
        want = by_name.get(value.name)
        if want is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(want.dims):
            continue  # check_onnx below names the rank mismatch
        for d, w in zip(dims, want.dims, strict=True):
            if isinstance(w, str):
                d.Clear()
                d.dim_param = w
    fold_constant_concats(graph)
    # Intermediate shapes inferred by the exporter may name the old dims; drop them (ORT re-infers).
    del graph.value_info[:]
    sig.check_onnx("graph", spec, proto)
    return proto


def fold_constant_concats(graph: onnx.GraphProto) -> int:
    """Replace every Concat of initializers with one initializer; returns how many were folded.

    The decoder's fused q/k/v projection concatenates three weight matrices at run time in
    PyTorch (`MultiHeadAttention.project_qkv_one`); the exporter leaves that Concat in the graph
    (it does not fold large constants). Folded here, the GEMM reads one (3D, D) weight, which is
    also what int8 quantization needs (it only quantizes constant weights). Inputs nothing else
    reads are dropped, so the file holds each weight once.
    """
    inits = {t.name: t for t in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Concat" or not node.input or not all(i in inits for i in node.input):
            continue
        axis = int(next(a.i for a in node.attribute if a.name == "axis"))
        value = np.concatenate([numpy_helper.to_array(inits[i]) for i in node.input], axis=axis)
        graph.node.remove(node)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        inits[node.output[0]] = graph.initializer[-1]
        for name in set(node.input):
            _drop_if_unused(graph, name)
        folded += 1
    return folded


def _drop_if_unused(graph: onnx.GraphProto, name: str) -> None:
    """Remove the initializer or Constant node producing `name` if nothing reads it any more."""
    if any(name in n.input for n in graph.node) or any(o.name == name for o in graph.output):
        return
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            del graph.initializer[i]
            return
    for i, n in enumerate(graph.node):
        if n.op_type == "Constant" and name in n.output:
            del graph.node[i]
            return


def store_exact_fp16(graph: onnx.GraphProto, min_elements: int = 1024) -> int:
    """Store every float32 initializer whose values fp16 holds exactly as fp16, read through a Cast.

    Checkpoints ship in fp16 (models/de-en), so their fp32 graphs hold fp16 values widened: stored as
    fp16 the file is half the size and the graph computes bit for bit the same (ONNX Runtime folds the
    Cast of an initializer when it loads the session, so nothing is cast per call). Initializers under
    `min_elements` (biases, norms) stay as they are. Returns how many were converted.
    """
    converted = 0
    casts: list[onnx.NodeProto] = []
    for i, t in enumerate(list(graph.initializer)):
        if t.data_type != onnx.TensorProto.FLOAT or int(np.prod(t.dims)) < min_elements:
            continue
        value = numpy_helper.to_array(t)
        half = value.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), value):
            continue
        name = t.name  # `t` is the message CopyFrom overwrites
        stored = numpy_helper.from_array(half, f"{name}.fp16")
        graph.initializer[i].CopyFrom(stored)
        casts.append(onnx.helper.make_node("Cast", [stored.name], [name], to=onnx.TensorProto.FLOAT,
                                           name=f"{name}.widen"))
        converted += 1
    for node in reversed(casts):
        graph.node.insert(0, node)
    return converted
