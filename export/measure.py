"""Latency of entries' graphs under ONNX Runtime: `python -m export.measure ENTRY [ENTRY ...]`.

Measures what graph optimisation and variants buy: wall time of one encoder call and one decoder
step at a serving-like shape (by default 16 sentences x beam 5 = 80 rows, source 20 tokens, 15
cached target positions; `--batch/--beams/--src-len/--past-len`) for every (entry, ORT
optimisation level) pair, and the decoder's node count after that level's optimisations. Calls
are interleaved round-robin across the pairs so that load from other processes on a shared
machine hits them all alike; the median and minimum wall time are reported, and the median CPU
time of the calling thread
(`*_cpu_ms`): with one intra-op thread ONNX Runtime computes on the caller's thread, so that
figure ignores time spent preempted, and is the one to compare on a busy machine.
Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.manifest import DECODER_FILE
from export.ort_graphs import OrtGraphs, session_options


def optimized_decoder_nodes(entry: Path, level: str) -> int:
    """Nodes of the entry's decoder graph after ONNX Runtime's optimisations at `level` (CPU)."""
    with tempfile.TemporaryDirectory(prefix="rosetta-measure-") as tmp:
        so = session_options(1, level)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(Path(entry) / DECODER_FILE), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def graph_calls(g: OrtGraphs, batch: int, beams: int, src_len: int, past_len: int) -> tuple[Callable[[], object], ...]:
    """(encoder call, decoder step call) on fixed random inputs."""
    vocab = int(g.manifest["model_config"]["vocab_size"])
    rng = np.random.default_rng(0)
    src = rng.integers(4, vocab, size=(batch, src_len))
    src[batch // 2 :, src_len - 5 :] = g.pad_id  # half the batch padded
    rows = batch * beams
    shape = (rows, g.heads, past_len + 1, g.head_dim)  # a cache with room for this step's slot
    cache = [rng.standard_normal(shape).astype(g.float_dtype) for _ in range(2 * g.layers)]
    indirection = rng.integers(0, beams, size=(batch, beams, past_len + 1)).astype(np.int32)
    ids = rng.integers(4, vocab, size=(rows, 1))
    pos, mask = np.full(rows, past_len), src != g.pad_id
    self_mask = np.ones((rows, past_len + 1), dtype=np.int32)
    cross = g.encode(src)
    return (lambda: g.encode(src)), (lambda: g.step_in_place(ids, pos, self_mask, mask, cross, cache, indirection,
                                                             past_len, topk=2 * beams + 3, vocab_wide=False))


def measure(entries: list[Path], levels: list[str], threads: int = 1, repeats: int = 40, batch: int = 16,
            beams: int = 5, src_len: int = 20, past_len: int = 15) -> list[dict[str, object]]:
    """One result per (entry, level): load_ms, encoder/decoder_step median and min milliseconds."""
    pairs, loads = [], []
    for entry in entries:
        for level in levels:
            t0 = time.perf_counter()
            g = OrtGraphs(entry, threads=threads, optimization=level)
            loads.append((time.perf_counter() - t0) * 1e3)
            pairs.append((entry, level, graph_calls(g, batch, beams, src_len, past_len)))
    # per pair: encoder wall, encoder thread-CPU, decoder wall, decoder thread-CPU (ms)
    times: list[tuple[list[float], ...]] = [([], [], [], []) for _ in pairs]
    for _ in range(repeats):
        for (_, _, calls), (enc_t, enc_c, dec_t, dec_c) in zip(pairs, times, strict=True):
            for fn, wall, cpu in ((calls[0], enc_t, enc_c), (calls[1], dec_t, dec_c), (calls[1], dec_t, dec_c)):
                t, c = time.perf_counter(), time.thread_time()
                fn()
                cpu.append((time.thread_time() - c) * 1e3)
                wall.append((time.perf_counter() - t) * 1e3)
    out: list[dict[str, object]] = []
    for (entry, level, _), load, (enc_t, enc_c, dec_t, dec_c) in zip(pairs, loads, times, strict=True):
        out.append({
            "entry": str(entry), "ort_level": level, "threads": threads, "load_ms": round(load, 1),
            "rows": batch * beams, "decoder_nodes": optimized_decoder_nodes(entry, level),
            "encoder_median_ms": round(statistics.median(enc_t), 3), "encoder_min_ms": round(min(enc_t), 3),
            "encoder_cpu_ms": round(statistics.median(enc_c), 3),
            "decoder_step_median_ms": round(statistics.median(dec_t), 3),
            "decoder_step_min_ms": round(min(dec_t), 3), "decoder_step_cpu_ms": round(statistics.median(dec_c), 3),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", default="none,all", help="ORT graph optimisation levels: none,basic,extended,all")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="sentences")
    parser.add_argument("--beams", type=int, default=5, help="rows per sentence")
    parser.add_argument("--src-len", type=int, default=20)
    parser.add_argument("--past-len", type=int, default=15)
    args = parser.parse_args()
    for row in measure(args.entries, args.levels.split(","), args.threads, args.repeats, args.batch, args.beams,
                       args.src_len, args.past_len):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
