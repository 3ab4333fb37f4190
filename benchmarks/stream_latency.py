"""How soon does a streamed translation show its first word?

    python benchmarks/stream_latency.py --sentences 200 --out benchmarks/results/stream_latency

Starts `rosetta serve` (step-level scheduling, the default) and sends one TranslateStream call at a time
with `stream_prefix`, one sentence each (test_2016_flickr, in order), for every beam size of `--beams`.
For each sentence whose translation has at least `--min-tokens` tokens it records the time to the first
progress message (first word) and to the final message (full latency), both from the call's start on the
client. Reports, per beam, the median and p90 of first word / full latency (the issue's bar: at most 30%)
and of both times, as a Markdown table and JSON (`--out` .md/.json) and a PNG of the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc
from loadgen import REPO, TEST_SOURCES, SpawnedServer, percentile, read_sentences  # benchmarks/loadgen.py

from service.proto import translate_pb2 as pb
from service.proto import translate_pb2_grpc as pb_grpc


def measure(stub: pb_grpc.TranslatorStub, sentence: str, beam: int) -> tuple[float | None, float, int]:
    """(seconds to the first word or None, seconds to the result, tokens of the best hypothesis)."""
    request = pb.TranslateRequest(sentences=[sentence], stream_prefix=True, options=pb.DecodingOptions(beam_size=beam))
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    for msg in stub.TranslateStream(request, timeout=60):
        if msg.HasField("result"):
            tokens = len(msg.result.hypotheses[0].token_ids)
        elif first is None:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started, tokens


def plot(rows: list[dict[str, object]], ratios: dict[int, list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot([ratios[int(str(r["beam"]))] for r in rows])
    ax.set_xticks(range(1, len(rows) + 1), [f"beam {r['beam']}" for r in rows])
    ax.axhline(0.3, color="red", linestyle="--", label="bar: 30%")
    ax.set(ylabel="first word / full latency", title="Streamed prefixes: time to the first word")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", default="", help="extra `rosetta serve` flags")
    p.add_argument("--beams", default="1,4")
    p.add_argument("--sentences", type=int, default=200, help="sentences sent per beam")
    p.add_argument("--min-tokens", type=int, default=20, help="count only translations this long or longer")
    p.add_argument("--data", type=Path, default=TEST_SOURCES)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stream_latency")
    args = p.parse_args(argv)
    sentences = read_sentences(args.data, 1000)
    server = SpawnedServer(args.serve.split())
    rows: list[dict[str, object]] = []
    ratios: dict[int, list[float]] = {}
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            for s in sentences[:20]:  # warm-up
                measure(stub, s, 4)
            for beam in (int(b) for b in args.beams.split(",")):
                firsts, fulls, never = [], [], 0
                for s in sentences[: args.sentences]:
                    first, full, tokens = measure(stub, s, beam)
                    if tokens < args.min_tokens:
                        continue
                    if first is None:  # nothing agreed before the end: the first word came with the result
                        never += 1
                        first = full
                    firsts.append(first)
                    fulls.append(full)
                ratio = sorted(f / t for f, t in zip(firsts, fulls, strict=True))
                ratios[beam] = ratio
                firsts.sort()
                fulls.sort()
                rows.append({"beam": beam, "sentences": len(ratio), "no_prefix": never,
                             "first_word_p50_ms": 1000 * percentile(firsts, 0.5),
                             "full_p50_ms": 1000 * percentile(fulls, 0.5),
                             "ratio_p50": percentile(ratio, 0.5), "ratio_p90": percentile(ratio, 0.9)})
                print(rows[-1], file=sys.stderr, flush=True)
    finally:
        server.stop()
    md = ("| beam | sentences (20+ tokens) | no prefix before the end | first word p50 ms | full p50 ms | "
          "first/full p50 | first/full p90 |\n|---:|---:|---:|---:|---:|---:|---:|\n")
    md += "".join(f"| {r['beam']} | {r['sentences']} | {r['no_prefix']} | {r['first_word_p50_ms']:.1f} | "
                  f"{r['full_p50_ms']:.1f} | {r['ratio_p50']:.2f} | {r['ratio_p90']:.2f} |\n" for r in rows)
    title = (f"TranslateStream with stream_prefix, one call at a time, translations of {args.min_tokens}+ tokens "
             f"among the first {args.sentences} test_2016_flickr sentences ({time.strftime('%Y-%m-%d')})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"{title}\n\n{md}")
    args.out.with_suffix(".json").write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    if plot(rows, ratios, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")
    print(f"\n{title}\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
