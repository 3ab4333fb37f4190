"""What the server's memory setting costs in speed: onnxruntime's CPU arena on (the engine's default) against
off (the server's default, ServerConfig.cpu_memory_arena; the server also calls malloc_trim when idle,
which busy decoding never reaches), side by side in one run, alternating, each setting in a fresh process.

    python benchmarks/engine_memory.py --entry models/model_repository/de-en/1 --rounds 3

Each process translates the same test sentences at batch 32 and at batch 1 (beam 5, one engine thread per
batch, `--workers` batches at once as the server does) and prints sentences per second and its peak RSS.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"arena": True, "no-arena": False}  # name -> EngineConfig.cpu_memory_arena


def child(entry: str, arena: bool, data: Path, sentences: int, workers: int) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    from service.engine import Engine, EngineConfig
    from service.options import DecodingOptions
    engine = Engine.load(entry, EngineConfig(provider="cpu", intra_op_threads=1, cpu_memory_arena=arena))
    with gzip.open(data, "rt", encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()][:sentences]
    ids = engine.tokenizer.encode_batch(lines)
    options = DecodingOptions(beam_size=5)
    out: dict[str, float] = {}
    for batch in (32, 1):
        chunks = [ids[i:i + batch] for i in range(0, len(ids) if batch > 1 else len(ids) // 4, batch)]
        engine.translate_ids(chunks[0], options)  # warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda c: engine.translate_ids(c, options), chunks))
        out[f"batch{batch}_sent_per_s"] = sum(map(len, chunks)) / (time.perf_counter() - started)
    status = Path("/proc/self/status").read_text()
    out["peak_rss_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", default=str(REPO / "models/model_repository/de-en/1"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/multi30k/test_2016_flickr.de.gz")
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.entry, SETTINGS[args.child], args.data, args.sentences, args.workers)))
        return 0
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name in SETTINGS:
            cmd = [sys.executable, __file__, "--child", name, "--entry", args.entry, "--data", str(args.data),
                   "--sentences", str(args.sentences), "--workers", str(args.workers)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            runs[name].append(result)
            print(f"round {r + 1} {name}: {result}", flush=True)
    print("\n| setting | batch 32 sent/s | batch 1 sent/s | peak RSS MiB |\n|---|---:|---:|---:|")
    for name, results in runs.items():
        med = {k: statistics.median(x[k] for x in results) for k in results[0]}
        print(f"| {name} | {med['batch32_sent_per_s']:.0f} | {med['batch1_sent_per_s']:.0f} "
              f"| {med['peak_rss_mib']:.0f} |")
    base, new = (runs[n] for n in SETTINGS)
    for key in ("batch32_sent_per_s", "batch1_sent_per_s"):
        ratio = statistics.median(x[key] for x in new) / statistics.median(x[key] for x in base)
        print(f"{key}: no-arena / arena = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
