"""Soak benchmark: a Rosetta server under a mix of good, bad, malformed, short-deadline and cancelled calls.

Starts `rosetta serve` as a subprocess, sends `--requests` calls from `--concurrency` callers and checks
that every call is answered with a documented status, that nothing is lost (calls sent = sum of the
statuses received = the server's `rosetta_requests_total`), and how the server's RSS moves during the
burst and after it. Not a test: it writes a report.

    python benchmarks/soak.py                      # 10,000 calls, 64 callers, shipped de-en model
    python benchmarks/soak.py --requests 300 --concurrency 16 \\
        --model-repository /work/tiny/model_repository --models tiny/1 --out /tmp/soak

The calls follow a seeded mix (`--mix`, `--seed`), drawn up front, so every run sends the same calls in
the same order; which caller sends which call is up to timing. Kinds and what each may be answered:

    good       1-4 sentences of multi30k val (German), beam 1-5, 30 s deadline
               -> OK (RESOURCE_EXHAUSTED when the queue is full)
    bad        one broken field (beam 0 or 1000, length_penalty 300 or NaN, num_hypotheses > beam, no
               sentences, unknown model, a 1 MB model name, a sentence over max_input_bytes)
               -> INVALID_ARGUMENT, NOT_FOUND for the unknown model
    malformed  a body that is not a TranslateRequest (garbage bytes, invalid UTF-8 in a string field)
               -> INVALID_ARGUMENT
    deadline   8 sentences, beam 16, min/max_decoding_length 200/210, 0.3 s deadline
               -> DEADLINE_EXCEEDED (INVALID_ARGUMENT if the server's cost bounds refuse it)
    cancelled  4 sentences, beam 8, min_decoding_length 100, cancelled by the client after 20-100 ms
               -> CANCELLED (OK when it finished first)

Writes OUT.json (every number, the command line, the CPU's vector extensions), OUT.md (the tables) and
OUT.png (server RSS over time with the phases, statuses per kind). Exits 1 when a call got a status
outside {OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE} (CANCELLED
only for the cancelled kind), when calls were lost, or when the server died; `--strict` also fails on a
status that is documented but not the one expected for its kind (e.g. a bad request answered OK).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from loadgen import percentile, read_sentences, terminate  # noqa: E402

from service.proto import translate_pb2 as pb  # noqa: E402
from service.proto import translate_pb2_grpc as pb_grpc  # noqa: E402

TRANSLATE = "/rosetta.v1.Translator/Translate"
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
CODES = ["OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED",
         "UNAVAILABLE"]  # table columns, in this order; anything else goes to "other"
KINDS = ("good", "bad", "malformed", "deadline", "cancelled")
DEFAULT_MIX = "good=55,bad=15,malformed=5,deadline=10,cancelled=15"
GOOD_TIMEOUT_S = 30.0
DEADLINE_TIMEOUT_S = 0.3
CANCEL_AFTER_S = (0.020, 0.100)

# variant -> statuses it may get; the kind's first variant is listed first
EXPECTED: dict[str, set[str]] = {
    "good": {"OK", "RESOURCE_EXHAUSTED"},
    "beam_zero": {"INVALID_ARGUMENT"},
    "beam_1000": {"INVALID_ARGUMENT"},
    "length_penalty_300": {"INVALID_ARGUMENT"},
    "length_penalty_nan": {"INVALID_ARGUMENT"},
    "nbest_over_beam": {"INVALID_ARGUMENT"},
    "no_sentences": {"INVALID_ARGUMENT"},
    "unknown_model": {"NOT_FOUND"},
    "model_name_1mb": {"INVALID_ARGUMENT"},
    "sentence_5000_bytes": {"INVALID_ARGUMENT"},
    "garbage": {"INVALID_ARGUMENT"},
    "bad_utf8": {"INVALID_ARGUMENT"},
    "heavy_0.3s": {"DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "cancel": {"CANCELLED", "OK", "RESOURCE_EXHAUSTED"},
}
VARIANTS = {
    "good": ["good"],
    "bad": ["beam_zero", "beam_1000", "length_penalty_300", "length_penalty_nan", "nbest_over_beam",
            "no_sentences", "unknown_model", "model_name_1mb", "sentence_5000_bytes"],
    "malformed": ["garbage", "bad_utf8"],
    "deadline": ["heavy_0.3s"],
    "cancelled": ["cancel"],
}


# ---------------------------------------------------------------------------------------------------------
# The plan: which calls, in which order


@dataclass(frozen=True)
class Spec:
    """One planned call; the request itself is built when it is sent (a 1 MB model name is not kept)."""

    index: int
    kind: str
    variant: str
    seed: int  # drives the sentences and options of this call


def plan(n: int, mix: dict[str, float], seed: int) -> list[Spec]:
    rng = random.Random(seed)
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    weights = [mix[k] for k in kinds]
    out = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        out.append(Spec(i, kind, rng.choice(VARIANTS[kind]), rng.getrandbits(32)))
    return out


@dataclass(frozen=True)
class Call:
    request: pb.TranslateRequest | bytes  # bytes: sent as they are (malformed kind)
    timeout_s: float
    cancel_after_s: float | None = None


def build(spec: Spec, sentences: list[str]) -> Call:
    rng = random.Random(spec.seed)

    def some(k: int) -> list[str]:
        start = rng.randrange(len(sentences))
        return [sentences[(start + j) % len(sentences)] for j in range(k)]

    v = spec.variant
    if v == "good":
        return Call(pb.TranslateRequest(sentences=some(rng.randint(1, 4)),
                                        options=pb.DecodingOptions(beam_size=rng.randint(1, 5))), GOOD_TIMEOUT_S)
    if v == "heavy_0.3s":
        opts = pb.DecodingOptions(beam_size=16, min_decoding_length=200, max_decoding_length=210)
        return Call(pb.TranslateRequest(sentences=some(8), options=opts), DEADLINE_TIMEOUT_S)
    if v == "cancel":
        opts = pb.DecodingOptions(beam_size=8, min_decoding_length=100)
        return Call(pb.TranslateRequest(sentences=some(4), options=opts), GOOD_TIMEOUT_S,
                    cancel_after_s=rng.uniform(*CANCEL_AFTER_S))
    if v == "garbage":
        return Call(b"\xff\xff\xff", GOOD_TIMEOUT_S)
    if v == "bad_utf8":
        return Call(b"\x0a\x03\xff\xfe\xfd", GOOD_TIMEOUT_S)  # field 1 (sentences), 3 bytes of invalid UTF-8
    req = pb.TranslateRequest(sentences=some(rng.randint(1, 2)))
    o = req.options
    if v == "beam_zero":
        o.beam_size = 0
    elif v == "beam_1000":
        o.beam_size = 1000
    elif v == "length_penalty_300":
        o.length_penalty = 300.0
    elif v == "length_penalty_nan":
        o.length_penalty = math.nan
    elif v == "nbest_over_beam":
        o.beam_size, o.num_hypotheses = 2, 5
    elif v == "no_sentences":
        del req.sentences[:]
    elif v == "unknown_model":
        req.model = "no-such-model/9"
    elif v == "model_name_1mb":
        req.model = "m" * (1 << 20)
    elif v == "sentence_5000_bytes":
        long = " ".join(some(1))
        while len(long.encode()) <= 5000:
            long += " " + long
        req.sentences[0] = long
    else:
        raise ValueError(f"unknown variant {v}")
    return Call(req, GOOD_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------------
# The callers


@dataclass(frozen=True)
class Outcome:
    kind: str
    variant: str
    code: str  # gRPC status name, or CLIENT_ERROR:<exception> when the client itself failed
    start_s: float  # since the burst started
    latency_s: float


async def send(stub: pb_grpc.TranslatorStub, raw: grpc.aio.UnaryUnaryMultiCallable, call: Call) -> str:
    """The status the call ended with; cancels it after `call.cancel_after_s` when set."""
    invoke = raw if isinstance(call.request, bytes) else stub.Translate
    try:
        if call.cancel_after_s is None:
            await invoke(call.request, timeout=call.timeout_s)
            return "OK"
        pending = invoke(call.request, timeout=call.timeout_s)
        await asyncio.sleep(call.cancel_after_s)
        pending.cancel()  # no effect when the call already ended: its own status is kept
        return (await pending.code()).name
    except grpc.aio.AioRpcError as err:
        return err.code().name


async def burst(target: str, specs: list[Spec], sentences: list[str], concurrency: int, channels: int,
                progress: bool) -> tuple[list[Outcome], dict[str, int], float]:
    """`concurrency` callers taking the next planned call until none is left; (outcomes, calls sent per
    kind, wall seconds)."""
    from tqdm import tqdm

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)]
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    stubs = [pb_grpc.TranslatorStub(ch) for ch in chans]
    raws = [ch.unary_unary(TRANSLATE) for ch in chans]  # no serializer: the request is raw bytes
    for ch in chans:
        await asyncio.wait_for(ch.channel_ready(), 30)
    outcomes: list[Outcome] = []
    sent: collections.Counter[str] = collections.Counter()
    queue = iter(specs)
    t0 = time.perf_counter()
    bar = tqdm(total=len(specs), desc="soak", unit="call", file=sys.stderr, disable=not progress)

    async def caller(c: int) -> None:
        for spec in queue:  # one shared iterator: each caller takes the next planned call
            call = build(spec, sentences)
            sent[spec.kind] += 1
            start = time.perf_counter()
            try:
                code = await send(stubs[c % channels], raws[c % channels], call)
            except Exception as err:  # noqa: BLE001  # the client failed, not the server: count it, go on
                code = f"CLIENT_ERROR:{type(err).__name__}"
            end = time.perf_counter()
            outcomes.append(Outcome(spec.kind, spec.variant, code, start - t0, end - start))
            bar.update(1)

    try:
        await asyncio.gather(*(caller(c) for c in range(concurrency)))
    finally:
        bar.close()
        for ch in chans:
            await ch.close()
    return outcomes, dict(sent), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# The server: subprocess, log, RSS, /metrics


class Server:
    """`rosetta serve --port 0 --metrics-port 0 <flags>`; addresses read from its announcement lines. Its
    output is drained on a thread for the whole run (a full pipe would block the server's logging)."""

    def __init__(self, flags: list[str], start_timeout_s: float = 300.0) -> None:
        self.cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                    "--metrics-port", "0", *flags]
        print("$ " + " ".join(shlex.quote(c) for c in self.cmd[1:]), flush=True)
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
        self.address = self.metrics_url = ""
        self.log: collections.deque[str] = collections.deque(maxlen=400)
        self.log_lines = 0
        self.error_lines: list[str] = []  # lines that look like an error or a traceback (first 50)
        self._ready = threading.Event()
        self._failed = ""
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout_s) or self._failed or not self.address:
            self.stop()
            raise RuntimeError(f"server did not start: {self._failed or 'timeout'}\n" + "\n".join(self.log))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip()
            self.log.append(line)
            self.log_lines += 1
            if re.search(r"ERROR|CRITICAL|Traceback|Exception", line) and len(self.error_lines) < 50:
                self.error_lines.append(line)
            if not self._ready.is_set():
                if m := re.search(r"gRPC on (\S+:\d+)", line):
                    self.address = m.group(1)
                if m := re.search(r"metrics (http://\S+/metrics)", line):
                    self.metrics_url = m.group(1)
                if "SERVING" in line:
                    print(line, flush=True)
                    self._ready.set()
                elif "cannot" in line:
                    self._failed = line
                    self._ready.set()
        self._ready.set()  # the process ended

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, then wait for the drain; (exit status, seconds it took)."""
        t0 = time.perf_counter()
        terminate(self.proc)
        self._reader.join(5)
        return self.proc.returncode, time.perf_counter() - t0


def read_rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB, from /proc/PID/status; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    return int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0))


class RssSampler:
    """VmRSS/VmHWM of one process every `interval_s` on a thread, each sample tagged with the phase."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.phase = "start"
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, str, int, int]] = []  # (s since t0, phase, rss KiB, hwm KiB)
        self.marks: list[tuple[float, str]] = [(0.0, "start")]  # (s since t0, phase that begins)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def sample(self) -> tuple[int, int]:
        rss, hwm = read_rss_kb(self.pid)
        self.samples.append((time.perf_counter() - self.t0, self.phase, rss, hwm))
        return rss, hwm

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.marks.append((time.perf_counter() - self.t0, phase))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def scrape(url: str) -> dict[str, dict[str, float]]:
    """From /metrics: requests by code, dropped sentences by reason, and the in-flight/queue gauges, each
    summed over models."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {"requests": {}, "dropped": {}, "in_flight": {}, "queue_depth": {}}
    wanted = {"rosetta_requests_total": ("requests", "code"),
              "rosetta_dropped_sentences_total": ("dropped", "reason"),
              "rosetta_requests_in_flight": ("in_flight", "model"),
              "rosetta_queue_depth_sentences": ("queue_depth", "model")}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                key, label = wanted[s.name]
                name = s.labels.get(label, "")
                out[key][name] = out[key].get(name, 0.0) + s.value
    return out


def minus(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in after.items() if round(v - before.get(k, 0.0))}


# ---------------------------------------------------------------------------------------------------------
# Report


@dataclass
class KindReport:
    kind: str
    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)  # documented, but not expected for this kind
    p50_ms: float = float("nan")  # over every answer of the kind, whatever its status
    p99_ms: float = float("nan")
    ok_p50_ms: float = float("nan")  # OK answers only
    ok_p99_ms: float = float("nan")


def report_by(outcomes: list[Outcome], key: str, sent: dict[str, int] | None) -> list[KindReport]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(getattr(o, key), []).append(o)
    order = list(KINDS) if key == "kind" else [v for k in KINDS for v in VARIANTS[k]]
    reports = []
    for name in [g for g in order if g in groups or (sent and g in sent)]:
        group = groups.get(name, [])
        lat = sorted(o.latency_s * 1000 for o in group)
        ok = sorted(o.latency_s * 1000 for o in group if o.code == "OK")
        r = KindReport(name, sent.get(name, 0) if sent else len(group),
                       dict(collections.Counter(o.code for o in group)),
                       dict(collections.Counter(o.code for o in group if o.code not in EXPECTED[o.variant])),
                       percentile(lat, 0.5), percentile(lat, 0.99), percentile(ok, 0.5), percentile(ok, 0.99))
        reports.append(r)
    return reports


def _cell(v: int) -> str:
    return str(v) if v else "-"


def kind_table(reports: list[KindReport], total: KindReport) -> str:
    head = ("| kind | sent | " + " | ".join(CODES) + " | other | answered | p50 ms | p99 ms |\n"
            "|---|---:|" + "---:|" * len(CODES) + "---|---:|---:|---:|")
    lines = [head]
    for r in [*reports, total]:
        other = ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items()) if k not in CODES) or "-"
        name = f"**{r.kind}**" if r is total else r.kind
        lines.append(f"| {name} | {r.sent} | " + " | ".join(_cell(r.statuses.get(c, 0)) for c in CODES)
                     + f" | {other} | {sum(r.statuses.values())} | {r.p50_ms:.0f} | {r.p99_ms:.0f} |")
    return "\n".join(lines)


def variant_table(reports: list[KindReport]) -> str:
    lines = ["| variant | expected | sent | statuses | p50 ms | p99 ms |", "|---|---|---:|---|---:|---:|"]
    for r in reports:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r.kind} | {' / '.join(sorted(EXPECTED[r.kind]))} | {r.sent} | {statuses} | "
                     f"{r.p50_ms:.0f} | {r.p99_ms:.0f} |")
    return "\n".join(lines)


def counter_table(client: dict[str, int], server: dict[str, int]) -> str:
    lines = ["| code | client | server | server - client |", "|---|---:|---:|---:|"]
    def order(code: str) -> tuple[int, str]:
        return (CODES.index(code), "") if code in CODES else (len(CODES), code)

    for code in sorted(set(client) | set(server), key=order):
        c, s = client.get(code, 0), server.get(code, 0)
        lines.append(f"| {code} | {c} | {s} | {s - c:+d} |")
    c, s = sum(client.values()), sum(server.values())
    lines.append(f"| **all** | {c} | {s} | {s - c:+d} |")
    return "\n".join(lines)


def rss_table(rss: dict[str, float]) -> str:
    return ("| start MiB | peak MiB (VmHWM) | end of run MiB | after idle MiB |\n|---:|---:|---:|---:|\n"
            f"| {rss['start_mib']:.0f} | {rss['peak_mib']:.0f} | {rss['end_of_run_mib']:.0f} | "
            f"{rss['after_idle_mib']:.0f} |")


def cpu_info() -> dict[str, object]:
    """The CPU model and the vector extensions ONNX Runtime's kernels can use (lscpu, else /proc/cpuinfo)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    if "Flags" not in text:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    flags = set(re.findall(r"^flags\s*:\s*(.*)$", text, re.M | re.I)[0].split()) if re.search(
        r"^flags\s*:", text, re.M | re.I) else set()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M | re.I)
    return {"model": model.group(1).strip() if model else "", "cpus": os.cpu_count(),
            "AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags,
            "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags), "AMX": "amx_tile" in flags,
            "flags": sorted(f for f in flags if re.match(r"avx|amx|fma|f16c", f))}


