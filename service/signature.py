"""The ONNX contract between export/ and service/, declared once. Torch-free.

Every tensor of `encoder.onnx` and `decoder.onnx` is declared here with its name, element type
and dims; the exporter builds its graphs from these declarations and the engine checks a loaded
graph against them (`check_graph`), so a tensor name is never spelled twice in the codebase.

Version 2 (this one): the decoder step writes its K/V into a preallocated cache in place and
reads beams through a cache indirection, takes a position and a key mask per row (rows at
different steps share one call), and returns only what a search reads (top-k and eos).
Version 1 entries (a cache rewritten every step, full log-probs out) are refused: re-export.

Dims are either ints (fixed by the model config: heads, head_dim) or symbolic names:
    batch      live source sentences
    src_len    padded source length
    beams      rows per sentence this call (1 at a beam search's first step, greedy: 1)
    rows       live hypothesis rows this call (batch * beams)
    max_len    slots of the self-attention cache (its capacity; the engine grows it)
    total_len  cache_slot + 1: the slots a row may attend this call
    k          top-k width requested this call
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SIGNATURE_VERSION = 2

# Encoder
SRC_IDS = "src_ids"
# Decoder
INPUT_IDS = "input_ids"
POSITION = "position"
SRC_MASK = "src_mask"
SELF_MASK = "self_mask"
CACHE_SLOT = "cache_slot"
BEAM_WIDTH = "beam_width"
CACHE_INDIRECTION = "cache_indirection"
TOPK = "topk"
TOPK_LOG_PROBS = "topk_log_probs"
TOPK_IDS = "topk_ids"
EOS_LOG_PROBS = "eos_log_probs"


def cross_k(i: int) -> str:
    return f"cross_k.{i}"


def cross_v(i: int) -> str:
    return f"cross_v.{i}"


def past_k(i: int) -> str:
    return f"past_k.{i}"


def past_v(i: int) -> str:
    return f"past_v.{i}"


def present_k(i: int) -> str:
    return f"present_k.{i}"


def present_v(i: int) -> str:
    return f"present_v.{i}"


Dim = int | str

# Symbolic dims a loaded graph may report as fixed numbers: ONNX Runtime infers vocab from the
# output projection's weight, and an exporter may pin k; neither limits what the engine can feed.
MAY_BE_FIXED = frozenset({"vocab", "k"})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # ONNX element type name: "int64", "float32", "float16", "bool"
    dims: tuple[Dim, ...]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class GraphSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict[str, object]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def encoder_signature(layers: int, heads: int, head_dim: int, float_dtype: str = "float32") -> GraphSignature:
    """encoder.onnx: src_ids (batch, src_len) -> per decoder layer cross K/V (batch, H, src_len, Dh)."""
    kv = ("batch", heads, "src_len", head_dim)
    outs: list[TensorSpec] = []
    for i in range(layers):
        outs += [TensorSpec(cross_k(i), float_dtype, kv), TensorSpec(cross_v(i), float_dtype, kv)]
    return GraphSignature((TensorSpec(SRC_IDS, "int64", ("batch", "src_len")),), tuple(outs))


def decoder_signature(layers: int, heads: int, head_dim: int, float_dtype: str = "float32") -> GraphSignature:
    """decoder.onnx: one step for every live hypothesis row (see ARCHITECTURE.md and export/step_graph.py).

    input_ids (rows,)                  the last token of every row
    position (rows,)                   its position (rows may be at different steps)
    self_mask (rows, total_len) int32  1 where a row attends a cache slot (its own past and cache_slot)
    cache_slot (1,) int32              the slot every row writes its new K/V to (one per call)
    beam_width (1,) int32              rows per sentence: rows = batch * beam_width, consecutive
    cache_indirection (batch, beams, max_len) int32
                                       slot s of row (b, i) is read from row b*beams + value
    src_mask (batch, src_len) int32    1 at real source tokens
    topk (1,) int64                    width of the top-k outputs
    cross_k.i / cross_v.i (batch, H, src_len, Dh)
    past_k.i / past_v.i (rows, H, max_len, Dh)   the cache; present_k.i / present_v.i are the
                                       same tensors with slot cache_slot written: bind each pair to
                                       ONE buffer (the graph updates it in place)
    -> topk_log_probs (rows, k) float32, topk_ids (rows, k) int64, eos_log_probs (rows,) float32.
    """
    cross = ("batch", heads, "src_len", head_dim)
    cache = ("rows", heads, "max_len", head_dim)
    ins = [
        TensorSpec(INPUT_IDS, "int64", ("rows",)),
        TensorSpec(POSITION, "int64", ("rows",)),
        TensorSpec(SELF_MASK, "int32", ("rows", "total_len")),
        TensorSpec(CACHE_SLOT, "int32", (1,)),
        TensorSpec(BEAM_WIDTH, "int32", (1,)),
        TensorSpec(CACHE_INDIRECTION, "int32", ("batch", "beams", "max_len")),
        TensorSpec(SRC_MASK, "int32", ("batch", "src_len")),
        TensorSpec(TOPK, "int64", (1,)),
    ]
    for i in range(layers):
        ins += [TensorSpec(cross_k(i), float_dtype, cross), TensorSpec(cross_v(i), float_dtype, cross)]
    for i in range(layers):
        ins += [TensorSpec(past_k(i), float_dtype, cache), TensorSpec(past_v(i), float_dtype, cache)]
    outs = [
        TensorSpec(TOPK_LOG_PROBS, "float32", ("rows", "k")),
        TensorSpec(TOPK_IDS, "int64", ("rows", "k")),
        TensorSpec(EOS_LOG_PROBS, "float32", ("rows",)),
    ]
    for i in range(layers):
        outs += [TensorSpec(present_k(i), float_dtype, cache), TensorSpec(present_v(i), float_dtype, cache)]
    return GraphSignature(tuple(ins), tuple(outs))


class SignatureMismatch(ValueError):
    """A graph's inputs or outputs differ from the declared signature."""


