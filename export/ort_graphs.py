"""The exported graphs under ONNX Runtime, as the export side needs them (parity, evaluation).

Torch-free and deliberately small: plain numpy in and out, CPU by default. The serving engine
(service/) has its own, device-resident loop; this one exists so export/ can check and measure
an entry without depending on it.

Shapes: B batch, K beams, R rows, S source length, Tp past length, M cache slots, H heads, Dh head dim,
V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.manifest import DECODER_FILE, ENCODER_FILE, read_manifest
from service import signature as sig


def session_options(threads: int = 1, optimization: str = "all") -> ort.SessionOptions:
    """CPU session options: `threads` intra-op threads; optimization "none"|"basic"|"extended"|"all"."""
    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    return so


@dataclass
class StepOutput:
    log_probs: np.ndarray  # (R, V) float32, rebuilt from a top-k as wide as the vocabulary
    topk_log_probs: np.ndarray  # (R, k) float32
    topk_ids: np.ndarray  # (R, k) int64
    eos_log_probs: np.ndarray  # (R,) float32
    present: list[np.ndarray]  # per layer k, v: [k.0, v.0, k.1, v.1, ...] each (R, H, Tp+1, Dh)


class OrtGraphs:
    """encoder.onnx + decoder.onnx of one entry folder, checked against the signature on load."""

    def __init__(self, entry: Path, threads: int = 1, optimization: str = "all",
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        entry = Path(entry)
        self.manifest = read_manifest(entry)
        cfg = self.manifest["model_config"]
        self.layers, self.heads, self.head_dim = cfg["decoder_layers"], cfg["heads"], cfg["d_model"] // cfg["heads"]
        self.vocab_size = cfg["vocab_size"]
        self.pad_id, self.bos_id, self.eos_id = cfg["pad_id"], cfg["bos_id"], cfg["eos_id"]
        self.float_dtype = np.float16 if self.manifest["precision"] == "fp16" else np.float32
        fd = "float16" if self.manifest["precision"] == "fp16" else "float32"
        so = session_options(threads, optimization)
        self.encoder = ort.InferenceSession(str(entry / ENCODER_FILE), so, providers=list(providers))
        self.decoder = ort.InferenceSession(str(entry / DECODER_FILE), so, providers=list(providers))
        sig.check_session(ENCODER_FILE, sig.encoder_signature(self.layers, self.heads, self.head_dim, fd), self.encoder)
        sig.check_session(DECODER_FILE, sig.decoder_signature(self.layers, self.heads, self.head_dim, fd), self.decoder)

    def encode(self, src_ids: np.ndarray) -> list[np.ndarray]:
        """src_ids (B, S) int64 -> [cross_k.0, cross_v.0, ...] each (B, H, S, Dh)."""
        return list(self.encoder.run(None, {sig.SRC_IDS: src_ids.astype(np.int64)}))

    def empty_past(self, rows: int) -> list[np.ndarray]:
        """Zero-length past K/V for the first step: per layer (rows, H, 0, Dh)."""
        shape = (rows, self.heads, 0, self.head_dim)
        return [np.zeros(shape, self.float_dtype) for _ in range(2 * self.layers)]

    def step(self, input_ids: np.ndarray, position: np.ndarray, src_mask: np.ndarray, cross: list[np.ndarray],
             past: list[np.ndarray], cache_index: np.ndarray, topk: int = 1) -> StepOutput:
        """One decoder step, v1-style: past K/V (R_prev, H, Tp, Dh) in, row r continuing row cache_index[r],
        present (R, H, Tp+1, Dh) out. input_ids (R,) or (R, 1), position (R,), src_mask (B, S).

        The past is gathered on the host into a cache of Tp+1 slots, each row reading its own (identity
        indirection); `step_in_place` is the graph's own contract.
        """
        rows, tp = cache_index.size, past[0].shape[2]
        cache = [np.ascontiguousarray(np.concatenate(
            [p[cache_index], np.zeros((rows, self.heads, 1, self.head_dim), self.float_dtype)], axis=2))
            for p in past]
        beams = rows // src_mask.shape[0]
        indirection = np.broadcast_to(np.arange(beams, dtype=np.int32)[None, :, None],
                                      (src_mask.shape[0], beams, tp + 1))
        return self.step_in_place(input_ids, position, np.ones((rows, tp + 1), np.int32), src_mask, cross, cache,
                                  indirection, tp, topk)

    def step_in_place(self, input_ids: np.ndarray, position: np.ndarray, self_mask: np.ndarray,
                      src_mask: np.ndarray, cross: list[np.ndarray], cache: list[np.ndarray],
                      indirection: np.ndarray, slot: int, topk: int = 1, vocab_wide: bool = True) -> StepOutput:
        """One call of the graph as declared: `cache` (per layer k, v: (R, H, M, Dh) numpy) is updated in
        place at `slot`; indirection (B, K, M); self_mask (R, slot + 1). With `vocab_wide` the graph is asked
        for a top-k as wide as the vocabulary, from which log_probs are rebuilt (checks); without, for
        `topk` only, as the engine asks (timing), and log_probs is empty."""
        rows = input_ids.shape[0]
        binding = self.decoder.io_binding()
        feeds = {
            sig.INPUT_IDS: input_ids.astype(np.int64).reshape(-1),
            sig.POSITION: position.astype(np.int64),
            sig.SELF_MASK: np.ascontiguousarray(self_mask, dtype=np.int32),
            sig.CACHE_SLOT: np.array([slot], dtype=np.int32),
            sig.BEAM_WIDTH: np.array([rows // src_mask.shape[0]], dtype=np.int32),
            sig.CACHE_INDIRECTION: np.ascontiguousarray(indirection, dtype=np.int32),
            sig.SRC_MASK: np.ascontiguousarray(src_mask, dtype=np.int32),
            sig.TOPK: np.array([self.vocab_size if vocab_wide else topk], dtype=np.int64),
        }
        for i in range(self.layers):
            feeds[sig.cross_k(i)], feeds[sig.cross_v(i)] = cross[2 * i], cross[2 * i + 1]
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in (sig.TOPK_LOG_PROBS, sig.TOPK_IDS, sig.EOS_LOG_PROBS):
            binding.bind_output(name, "cpu")
        for i in range(self.layers):  # past and present on one buffer: the graph writes into it
            for j, (past, present) in enumerate(((sig.past_k(i), sig.present_k(i)), (sig.past_v(i), sig.present_v(i)))):
                value = ort.OrtValue.ortvalue_from_numpy(cache[2 * i + j])
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
        self.decoder.run_with_iobinding(binding)
        values, ids, eos = (v.numpy() for v in binding.get_outputs()[:3])
        if not vocab_wide:
            return StepOutput(np.empty((rows, 0), dtype=np.float32), values, ids, eos, cache)
        log_probs = np.empty((rows, self.vocab_size), dtype=np.float32)
        np.put_along_axis(log_probs, ids, values, axis=1)
        return StepOutput(log_probs, values[:, :topk], ids[:, :topk], eos, cache)


def greedy_decode(graphs: OrtGraphs, sources: list[list[int]], max_len: int) -> list[list[int]]:
    """Greedy decoding of token-id sources (each ending with eos) in one padded batch.

    Returns the generated ids of each source, eos excluded, at most `max_len` tokens each.
    pad and bos are never generated. Finished sentences leave the batch through cache_index.
    """
    b = len(sources)
    width = max(len(s) for s in sources)
    src = np.full((b, width), graphs.pad_id, dtype=np.int64)
    for i, s in enumerate(sources):
        src[i, : len(s)] = s
    src_mask = src != graphs.pad_id  # (B, S)
    cross = graphs.encode(src)
    alive = np.arange(b)  # original index of each live row
    out: list[list[int]] = [[] for _ in range(b)]
    input_ids = np.full(b, graphs.bos_id, dtype=np.int64)
    past, cache_index = graphs.empty_past(b), np.arange(b)
    for step in range(max_len):
        res = graphs.step(input_ids, np.full(alive.size, step), src_mask, cross, past, cache_index)
        lp = res.log_probs.copy()
        lp[:, [graphs.pad_id, graphs.bos_id]] = -np.inf
        best = lp.argmax(axis=-1)  # (R,)
        keep = []
        for row, orig in enumerate(alive):
            if best[row] == graphs.eos_id:
                continue
            out[orig].append(int(best[row]))
            keep.append(row)
        if not keep:
            break
        keep_a = np.array(keep, dtype=np.int64)
        alive, cache_index, past = alive[keep_a], keep_a, res.present
        input_ids = best[keep_a]
        cross = [c[keep_a] for c in cross]
        src_mask = src_mask[keep_a]
    return out