def git_commit() -> dict[str, object]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def plot(sampler: RssSampler, outcomes: list[Outcome], kinds: list[KindReport], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 2]})
    samples = sorted(sampler.samples)
    t = [s[0] for s in samples]
    ax.plot(t, [s[2] / 1024 for s in samples], ".-", color="C0", label="VmRSS")
    ax.plot(t, [s[3] / 1024 for s in samples], "--", color="C0", alpha=0.5, label="VmHWM (peak)")
    marks = dict((phase, at) for at, phase in sampler.marks)
    for (phase, color), end in zip((("burst", "C1"), ("idle", "C2")), ("idle", "end"), strict=True):
        if phase in marks and end in marks:
            ax.axvspan(marks[phase], marks[end], color=color, alpha=0.12, label=phase)
    ax.set(title="server memory", xlabel="s since the server was ready", ylabel="MiB")
    ax.set_ylim(bottom=0)
    if outcomes and "burst" in marks:
        ends = [marks["burst"] + o.start_s + o.latency_s for o in outcomes]
        tx = ax.twinx()
        tx.hist(ends, bins=max(1, math.ceil(max(ends))), range=(0, max(1, math.ceil(max(ends)))),
                histtype="step", color="C3", alpha=0.7, label="answers / s")
        tx.set_ylabel("answers / s")
        tx.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    names = [k.kind for k in kinds]
    codes = [c for c in CODES if any(k.statuses.get(c) for k in kinds)]
    others = sorted({c for k in kinds for c in k.statuses if c not in CODES})
    bottom = [0] * len(kinds)
    for i, code in enumerate(codes + others):
        values = [k.statuses.get(code, 0) for k in kinds]
        bx.bar(names, values, bottom=bottom, label=code, color=f"C{i}" if code in CODES else "black")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    bx.set(title="status per kind", ylabel="calls")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {name!r}; kinds: {', '.join(KINDS)}")
        mix[name.strip()] = float(weight)
    if not any(w > 0 for w in mix.values()):
        raise argparse.ArgumentTypeError("every weight is 0")
    return mix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10000, help="calls in all")
    p.add_argument("--concurrency", type=int, default=64, help="callers, each with one call in flight")
    p.add_argument("--channels", type=int, default=8, help="gRPC channels the callers share")
    p.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                   help=f"weights of the kinds (default {DEFAULT_MIX})")
    p.add_argument("--seed", type=int, default=0, help="seeds the plan of calls")
    p.add_argument("--model-repository", default="models/model_repository")
    p.add_argument("--models", "--entry", dest="models", default="de-en", help="NAME or NAME/VERSION to serve")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="extra `rosetta serve` flag, e.g. --server-arg=--workers=2 (repeatable)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k" / "val.de.gz",
                   help="German sentences, one per line (gzip or plain)")
    p.add_argument("--rss-interval-s", type=float, default=0.5)
    p.add_argument("--idle-s", type=float, default=5.0, help="idle time after the burst before the last RSS read")
    p.add_argument("--settle-s", type=float, default=10.0,
                   help="how long to wait for the server's counters to reach the calls sent")
    p.add_argument("--max-rss-mib", type=float, default=0.0, help="fail when the peak RSS is above this (0: off)")
    p.add_argument("--strict", action="store_true",
                   help="also fail on a documented status that is not expected for its kind")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak",
                   help="writes OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)

    sentences = read_sentences(args.data, 0)
    specs = plan(args.requests, args.mix, args.seed)
    server = Server(["--model-repository", args.model_repository, "--models", args.models, *args.server_arg])
    sampler = RssSampler(server.pid, args.rss_interval_s)
    failures: list[str] = []
    try:
        start_rss, _ = sampler.sample()
        sampler.start()
        before = scrape(server.metrics_url)
        sampler.enter("burst")
        outcomes, sent, wall_s = asyncio.run(burst(server.address, specs, sentences, args.concurrency,
                                                   args.channels, not args.no_progress))
        end_rss, _ = sampler.sample()
        sampler.enter("idle")
        time.sleep(args.idle_s)
        idle_rss, peak_hwm = sampler.sample()
        sampler.enter("end")
        sampler.stop()
        alive = server.alive()
        client_codes = dict(collections.Counter(o.code for o in outcomes))
        after = before
        deadline = time.monotonic() + args.settle_s
        while alive:  # the server records a status after the client has it: let the counters catch up
            after = scrape(server.metrics_url)
            if sum(minus(after["requests"], before["requests"]).values()) >= len(specs) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    finally:
        sampler.stop()
        exit_status, drain_s = server.stop()

    server_codes = minus(after["requests"], before["requests"])
    dropped = minus(after["dropped"], before["dropped"])
    kinds = report_by(outcomes, "kind", sent)
    variants = report_by(outcomes, "variant", None)
    total_r = KindReport("all", sum(sent.values()), client_codes, {},
                         *(percentile(sorted(o.latency_s * 1000 for o in outcomes), q) for q in (0.5, 0.99)))
    mib = 1 / 1024
    rss = {"start_mib": start_rss * mib, "peak_mib": peak_hwm * mib, "end_of_run_mib": end_rss * mib,
           "after_idle_mib": idle_rss * mib,
           "max_sampled_mib": max((s[2] for s in sampler.samples), default=0) * mib}

    # Verdict
    n_sent, n_answered = sum(sent.values()), len(outcomes)
    if n_sent != n_answered or n_sent != len(specs):
        failures.append(f"lost calls: planned {len(specs)}, sent {n_sent}, answered {n_answered}")
    for o in outcomes:
        allowed = DOCUMENTED | ({"CANCELLED"} if o.kind == "cancelled" else set())
        if o.code not in allowed:
            failures.append(f"{o.kind}/{o.variant} answered {o.code}")
    unexpected = {r.kind: r.unexpected for r in variants if r.unexpected}
    if args.strict and unexpected:
        failures.append(f"statuses not expected for their kind: {unexpected}")
    if not alive:
        failures.append(f"the server died during the run (exit status {server.proc.returncode})")
    if args.max_rss_mib and rss["peak_mib"] > args.max_rss_mib:
        failures.append(f"peak RSS {rss['peak_mib']:.0f} MiB is above --max-rss-mib {args.max_rss_mib:g}")
    failures = list(dict.fromkeys(failures))  # one line per distinct failure
    counters_match = server_codes == client_codes

    md = "\n\n".join([
        f"{n_sent} calls, {args.concurrency} callers, {wall_s:.1f} s ({n_answered / wall_s:.1f} answers/s); "
        f"model {args.models}; mix {', '.join(f'{k}={v:g}' for k, v in args.mix.items())}; seed {args.seed}",
        kind_table(kinds, total_r),
        variant_table(variants),
        "Server counters (`rosetta_requests_total` by code, this run only) against the client:\n\n"
        + counter_table(client_codes, server_codes),
        "Dropped sentences (`rosetta_dropped_sentences_total` by reason): "
        + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"),
        "Server RSS:\n\n" + rss_table(rss),
    ])
    print("\n" + md)
    if server.error_lines:
        print(f"\nserver log: {len(server.error_lines)} error-looking lines, first: {server.error_lines[0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": {"command": " ".join(shlex.quote(a) for a in sys.argv), "server_command": server.cmd[1:],
                 "cpu": cpu_info(), "git": git_commit(), "requests": args.requests, "concurrency": args.concurrency,
                 "channels": args.channels, "mix": args.mix, "seed": args.seed, "models": args.models,
                 "model_repository": args.model_repository, "server_args": args.server_arg,
                 "timeouts_s": {"good": GOOD_TIMEOUT_S, "deadline": DEADLINE_TIMEOUT_S},
                 "cancel_after_s": CANCEL_AFTER_S, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "wall_s": wall_s, "answers_per_s": n_answered / wall_s,
        "totals": {"planned": len(specs), "sent": n_sent, "answered": n_answered,
                   "client_statuses": client_codes, "server_statuses": server_codes,
                   "server_minus_client": {c: server_codes.get(c, 0) - client_codes.get(c, 0)
                                           for c in set(client_codes) | set(server_codes)},
                   "counters_match": counters_match, "dropped_sentences": dropped,
                   "in_flight_after": after["in_flight"], "queue_depth_after": after["queue_depth"]},
        "kinds": [asdict(r) for r in kinds], "variants": [asdict(r) for r in variants],
        "unexpected_for_kind": unexpected,
        "rss": rss, "rss_phases_s": {phase: round(at, 3) for at, phase in sampler.marks},
        "rss_samples": [{"t_s": round(t, 3), "phase": ph, "rss_kib": r, "hwm_kib": h}
                        for t, ph, r, h in sorted(sampler.samples)],
        "server": {"exit_status": exit_status, "drain_s": drain_s, "alive_after_run": alive,
                   "log_lines": server.log_lines, "error_lines": server.error_lines,
                   "log_tail": list(server.log)[-40:]},
        "failures": failures, "passed": not failures,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n")
    png = args.out.with_suffix(".png")
    if plot(sampler, outcomes, kinds, png):
        print(f"wrote {png}")
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    if not counters_match:
        print("note: the server's counters differ from the client's (see the table); not a failure by itself")
    if unexpected:
        print(f"note: statuses not expected for their kind: {unexpected}")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
