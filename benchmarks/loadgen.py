"""Load generator for a Rosetta server: closed loop at several concurrency levels and open loop at fixed
arrival rates; throughput and p50/p90/p99 latency as a Markdown table, a JSON file and a PNG.

Against a running server:

    python benchmarks/loadgen.py --target 127.0.0.1:50051 --label default

Side by side against servers it starts itself (`rosetta serve` subprocesses, one after the other),
e.g. request batching against a max batch of one:

    python benchmarks/loadgen.py --serve batch64="--max-batch-sentences 64" \\
                                 --serve batch1="--max-batch-sentences 1"

Every request carries `--sentences-per-request` sentences drawn in order from test_2016_flickr (German),
decoded with `--beam-size`. Closed loop: C callers each send their next request when the previous one is
answered. Open loop: requests start on a Poisson schedule at R requests/s whatever the answers do, and
latency is measured from the scheduled start (no coordinated omission); calls refused or failed are
counted, not timed. The first `--warmup-s` seconds of every run are not measured.

The client runs in this process on grpc.aio over `--channels` channels. On a 2-core machine it takes CPU
from the server under test: compare configurations in one run, on one machine, rather than absolute
numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
TEST_SOURCES = REPO.parent / "shared" / "data" / "multi30k" / "test_2016_flickr.de.gz"  # the default sentences
sys.path.insert(0, str(REPO))

from service.proto import translate_pb2 as pb  # noqa: E402
from service.proto import translate_pb2_grpc as pb_grpc  # noqa: E402


@dataclass
class RunResult:
    label: str  # server configuration
    mode: str  # "closed" or "open"
    level: float  # concurrency (closed) or offered requests/s (open)
    duration_s: float
    requests: int  # calls started in the measured window and answered OK (the latency samples)
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> count
    sentences_per_s: float = 0.0  # answered inside the window, per second
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass(frozen=True)
class Sample:
    start: float  # perf_counter when the call was due (open loop: its scheduled time)
    end: float
    code: str  # gRPC status name


def summarize(label: str, mode: str, level: float, window: tuple[float, float], samples: list[Sample],
              sentences_per_request: int) -> RunResult:
    """Throughput: calls answered OK inside the window / its length. Latency: every OK call that started
    inside the window (those finishing after it included). Errors: calls started inside the window."""
    lo, hi = window
    duration = hi - lo
    started = [s for s in samples if lo <= s.start < hi]
    lat = sorted((s.end - s.start) * 1000 for s in started if s.code == "OK")
    done = sum(1 for s in samples if s.code == "OK" and lo <= s.end < hi)
    errors: dict[str, int] = {}
    for s in started:
        if s.code != "OK":
            errors[s.code] = errors.get(s.code, 0) + 1
    return RunResult(label, mode, level, duration, len(lat), errors,
                     sentences_per_s=done * sentences_per_request / duration, requests_per_s=done / duration,
                     p50_ms=percentile(lat, 0.5), p90_ms=percentile(lat, 0.9), p99_ms=percentile(lat, 0.99),
                     mean_ms=sum(lat) / len(lat) if lat else float("nan"))


class Load:
    """Request source and channels for one server."""

    def __init__(self, target: str, sentences: list[str], per_request: int, options: pb.DecodingOptions,
                 model: str, channels: int, timeout_s: float) -> None:
        self.channels = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        self.stubs = [pb_grpc.TranslatorStub(ch) for ch in self.channels]
        self.sentences, self.per_request = sentences, per_request
        self.options, self.model, self.timeout_s = options, model, timeout_s
        self._next = 0

    def request(self) -> tuple[pb_grpc.TranslatorStub, pb.TranslateRequest]:
        i = self._next
        self._next += 1
        start = (i * self.per_request) % len(self.sentences)
        batch = [self.sentences[(start + j) % len(self.sentences)] for j in range(self.per_request)]
        return self.stubs[i % len(self.stubs)], pb.TranslateRequest(sentences=batch, model=self.model,
                                                                    options=self.options)

    async def call(self) -> str:
        stub, req = self.request()
        try:
            await stub.Translate(req, timeout=self.timeout_s)
            return "OK"
        except grpc.aio.AioRpcError as err:
            return err.code().name

    def rewind(self) -> None:
        """Start again from the first sentence, so every level and server sees the same requests."""
        self._next = 0

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


async def closed_loop(load: Load, concurrency: int, duration_s: float,
                      warmup_s: float) -> tuple[list[Sample], tuple[float, float]]:
    """`concurrency` callers, each sending its next call when the previous one is answered, until the
    window ends; returns every call and the measured window."""
    samples: list[Sample] = []
    t0 = time.perf_counter()
    window = (t0 + warmup_s, t0 + warmup_s + duration_s)

    async def caller() -> None:
        while (start := time.perf_counter()) < window[1]:
            code = await load.call()
            samples.append(Sample(start, time.perf_counter(), code))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return samples, window


async def open_loop(load: Load, rate: float, duration_s: float, warmup_s: float,
                    rng: random.Random) -> tuple[list[Sample], tuple[float, float]]:
    """Calls started on a Poisson schedule of `rate` per second until the window ends, whatever the
    answers do; latency counts from the scheduled start (no coordinated omission)."""
    samples: list[Sample] = []
    t0 = time.perf_counter()
    window = (t0 + warmup_s, t0 + warmup_s + duration_s)
    tasks: list[asyncio.Task[None]] = []

    async def one(scheduled: float) -> None:
        code = await load.call()
        samples.append(Sample(scheduled, time.perf_counter(), code))

    next_at = t0
    while next_at < window[1]:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(next_at)))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return samples, window


async def run_suite(label: str, target: str, args: argparse.Namespace, sentences: list[str]) -> list[RunResult]:
    options = pb.DecodingOptions(beam_size=args.beam_size) if args.beam_size else pb.DecodingOptions()
    load = Load(target, sentences, args.sentences_per_request, options, args.model, args.channels, args.timeout_s)
    results = []
    try:
        for _ in range(3):  # first calls pay for connection set-up
            await load.call()
        for c in args.closed:
            load.rewind()
            samples, window = await closed_loop(load, c, args.duration_s, args.warmup_s)
            results.append(summarize(label, "closed", c, window, samples, args.sentences_per_request))
            print(row(results[-1]), flush=True)
        for r in args.rates:
            load.rewind()
            samples, window = await open_loop(load, r, args.duration_s, args.warmup_s, random.Random(args.seed))
            results.append(summarize(label, "open", r, window, samples, args.sentences_per_request))
            print(row(results[-1]), flush=True)
    finally:
        await load.close()
    return results


HEADER = ("| server | mode | level | sent/s | req/s | p50 ms | p90 ms | p99 ms | errors |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---|")


def row(r: RunResult) -> str:
    level = f"C={int(r.level)}" if r.mode == "closed" else f"{r.level:g} req/s"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "-"
    return (f"| {r.label} | {r.mode} | {level} | {r.sentences_per_s:.1f} | {r.requests_per_s:.1f} | "
            f"{r.p50_ms:.0f} | {r.p90_ms:.0f} | {r.p99_ms:.0f} | {errors} |")


def gain_table(results: list[RunResult], baseline: str) -> str:
    """Closed-loop throughput of every server over `baseline`'s, level by level (Markdown)."""
    base = {r.level: r for r in results if r.label == baseline and r.mode == "closed"}
    others = [label for label in dict.fromkeys(r.label for r in results) if label != baseline]
    if not base or not others:
        return ""
    lines = [f"| concurrency | {baseline} sent/s | " + " | ".join(f"{o} sent/s | gain" for o in others) + " |",
             "|---:|---:|" + "---:|---:|" * len(others)]
    for level, b in sorted(base.items()):
        cells = []
        for o in others:
            r = next((x for x in results if x.label == o and x.mode == "closed" and x.level == level), None)
            gain = f"{r.sentences_per_s / b.sentences_per_s:.2f}x" if r and b.sentences_per_s else "-"
            cells.append(f"{r.sentences_per_s:.1f} | {gain}" if r else "- | -")
        lines.append(f"| {int(level)} | {b.sentences_per_s:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return False
    labels = list(dict.fromkeys(r.label for r in results))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for label in labels:
        c = colors[label]
        closed = [r for r in results if r.label == label and r.mode == "closed"]
        opened = [r for r in results if r.label == label and r.mode == "open"]
        if closed:
            axes[0].plot([r.level for r in closed], [r.sentences_per_s for r in closed], "o-", color=c, label=label)
            for q, style in (("p50_ms", "o-"), ("p99_ms", "x--")):
                axes[1].plot([r.level for r in closed], [getattr(r, q) for r in closed], style, color=c,
                             label=f"{label} {q[:3]}")
        if opened:
            for q, style in (("p50_ms", "o-"), ("p90_ms", "s:"), ("p99_ms", "x--")):
                axes[2].plot([r.level for r in opened], [getattr(r, q) for r in opened], style, color=c,
                             label=f"{label} {q[:3]}")
    axes[0].set(title="closed loop: throughput", xlabel="concurrent callers", ylabel="sentences / s", xscale="log")
    axes[1].set(title="closed loop: latency", xlabel="concurrent callers", ylabel="ms", xscale="log", yscale="log")
    axes[2].set(title="open loop: latency", xlabel="offered requests / s", ylabel="ms", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def serve_spec(spec: str) -> tuple[str, list[str]]:
    """A `--serve LABEL="FLAGS"` value: (label, the `rosetta serve` flags)."""
    label, _, flags = spec.partition("=")
    return label, shlex.split(flags)


class SpawnedServer:
    """`rosetta serve --port 0 <flags>`; the address is read from its announcement line."""

    def __init__(self, flags: list[str]) -> None:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "-1", *flags]
        print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.address = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r"gRPC on (\S+:\d+)", line)
            if m:
                self.address = m.group(1)
            if "SERVING" in line or "cannot load" in line:
                print(line.rstrip(), flush=True)
                break
        if "cannot load" in line or not self.address:
            self.stop()
            raise RuntimeError(f"server did not start: {line}")

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:  # type: ignore[type-arg]
    """SIGTERM (the server drains), then SIGKILL if it is still there after `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_sentences(path: Path, limit: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[:limit] if limit else lines


def parse_levels(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="HOST:PORT of a running server")
    p.add_argument("--label", default="server", help="name of the --target server in the results")
    p.add_argument("--serve", action="append", default=[], metavar='LABEL="FLAGS"',
                   help="start `rosetta serve FLAGS` and measure it as LABEL (repeatable; one after the other)")
    p.add_argument("--closed", type=lambda s: parse_levels(s, int), default=[1, 4, 16, 64],
                   help="closed-loop concurrency levels, comma-separated (empty: none)")
    p.add_argument("--rates", type=lambda s: parse_levels(s, float), default=[5.0, 10.0, 20.0, 40.0],
                   help="open-loop arrival rates in requests/s, comma-separated (empty: none)")
    p.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per level")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each level")
    p.add_argument("--sentences-per-request", type=int, default=1)
    p.add_argument("--beam-size", type=int, default=4, help="0: the server's default")
    p.add_argument("--model", default="", help="served model name (default: the server's default)")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--data", type=Path, default=TEST_SOURCES, help="German sentences, one per line")
    p.add_argument("--limit", type=int, default=1000, help="use the first N sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", default="", help="label the gain table compares against (default: the last)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loadgen",
                   help="writes OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)
    if not args.target and not args.serve:
        p.error("give --target HOST:PORT or at least one --serve LABEL=FLAGS")
    sentences = read_sentences(args.data, args.limit)
    results: list[RunResult] = []
    print(HEADER, flush=True)
    if args.target:
        results += asyncio.run(run_suite(args.label, args.target, args, sentences))
    for spec in args.serve:
        label, flags = serve_spec(spec)
        server = SpawnedServer(flags)
        try:
            results += asyncio.run(run_suite(label, server.address, args, sentences))
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(shlex.quote(a) for a in sys.argv), "cpus": os.cpu_count(),
            "sentences_per_request": args.sentences_per_request, "beam_size": args.beam_size,
            "duration_s": args.duration_s, "channels": args.channels}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                                        indent=2) + "\n")
    table = "\n".join([HEADER, *(row(r) for r in results)])
    labels = list(dict.fromkeys(r.label for r in results))
    gains = gain_table(results, args.baseline or labels[-1]) if labels else ""
    if gains:
        print("\n" + gains)
        table += "\n\nClosed-loop throughput against " + (args.baseline or labels[-1]) + ":\n\n" + gains
    args.out.with_suffix(".md").write_text(table + "\n")
    png = args.out.with_suffix(".png")
    if plot(results, png):
        print(f"wrote {png}")
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
