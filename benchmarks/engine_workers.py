"""Two workers on two cores: threads (the engine's way) against processes, and ONNX Runtime alone.

    python benchmarks/engine_workers.py models/model_repository/de-en-int8/1 [--sentences 300] [--rounds 3]

Answers "how much does the GIL cost the engine at batch 1?" with three measurements, interleaved
over rounds on the same test_2016_flickr sentences (beam 4, one sentence per batch):
- 1 worker: `Engine.translate_batch` with parallel_batches=1;
- 2 threads: the same with parallel_batches=2 (one shared session, two decoding threads, one GIL);
- 2 processes: two processes with one single-worker engine each, half of the sentences each (no
  shared GIL; started and warmed up before the clock starts);
and the decoder graph alone (`export.measure.graph_calls`, 4 rows, past 8): one thread, then two
threads calling one session, with no Python between calls. Prints a Markdown table of sentences/s
(or calls/s) per round.
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from service.engine import Engine, EngineConfig
from service.options import DecodingOptions

OPTIONS = DecodingOptions(beam_size=4, max_decoding_length=256, max_decoding_length_ratio=0.0)


def load(entry: str, workers: int) -> Engine:
    engine = Engine.load(entry, EngineConfig(provider="cpu", parallel_batches=workers, max_batch_sentences=1,
                                             max_batch_tokens=1 << 30))
    engine.translate_batch(["Ein Hund läuft.", "Zwei Männer stehen vor einem Haus."], OPTIONS)  # warm-up
    return engine


def _process(entry: str, sentences: list[str], conn: Connection) -> None:
    engine = load(entry, 1)
    conn.send("ready")
    while conn.recv() == "go":
        engine.translate_batch(sentences, OPTIONS)
        conn.send("done")


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with gzip.open(args.data_dir / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f][: args.sentences]
    n = len(lines)
    one, two = load(args.entry, 1), load(args.entry, 2)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for part in (lines[0::2], lines[1::2]):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_process, args=(args.entry, part, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for parent in pipes:
        parent.recv()

    def in_processes() -> None:
        for parent in pipes:
            parent.send("go")
        for parent in pipes:
            parent.recv()

    # The decoder graph alone (export.measure's inputs): one sentence at beam 4, 8 cached positions.
    from export.measure import graph_calls
    from export.ort_graphs import OrtGraphs

    _, graph_step = graph_calls(OrtGraphs(Path(args.entry)), batch=1, beams=4, src_len=14, past_len=8)
    calls = 400

    def graph_loop() -> None:
        for _ in range(calls):
            graph_step()

    def graph_two_threads() -> None:
        threads = [threading.Thread(target=graph_loop) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    rows: dict[str, list[float]] = {"engine, 1 worker": [], "engine, 2 threads": [], "engine, 2 processes": [],
                                    "decoder graph, 1 thread (calls/s)": [], "decoder graph, 2 threads (calls/s)": []}
    graph_loop()
    for r in range(args.rounds):
        rows["engine, 1 worker"].append(n / timed(lambda: one.translate_batch(lines, OPTIONS)))
        rows["engine, 2 threads"].append(n / timed(lambda: two.translate_batch(lines, OPTIONS)))
        rows["engine, 2 processes"].append(n / timed(in_processes))
        rows["decoder graph, 1 thread (calls/s)"].append(calls / timed(graph_loop))
        rows["decoder graph, 2 threads (calls/s)"].append(2 * calls / timed(graph_two_threads))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for parent in pipes:
        parent.send("stop")
    for proc in procs:
        proc.join(30)

    print(f"\n{args.entry}, {n} sentences, beam 4, batch 1; per round, and the median:\n")
    print("| setting | rounds | median | vs 1 worker / 1 thread |")
    print("|---|---|---:|---:|")
    for name, values in rows.items():
        base = statistics.median(rows["engine, 1 worker" if name.startswith("engine") else
                                      "decoder graph, 1 thread (calls/s)"])
        med = statistics.median(values)
        print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {med:.1f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
