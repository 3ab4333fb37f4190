"""PyTorch -> ONNX: the encoder graph and the one-step decoder graph of `service.signature`.

Shapes follow the legend of `model.config` (B batch, K beams, R = B*K rows, S source length,
Tp past length, H heads, Dh head dim, V vocab, L decoder layers).

encoder.onnx    src_ids (B, S) -> cross_k.i / cross_v.i (B, H, S, Dh) for every decoder layer.
                The cross-attention keys/values are computed once per source, never per step.
decoder.onnx    one step for all live rows, `Transformer.decode_step` wrapped:
                input_ids (R, 1), position (R,), src_mask (B, S) bool, cache_index (R,),
                topk (1,), cross K/V (B, H, S, Dh), past K/V (R_prev, H, Tp, Dh)
                -> log_probs (R, V) fp32, topk_log_probs / topk_ids (R, k), present K/V (R, H, Tp+1, Dh).

Design choices (the contract the engine codes against):
- Rows of one sentence are consecutive (R = B*K). Cross K/V stay (B, H, S, Dh): the decoder
  reshapes the K query rows of a sentence into K query positions of that sentence's cross
  attention, so cross K/V are never copied per beam (K times less memory and bandwidth).
  When sentences finish, the caller gathers the surviving sentences' cross K/V and src_mask
  itself (one gather per finished sentence, not per step).
- `cache_index` (R,) gathers past K/V inside the graph (row r continues row cache_index[r] of the
  previous step), so beam reordering and dropping finished rows never leave the device.
- The first step feeds past K/V with past_len 0 (any prev_rows; cache_index must index it,
  e.g. arange(R) with a zero-length past of R rows).
- `topk` (int64 [1]) is a graph input: the engine asks for 2K candidates per row with one graph
  (K may differ per request). topk_* are the top-k of the raw log_probs of each row, sorted
  descending; the generation rules (no pad/bos, min/max length) are applied by the caller,
  which can fall back to log_probs when a rule touches a row.
- log_probs are float32 in every precision; K/V tensors are float16 in the fp16 variant.

The graphs are traced with `torch.onnx.export(dynamo=True)` (torch.export): it handles a
zero-length past and gives a graph about a third the size of the TorchScript exporter's.
After export, `finalize_graph` wires `topk` into the TopK node and renames every input/output
dim to the signature's symbolic names, then the result is checked against the signature.
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
TRACE_K = 4  # placeholder top-k width while tracing; replaced by the `topk` input
# Example sizes for tracing: all >= 2 so torch.export does not specialise a dim to 0 or 1.
_B, _K, _S, _TP = 2, 3, 7, 5


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


class DecoderStepGraph(nn.Module):
    """`Transformer.decode_step` with flat inputs/outputs in signature order, plus top-k.

    Inputs: input_ids, position, src_mask, cache_index, topk, then cross K/V of every layer
    (k.0, v.0, k.1, ...), then past K/V of every layer. Outputs: log_probs, topk_log_probs,
    topk_ids, then present K/V of every layer.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.layers = model.cfg.decoder_layers

    def forward(
        self, input_ids: Tensor, position: Tensor, src_mask: Tensor, cache_index: Tensor, topk: Tensor,
        *kv: Tensor,
    ) -> tuple[Tensor, ...]:
        n = self.layers
        cross = [(kv[2 * i], kv[2 * i + 1]) for i in range(n)]
        past = [(kv[2 * n + 2 * i], kv[2 * n + 2 * i + 1]) for i in range(n)]
        log_probs, present = self.model.decode_step(input_ids, position, src_mask, cross, past, cache_index)
        # Traced with a constant width; finalize_graph makes the TopK node read the `topk` input.
        top_v, top_i = torch.topk(log_probs, TRACE_K, dim=-1)  # (R, k)
        out = [log_probs, top_v, top_i]
        for k, v in present:
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
    """The one-step decoder graph of `model` (eval mode, on CPU, in the dtype of its weights)."""
    from torch.export import Dim

    cfg = model.cfg
    _, dec_spec = signatures(model, float_dtype)
    dtype = next(model.parameters()).dtype
    dims = {
        "batch": Dim("batch", min=1, max=65536),
        "src_len": Dim("src_len", min=1, max=cfg.max_positions),
        "rows": Dim("rows", min=1, max=65536),
        "prev_rows": Dim("prev_rows", min=1, max=65536),
        "past_len": Dim("past_len", min=0, max=cfg.max_positions),
    }
    r = _B * _K
    src = torch.randint(4, cfg.vocab_size, (_B, _S))
    src[1, -2:] = cfg.pad_id
    with torch.no_grad():
        cross = model.cross_kv(model.encode(src))
    args: list[Tensor] = [
        torch.randint(4, cfg.vocab_size, (r, 1)),  # input_ids
        torch.full((r,), _TP, dtype=torch.long),  # position
        src != cfg.pad_id,  # src_mask
        torch.arange(r),  # cache_index
        torch.tensor([TRACE_K]),  # topk
    ]
    for k, v in cross:
        args += [k, v]
    for _ in range(cfg.decoder_layers):
        past_shape = (r + 1, cfg.heads, _TP, cfg.head_dim)  # prev_rows != rows while tracing
        args += [torch.randn(past_shape, dtype=dtype), torch.randn(past_shape, dtype=dtype)]
    shapes = _dynamic_shapes(dec_spec, dims)
    dynamic = (*shapes[:5], tuple(shapes[5:]))  # the K/V tensors are the *kv varargs
    proto = _export(DecoderStepGraph(model).eval(), tuple(args), dec_spec, dynamic, optimize)
    return finalize_graph(proto, dec_spec)


def finalize_graph(proto: onnx.ModelProto, spec: sig.GraphSignature) -> onnx.ModelProto:
    """Make an exported graph declare exactly `spec`: `topk` wired in, dims named as declared.

    The TopK node traced with a constant width is rewired to read the `topk` graph input (added if
    the exporter dropped it as unused). Every input/output dim that the signature declares
    symbolic gets the signature's name (the exporter writes expressions like "past_len + 1" or
    fixes vocab). Raises SignatureMismatch if the graph still differs from `spec`.
    """
    graph = proto.graph
    names = {t.name for t in spec.inputs}
    if sig.TOPK in names:
        topk_nodes = [n for n in graph.node if n.op_type == "TopK"]
        if len(topk_nodes) != 1:
            raise ValueError(f"expected one TopK node in the decoder graph, found {len(topk_nodes)}")
        old = topk_nodes[0].input[1]
        topk_nodes[0].input[1] = sig.TOPK
        if sig.TOPK not in {i.name for i in graph.input}:
            graph.input.append(onnx.helper.make_tensor_value_info(sig.TOPK, onnx.TensorProto.INT64, [1]))
        _drop_if_unused(graph, old)
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
