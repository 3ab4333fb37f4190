"""A lone caller against several servers at once, call by call in turn: C=1 latency that machine drift cannot skew.

    python benchmarks/paired.py --serve batch1="--scheduler batch --max-batch-sentences 1" \\
                                --serve loop="--scheduler loop" --calls 1000

Starts every `--serve LABEL="FLAGS"` server (`rosetta serve` subprocesses, all at once), then sends one
Translate call at a time: sentence i to the first server, the same sentence to the second, and so on,
then sentence i+1, for `--calls` sentences of test_2016_flickr (beam `--beam-size`), after `--warmup`
unmeasured rounds. Only one call is ever in flight, so the idle servers cost nothing, and each server gets
its call right after the others: a slow phase of the machine (on a shared 2-core box they come and go
within minutes) touches every server alike. loadgen.py's closed C=1 runs one server after the other
instead, and their ratios swing by 2x here.

Reports per server: latency p50/p90/p99 and mean, and the sentences/s of a lone caller (calls / time spent
waiting for that server); per server against the first (`--baseline`): the median of the per-sentence
latency ratios and the ratio of the sentences/s. Writes OUT.md, OUT.json and OUT.png (latency CDFs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import grpc
from loadgen import REPO, TEST_SOURCES, SpawnedServer, percentile, read_sentences, serve_spec  # benchmarks/loadgen.py

from service.proto import translate_pb2 as pb
from service.proto import translate_pb2_grpc as pb_grpc


def run(stubs: dict[str, pb_grpc.TranslatorStub], sentences: list[str], calls: int, warmup: int,
        beam_size: int) -> dict[str, list[float]]:
    """Latency in ms of each measured call, per server label, in sentence order."""
    options = pb.DecodingOptions(beam_size=beam_size)
    latency: dict[str, list[float]] = {label: [] for label in stubs}
    for i in range(warmup + calls):
        request = pb.TranslateRequest(sentences=[sentences[i % len(sentences)]], options=options)
        for label, stub in stubs.items():
            started = time.perf_counter()
            stub.Translate(request, timeout=60)
            if i >= warmup:
                latency[label].append((time.perf_counter() - started) * 1000)
        if (i + 1) % 100 == 0:
            print(f"  {max(0, i + 1 - warmup)}/{calls} rounds", file=sys.stderr, flush=True)
    return latency


def report(latency: dict[str, list[float]], baseline: str) -> tuple[str, dict[str, dict[str, float]]]:
    rows = ["| server | calls | sent/s | p50 ms | p90 ms | p99 ms | mean ms | latency / " + baseline
            + " (median per sentence) | sent/s / " + baseline + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rate = {label: len(values) / (sum(values) / 1000) for label, values in latency.items()}  # a lone caller's
    stats: dict[str, dict[str, float]] = {}
    for label, values in latency.items():
        s = sorted(values)
        st = stats[label] = {
            "calls": len(values), "sentences_per_s": rate[label], "p50_ms": percentile(s, 0.5),
            "p90_ms": percentile(s, 0.9), "p99_ms": percentile(s, 0.99), "mean_ms": sum(s) / len(s),
            "latency_ratio_median": statistics.median(v / b for v, b in zip(values, latency[baseline], strict=True)),
            "rate_ratio": rate[label] / rate[baseline]}
        rows.append(f"| {label} | {len(values)} | {rate[label]:.1f} | {st['p50_ms']:.1f} | {st['p90_ms']:.1f} | "
                    f"{st['p99_ms']:.1f} | {st['mean_ms']:.1f} | {st['latency_ratio_median']:.3f} | "
                    f"{st['rate_ratio']:.3f}x |")
    return "\n".join(rows), stats


def plot(latency: dict[str, list[float]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in latency.items():
        s = sorted(values)
        ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
    ax.set(title="one caller, servers in turn: latency CDF", xlabel="ms", ylabel="fraction of calls", xscale="log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="append", default=[], metavar='LABEL="FLAGS"', required=True,
                   help="start `rosetta serve FLAGS` as LABEL (repeatable, at least two)")
    p.add_argument("--calls", type=int, default=1000, help="measured sentences, each sent to every server")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured rounds first")
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--data", type=Path, default=TEST_SOURCES, help="German sentences, one per line")
    p.add_argument("--baseline", default="", help="label the ratios compare against (default: the first)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "paired")
    args = p.parse_args(argv)
    if len(args.serve) < 2:
        p.error("give at least two --serve LABEL=FLAGS")
    specs = [serve_spec(s) for s in args.serve]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        p.error("--serve labels must differ")
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        p.error(f"--baseline {baseline!r} is not a --serve label")
    sentences = read_sentences(args.data, 1000)
    servers: list[SpawnedServer] = []
    channels: list[grpc.Channel] = []
    try:
        for _, flags in specs:
            servers.append(SpawnedServer(flags))
        channels = [grpc.insecure_channel(s.address) for s in servers]
        stubs = {label: pb_grpc.TranslatorStub(ch) for label, ch in zip(labels, channels, strict=True)}
        latency = run(stubs, sentences, args.calls, args.warmup, args.beam_size)
    finally:
        for ch in channels:
            ch.close()
        for s in servers:
            s.stop()
    table, stats = report(latency, baseline)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(shlex.quote(a) for a in sys.argv), "cpus": os.cpu_count(), "calls": args.calls,
            "beam_size": args.beam_size, "servers": {label: " ".join(f) for label, f in specs}}
    rounded = {label: [round(v, 3) for v in values] for label, values in latency.items()}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": stats, "latency_ms": rounded},
                                                        indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")
    if plot(latency, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
