"""Short calls while long ones run: does a caption wait behind a paragraph?

    python benchmarks/mixed_load.py --serve batch="" --serve loop="--scheduler loop"

For each server (`rosetta serve FLAGS`, started and stopped in turn, as benchmarks/loadgen.py does):
1. idle: `--short-callers` closed-loop callers send one short sentence each (a test_2016_flickr caption),
   half of them with beam 1 and half with beam 4, for `--duration-s`;
2. mixed: the same, while `--long-callers` more callers send long sentences (5 captions joined, ~5x
   longer), half beam 1 and half beam 4; phases 1 and 2 alternate in `--segments` pairs (duration split
   among them), so that the machine's drifts touch both alike;
3. fixed work: every caller of phase 2 makes a set number of calls (`--fixed-calls` long ones each, 5x
   as many short ones each) and the time until all are answered is measured. In phases 1-2 a server
   that answers one kind sooner gets more calls of that kind (closed loops), so only this phase
   compares throughput on equal work.
Reports the short calls' p50/p99 latency in phases 1-2 and their ratio (the issue's bar: p99 mixed at
most 1.5x p99 idle), the long calls' throughput, and the fixed work's time, as a Markdown table (stdout
and --out .md/.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
from loadgen import REPO, TEST_SOURCES, SpawnedServer, percentile, read_sentences, serve_spec  # benchmarks/loadgen.py

from service.proto import translate_pb2 as pb
from service.proto import translate_pb2_grpc as pb_grpc


async def caller(stub: pb_grpc.TranslatorStub, texts: list[str], beam: int, until: float,
                 latencies: list[tuple[float, float]] | None, offset: int) -> int:
    """Closed loop: one call at a time until `until`; appends (start, latency) of each; returns calls done."""
    n, i = 0, offset
    while time.monotonic() < until:
        request = pb.TranslateRequest(sentences=[texts[i % len(texts)]], options=pb.DecodingOptions(beam_size=beam))
        started = time.monotonic()
        await stub.Translate(request, timeout=120)
        if latencies is not None:
            latencies.append((started, time.monotonic() - started))
        n, i = n + 1, i + 7
    return n


async def phase(address: str, short: list[str], long: list[str], args: argparse.Namespace,
                with_long: bool, duration_s: float) -> tuple[list[float], int]:
    """(the short calls' latencies after the warm-up, long calls done); the phase runs warmup_s + duration_s."""
    beams = [int(b) for b in args.beams.split(",")]
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    stubs = [pb_grpc.TranslatorStub(ch) for ch in channels]
    until = time.monotonic() + args.warmup_s + duration_s
    measured: list[float] = []
    warm_until = time.monotonic() + args.warmup_s

    async def short_caller(k: int) -> None:
        lat: list[tuple[float, float]] = []
        await caller(stubs[k % len(stubs)], short, beams[k % len(beams)], until, lat, k)
        measured.extend(latency for start, latency in lat if start >= warm_until)

    tasks = [short_caller(k) for k in range(args.short_callers)]
    long_calls = [caller(stubs[k % len(stubs)], long, beams[k % len(beams)], until, None, k)
                  for k in range(args.long_callers)] if with_long else []
    results = await asyncio.gather(*tasks, *long_calls)
    for ch in channels:
        await ch.close()
    done_long = sum(int(r) for r in results[len(tasks):]) if with_long else 0
    return measured, done_long


def phases(address: str, short: list[str], long: list[str], args: argparse.Namespace) -> tuple[dict[str, float], ...]:
    """Idle and mixed, in `--segments` alternating pairs of duration_s / segments each (the machine's drifts
    then hit both phases alike); the stats of each phase over all its segments."""
    segment_s = args.duration_s / args.segments
    latencies: dict[bool, list[float]] = {False: [], True: []}
    long_done = {False: 0, True: 0}
    for _ in range(args.segments):
        for with_long in (False, True):
            lat, done = asyncio.run(phase(address, short, long, args, with_long, segment_s))
            latencies[with_long] += lat
            long_done[with_long] += done
    seconds = args.segments * (args.warmup_s + segment_s)
    out = []
    for with_long in (False, True):
        measured = sorted(latencies[with_long])
        out.append({"short_p50_ms": 1000 * percentile(measured, 0.5), "short_p99_ms": 1000 * percentile(measured, 0.99),
                    "short_calls": len(measured), "long_calls_per_s": long_done[with_long] / seconds})
    return tuple(out)


async def fixed_work(address: str, short: list[str], long: list[str], args: argparse.Namespace) -> float:
    """Seconds until every caller has made its calls: long callers `--fixed-calls`, short ones 5x as many."""
    beams = [int(b) for b in args.beams.split(",")]
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    stubs = [pb_grpc.TranslatorStub(ch) for ch in channels]

    async def calls(k: int, texts: list[str], n: int) -> None:
        for j in range(n):
            request = pb.TranslateRequest(sentences=[texts[(31 * k + 7 * j) % len(texts)]],
                                          options=pb.DecodingOptions(beam_size=beams[k % len(beams)]))
            await stubs[k % len(stubs)].Translate(request, timeout=300)

    started = time.monotonic()
    await asyncio.gather(*[calls(k, long, args.fixed_calls) for k in range(args.long_callers)],
                         *[calls(k, short, 5 * args.fixed_calls) for k in range(args.short_callers)])
    seconds = time.monotonic() - started
    for ch in channels:
        await ch.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="append", default=[], metavar='LABEL="FLAGS"', required=True)
    p.add_argument("--beams", default="4,1", help="beam sizes the callers take in turn")
    p.add_argument("--short-callers", type=int, default=4)
    p.add_argument("--long-callers", type=int, default=8)
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each segment")
    p.add_argument("--segments", type=int, default=3, help="idle and mixed phases alternate this many times")
    p.add_argument("--fixed-calls", type=int, default=12, help="phase 3: calls per long caller (5x per short one)")
    p.add_argument("--data", type=Path, default=TEST_SOURCES)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mixed_load")
    args = p.parse_args(argv)
    captions = read_sentences(args.data, 1000)
    short = [c for c in captions if len(c.split()) <= 12][:300]
    long = [" ".join(captions[i:i + 5]) for i in range(0, 500, 5)]
    rows = []
    for spec in args.serve:
        label, flags = serve_spec(spec)
        server = SpawnedServer(flags)
        try:
            idle, mixed = phases(server.address, short, long, args)
            fixed_s = asyncio.run(fixed_work(server.address, short, long, args))
        finally:
            server.stop()
        rows.append({"server": label, "idle": idle, "mixed": mixed,
                     "p99_ratio": mixed["short_p99_ms"] / idle["short_p99_ms"], "fixed_work_s": fixed_s})
        print(f"{label}: {rows[-1]}", file=sys.stderr, flush=True)
    md = ("| server | short p50 idle ms | short p99 idle ms | short p50 mixed ms | short p99 mixed ms | "
          "p99 mixed / idle | long calls/s | fixed work s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    md += "".join(f"| {r['server']} | {r['idle']['short_p50_ms']:.0f} | {r['idle']['short_p99_ms']:.0f} | "
                  f"{r['mixed']['short_p50_ms']:.0f} | {r['mixed']['short_p99_ms']:.0f} | {r['p99_ratio']:.2f}x | "
                  f"{r['mixed']['long_calls_per_s']:.1f} | {r['fixed_work_s']:.2f} |\n" for r in rows)
    title = (f"{args.short_callers} short callers (captions) alone, then with {args.long_callers} long callers "
             f"(5 captions joined), beams {args.beams} in turn; {args.duration_s:.0f} s each in {args.segments} "
             f"alternating segments; fixed work: "
             f"{args.fixed_calls} calls per long caller, {5 * args.fixed_calls} per short one "
             f"({time.strftime('%Y-%m-%d')})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"{title}\n\n{md}")
    args.out.with_suffix(".json").write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    print(f"\n{title}\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
