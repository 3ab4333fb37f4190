"""Decoder graph alone: time per call of `decoder.onnx` of several entries, side by side.

    python benchmarks/decoder_step.py OLD_ENTRY NEW_ENTRY [...] [--rows 4,128] [--past 8] [--rounds 15]

One ONNX Runtime session per entry (CPU, 1 intra-op thread, full graph optimisation), fed the same
random inputs: `rows` hypothesis rows (4 = one sentence at beam 4, 128 = 32 sentences), a past of
`--past` positions, a 14-token source. Rounds are interleaved across entries and each cell is the
fastest round, so a machine that is busy for a while slows every entry alike rather than one.
Also reports the node count of each graph after ONNX Runtime's optimisations. For A/B checks of
graph changes; the end-to-end comparison is engine_benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from service import signature as sig

SOURCE_LEN = 14


def session(entry: Path, optimized_path: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(entry / "decoder.onnx"), so, providers=["CPUExecutionProvider"])


def feeds(entry: Path, rows: int, past: int, beam: int = 4) -> dict[str, np.ndarray]:
    cfg = json.loads((entry / "manifest.json").read_text())["model_config"]
    layers, heads, head_dim = cfg["decoder_layers"], cfg["heads"], cfg["d_model"] // cfg["heads"]
    batch = max(1, rows // beam)
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {
        sig.INPUT_IDS: rng.integers(4, cfg["vocab_size"], (rows, 1)),
        sig.POSITION: np.full(rows, past, dtype=np.int64),
        sig.SRC_MASK: np.ones((batch, SOURCE_LEN), dtype=bool),
        sig.CACHE_INDEX: np.arange(rows, dtype=np.int64),
        sig.TOPK: np.array([2 * beam + 3], dtype=np.int64),
    }
    for i in range(layers):
        for name in (sig.cross_k(i), sig.cross_v(i)):
            out[name] = rng.standard_normal((batch, heads, SOURCE_LEN, head_dim), dtype=np.float32)
        for name in (sig.past_k(i), sig.past_v(i)):
            out[name] = rng.standard_normal((rows, heads, past, head_dim), dtype=np.float32)
    return out


def optimized_nodes(entry: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="rosetta-decoder-step-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(entry, path)
        return len(onnx.load(str(path), load_external_data=False).graph.node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", type=Path)
    parser.add_argument("--rows", default="4,128")
    parser.add_argument("--past", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=0, help="calls per round (default: ~50 ms of work)")
    args = parser.parse_args(argv)
    sessions = [session(e) for e in args.entries]
    nodes = [optimized_nodes(e) for e in args.entries]
    print("| entry | ORT nodes | rows | ms per call (min round) | speed vs first |")
    print("|---|---:|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = [feeds(e, rows, args.past) for e in args.entries]
        start = time.perf_counter()
        sessions[0].run(None, inputs[0])
        calls = args.calls or max(3, int(0.05 / max(time.perf_counter() - start, 1e-5)))
        best = [float("inf")] * len(sessions)
        for _ in range(args.rounds):
            for i, (s, f) in enumerate(zip(sessions, inputs, strict=True)):
                start = time.perf_counter()
                for _ in range(calls):
                    s.run(None, f)
                best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e3)
        for entry, n, ms in zip(args.entries, nodes, best, strict=True):
            print(f"| {entry} | {n} | {rows} | {ms:.3f} | {best[0] / ms:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
