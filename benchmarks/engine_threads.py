"""How should the engine use the CPU cores? Measures the candidate thread settings side by side.

    python benchmarks/engine_threads.py models/model_repository/de-en/1 [--sentences 400] [--json out.json]

On test_2016_flickr, beam 4, for batches of 32 sentences and of 1 sentence:
- "1 session x N threads":   one session with N intra-op threads (N = cores), batches one after another;
  with and without spinning intra-op threads;
- "1 session, N callers":    one session with 1 intra-op thread, N Python threads decoding batches at
  once (ONNX Runtime runs concurrent Run() calls in parallel; what `Engine` does by default);
- "N sessions x 1 thread":   N sessions (N copies of the weights) with 1 intra-op thread, one per thread;
- "1 session x 1 thread":    the single-core baseline.
Reports sentences/s (throughput over all sentences), process CPU time per sentence (what each
setting costs; less sensitive than wall time to other load on the machine) and the mean time of one
batch (latency). The engine's default (`EngineConfig(intra_op_threads=0)`) is set from this table
(benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from model.data import read_lines
from service.engine import Engine, EngineConfig, batches_by_length, run_search
from service.engine.entry import read_entry
from service.engine.runtime import CPU, OrtModel, SessionSettings
from service.engine.search import make_search
from service.options import DecodingOptions


def decode_all(engines: list[Engine], runtimes: list[OrtModel], batches: list[list[list[int]]],
               callers: int, options: DecodingOptions, bar: tqdm) -> tuple[float, float]:
    """Decode `batches` with `callers` threads; thread i uses runtimes[i % len(runtimes)].

    Returns (wall seconds, process CPU seconds, mean seconds per batch)."""
    work: queue.Queue[list[list[int]]] = queue.Queue()
    for b in sorted(batches, key=lambda b: -max(len(s) for s in b)):  # longest first, as translate_batch
        work.put(b)
    per_batch: list[float] = []
    lock = threading.Lock()
    engine = engines[0]

    def worker(i: int) -> None:
        runtime = runtimes[i % len(runtimes)]
        while True:
            try:
                batch = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            src, max_lens = engine.pad_sources(batch, options)
            run_search(runtime, src, make_search(max_lens, options, engine.special_ids, engine.vocab_size))
            with lock:
                per_batch.append(time.perf_counter() - t0)
                bar.update(len(batch))

    started, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, time.process_time() - cpu, sum(per_batch) / len(per_batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--batch-sizes", default="32,1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    n = len(os.sched_getaffinity(0))
    engine = Engine.load(args.entry, EngineConfig(provider="cpu", intra_op_threads=1, parallel_batches=1))
    entry = read_entry(args.entry)
    lines = read_lines(args.data_dir, "test_2016_flickr", "de")[: args.sentences]
    ids = engine.tokenizer.encode_batch(lines)
    options = DecodingOptions(beam_size=4)

    def sessions(count: int, threads: int, spinning: bool = False) -> list[OrtModel]:
        return [OrtModel.open(entry, CPU, SessionSettings(threads, 1, spinning)) for _ in range(count)]

    configs: list[tuple[str, list[OrtModel], int]] = [
        (f"1 session x {n} threads", sessions(1, n), 1),
        (f"1 session x {n} threads, spinning", sessions(1, n, True), 1),
        (f"1 session x 1 thread, {n} callers", sessions(1, 1), n),
        (f"{n} sessions x 1 thread", sessions(n, 1), n),
        ("1 session x 1 thread", sessions(1, 1), 1),
    ]
    rows: list[dict[str, Any]] = []
    for size in (int(b) for b in args.batch_sizes.split(",")):
        batches = [[ids[i] for i in idx] for idx in batches_by_length([len(s) + 1 for s in ids], 1 << 30, size)]
        for name, runtimes, callers in configs:
            decode_all([engine], runtimes, batches[:2], callers, options, tqdm(disable=True))  # warm-up
            with tqdm(total=len(ids), desc=f"b{size} {name}", unit="sent", file=sys.stderr) as bar:
                wall, cpu, per_batch = decode_all([engine], runtimes, batches, callers, options, bar)
            rows.append({"batch": size, "config": name, "sentences_per_s": len(ids) / wall,
                         "cpu_ms_per_sentence": 1000 * cpu / len(ids), "batch_latency_ms": 1000 * per_batch})
    print(f"\n{len(ids)} sentences of test_2016_flickr, beam 4, {n} cores\n")
    print("| batch | setting | sentences/s | CPU ms per sentence | mean batch latency (ms) |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['config']} | {r['sentences_per_s']:.1f} | {r['cpu_ms_per_sentence']:.0f} | "
              f"{r['batch_latency_ms']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
