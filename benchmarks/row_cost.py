"""Where a busy server's decoder time goes: rows per call, time per row-step, rows per output token, encoder.

    python benchmarks/row_cost.py --serve batch="--scheduler batch" --serve loop="--scheduler loop" --rounds 2

For each server (`rosetta serve FLAGS`, in turn, `--rounds` times): `--callers` closed-loop callers send one
test_2016_flickr caption each (beam `--beam-size`) for `--duration-s` after a short warm-up, and the
server's own /metrics give, over that window: decoder calls and their rows, decoder time per row-step,
row-steps per generated token (beam rows and the dead rows of a joining sentence included), and the
encoder's calls and time. Explains a throughput ratio that benchmarks/loadgen.py measures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
from pathlib import Path

from loadgen import TEST_SOURCES, Load, SpawnedServer, closed_loop, read_sentences, serve_spec  # benchmarks/loadgen.py

from service.proto import translate_pb2 as pb

COUNTERS = ("rosetta_decoder_step_duration_seconds_sum", "rosetta_decoder_step_duration_seconds_count",
            "rosetta_decoder_step_rows_sum", "rosetta_encoder_duration_seconds_sum",
            "rosetta_encoder_duration_seconds_count", "rosetta_output_tokens_total")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {name: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))
            for name in COUNTERS}


async def drive(address: str, captions: list[str], callers: int, beam: int, seconds: float) -> int:
    """benchmarks/loadgen.py's closed loop for `seconds`; returns the calls answered OK."""
    load = Load(address, captions, 1, pb.DecodingOptions(beam_size=beam), "", 8, 60.0)
    try:
        samples, _ = await closed_loop(load, callers, seconds, 0.0)
    finally:
        await load.close()
    return sum(s.code == "OK" for s in samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="append", default=[], metavar='LABEL="FLAGS"', required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--metrics-port", type=int, default=9556)
    p.add_argument("--data", type=Path, default=TEST_SOURCES)
    args = p.parse_args(argv)
    captions = read_sentences(args.data, 1000)
    print("| server | sent/s | decoder s | calls | rows/call | us/row-step | row-steps/token | encoder s | "
          "encoder calls |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for _ in range(args.rounds):
        for spec in args.serve:
            label, flags = serve_spec(spec)
            server = SpawnedServer([*flags, "--metrics-port", str(args.metrics_port)])
            try:
                asyncio.run(drive(server.address, captions, args.callers, args.beam_size, 3.0))
                before, started = scrape(args.metrics_port), time.monotonic()
                calls = asyncio.run(drive(server.address, captions, args.callers, args.beam_size,
                                                args.duration_s))
                seconds, after = time.monotonic() - started, scrape(args.metrics_port)
            finally:
                server.stop()
            d = {k: after[k] - before[k] for k in COUNTERS}
            steps, rows = d["rosetta_decoder_step_duration_seconds_count"], d["rosetta_decoder_step_rows_sum"]
            decoder_s = d["rosetta_decoder_step_duration_seconds_sum"]
            encoder_s, encoder_calls = (d["rosetta_encoder_duration_seconds_sum"],
                                        d["rosetta_encoder_duration_seconds_count"])
            print(f"| {label} | {calls / seconds:.1f} | {decoder_s:.2f} | {steps:.0f} | {rows / steps:.1f} | "
                  f"{1e6 * decoder_s / rows:.1f} | {rows / d['rosetta_output_tokens_total']:.2f} | "
                  f"{encoder_s:.2f} | {encoder_calls:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