def _compare(kind: str, expected: Sequence[TensorSpec], actual: Iterable[TensorSpec]) -> list[str]:
    problems: list[str] = []
    got = {t.name: t for t in actual}
    want = {t.name: t for t in expected}
    for name in want.keys() - got.keys():
        problems.append(f"missing {kind} {name!r}")
    for name in got.keys() - want.keys():
        problems.append(f"unexpected {kind} {name!r}")
    for name in want.keys() & got.keys():
        w, g = want[name], got[name]
        if w.dtype != g.dtype:
            problems.append(f"{kind} {name!r} has dtype {g.dtype}, expected {w.dtype}")
        if len(w.dims) != len(g.dims):
            problems.append(f"{kind} {name!r} has rank {len(g.dims)}, expected {len(w.dims)} {list(w.dims)}")
            continue
        for axis, (wd, gd) in enumerate(zip(w.dims, g.dims, strict=True)):
            # A fixed dim must match exactly; a symbolic one must not be pinned to a number.
            if isinstance(wd, int) and isinstance(gd, int) and wd != gd:
                problems.append(f"{kind} {name!r} axis {axis} is {gd}, expected {wd}")
            if isinstance(wd, str) and isinstance(gd, int) and wd not in MAY_BE_FIXED:
                problems.append(f"{kind} {name!r} axis {axis} is fixed to {gd}, expected dynamic {wd!r}")
    return sorted(problems)


def check_graph(graph_name: str, expected: GraphSignature, inputs: Iterable[TensorSpec],
                outputs: Iterable[TensorSpec]) -> None:
    """Raise SignatureMismatch naming every difference between a graph and its signature."""
    problems = _compare("input", expected.inputs, inputs) + _compare("output", expected.outputs, outputs)
    if problems:
        raise SignatureMismatch(f"{graph_name} does not match signature v{SIGNATURE_VERSION}: " + "; ".join(problems))


# -- reading a graph's declared inputs/outputs (torch-free) -------------------------------------

# ONNX TensorProto element types, by number, as the names used in TensorSpec.dtype.
ONNX_ELEM_TYPES: dict[int, str] = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}
# onnxruntime NodeArg.type strings, as the names used in TensorSpec.dtype.
ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def _dim(value: object) -> Dim:
    """An ORT/ONNX dim as a TensorSpec dim: int when fixed, else its symbolic name ("?" if unnamed)."""
    if isinstance(value, int):
        return value
    return str(value) if value else "?"


def specs_from_session(session: object) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of an `onnxruntime.InferenceSession` as TensorSpecs.

    Duck-typed on `get_inputs()` / `get_outputs()` so this module never imports onnxruntime.
    """

    def convert(args: Iterable[object]) -> tuple[TensorSpec, ...]:
        out = []
        for a in args:
            kind = str(a.type)  # type: ignore[attr-defined]
            dims = tuple(_dim(d) for d in (a.shape or ()))  # type: ignore[attr-defined]
            out.append(TensorSpec(str(a.name), ORT_TYPES.get(kind, kind), dims))  # type: ignore[attr-defined]
        return tuple(out)

    return convert(session.get_inputs()), convert(session.get_outputs())  # type: ignore[attr-defined]


def specs_from_onnx(model: object) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) declared by an ONNX model: a path, or an `onnx.ModelProto`.

    Needs the `onnx` package (export side); the engine uses `specs_from_session` instead.
    Initializers listed as graph inputs (old exporters) are not inputs a caller feeds, so skipped.
    """
    if not hasattr(model, "graph"):
        import onnx  # lazy: not part of the serving image

        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph  # type: ignore[attr-defined]
    initializers = {t.name for t in graph.initializer}

    def convert(values: Iterable[object]) -> tuple[TensorSpec, ...]:
        out = []
        for v in values:
            if v.name in initializers:  # type: ignore[attr-defined]
                continue
            tt = v.type.tensor_type  # type: ignore[attr-defined]
            dims = tuple(_dim(d.dim_value if d.HasField("dim_value") else d.dim_param) for d in tt.shape.dim)
            name = ONNX_ELEM_TYPES.get(tt.elem_type, f"onnx_type_{tt.elem_type}")
            out.append(TensorSpec(str(v.name), name, dims))  # type: ignore[attr-defined]
        return tuple(out)

    return convert(graph.input), convert(graph.output)


def check_session(graph_name: str, expected: GraphSignature, session: object) -> None:
    """`check_graph` on a loaded onnxruntime session; raises SignatureMismatch."""
    inputs, outputs = specs_from_session(session)
    check_graph(graph_name, expected, inputs, outputs)


def check_onnx(graph_name: str, expected: GraphSignature, model: object) -> None:
    """`check_graph` on an ONNX file or ModelProto; raises SignatureMismatch."""
    inputs, outputs = specs_from_onnx(model)
    check_graph(graph_name, expected, inputs, outputs)
