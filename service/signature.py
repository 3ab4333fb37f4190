"""The ONNX contract between export/ and service/, declared once. Torch-free.

Every tensor of `encoder.onnx` and `decoder.onnx` is declared here with its name, element type
and dims; the exporter builds its graphs from these declarations and the engine checks a loaded
graph against them (`check_graph`), so a tensor name is never spelled twice in the codebase.

Dims are either ints (fixed by the model config: heads, head_dim) or symbolic names:
    batch      live source sentences
    src_len    padded source length
    rows       live hypothesis rows this step (batch * beams)
    prev_rows  rows of the previous step (the rows of past K/V)
    past_len   cached target positions (0 on the first step)
    total_len  past_len + 1
    vocab      vocabulary size (fixed per model, symbolic in the graph)
    k          top-k width requested this step
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SIGNATURE_VERSION = 1

# Encoder
SRC_IDS = "src_ids"
# Decoder
INPUT_IDS = "input_ids"
POSITION = "position"
SRC_MASK = "src_mask"
CACHE_INDEX = "cache_index"
TOPK = "topk"
LOG_PROBS = "log_probs"
TOPK_LOG_PROBS = "topk_log_probs"
TOPK_IDS = "topk_ids"


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
    """decoder.onnx: one step for every live hypothesis row (see ARCHITECTURE.md)."""
    cross = ("batch", heads, "src_len", head_dim)
    past = ("prev_rows", heads, "past_len", head_dim)
    present = ("rows", heads, "total_len", head_dim)
    ins = [
        TensorSpec(INPUT_IDS, "int64", ("rows", 1)),
        TensorSpec(POSITION, "int64", ("rows",)),
        TensorSpec(SRC_MASK, "bool", ("batch", "src_len")),
        TensorSpec(CACHE_INDEX, "int64", ("rows",)),
        TensorSpec(TOPK, "int64", (1,)),
    ]
    for i in range(layers):
        ins += [TensorSpec(cross_k(i), float_dtype, cross), TensorSpec(cross_v(i), float_dtype, cross)]
    for i in range(layers):
        ins += [TensorSpec(past_k(i), float_dtype, past), TensorSpec(past_v(i), float_dtype, past)]
    outs = [
        TensorSpec(LOG_PROBS, "float32", ("rows", "vocab")),
        TensorSpec(TOPK_LOG_PROBS, "float32", ("rows", "k")),
        TensorSpec(TOPK_IDS, "int64", ("rows", "k")),
    ]
    for i in range(layers):
        outs += [TensorSpec(present_k(i), float_dtype, present), TensorSpec(present_v(i), float_dtype, present)]
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
            if isinstance(wd, str) and isinstance(gd, int) and wd not in ("k",):
                problems.append(f"{kind} {name!r} axis {axis} is fixed to {gd}, expected dynamic {wd!r}")
    return sorted(problems)


def check_graph(graph_name: str, expected: GraphSignature, inputs: Iterable[TensorSpec],
                outputs: Iterable[TensorSpec]) -> None:
    """Raise SignatureMismatch naming every difference between a graph and its signature."""
    problems = _compare("input", expected.inputs, inputs) + _compare("output", expected.outputs, outputs)
    if problems:
        raise SignatureMismatch(f"{graph_name} does not match signature v{SIGNATURE_VERSION}: " + "; ".join(problems))
