"""The heavy-request attack of the hardening issue, measured: what two short-deadline heavy calls cost the
server in worker time and memory, and whether a good call sent meanwhile is served.

    python benchmarks/heavy_request.py                     # this checkout, the shipped de-en entry
    python benchmarks/heavy_request.py --repo /tmp/before  # another checkout (e.g. a git worktree), same run

Each run starts `rosetta serve` from `--repo`, sends `--calls` concurrent Translate calls of 8 sentences at
beam 16 with min/max decoding length 511/512 and a 3 s deadline (`--deadline-s`), and 0.5 s later a good
call (one sentence, beam 4, 60 s deadline). It samples the server's RSS (VmRSS) every 0.1 s, and reports:
the statuses, the good call's latency, how long the server kept decoding after the deadline (decoder
steps still counted on /metrics), the RSS before, at its peak and 5 s after the calls ended (the
allocator's steady state).
Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadgen import terminate  # noqa: E402  (benchmarks/, on sys.path when run as a script)

from service.proto import translate_pb2 as pb  # noqa: E402
from service.proto import translate_pb2_grpc as pb_grpc  # noqa: E402

SENTENCES = ["Ein Mann fährt mit dem Fahrrad die Straße entlang.", "Zwei Hunde spielen im Schnee.",
             "Eine Frau liest ein Buch im Park.", "Kinder spielen Fußball auf einer Wiese.",
             "Ein Mann in einem roten Hemd kocht.", "Drei Leute sitzen auf einer Bank.",
             "Ein Mädchen springt in einen See.", "Ein Arbeiter repariert eine Straße."]
HEAVY = pb.DecodingOptions(beam_size=16, min_decoding_length=511, max_decoding_length=512)


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def steps(metrics_url: str) -> float:
    body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"rosetta_decoder_step_duration_seconds_count\{[^}]*\} (\S+)",
                                                       body))


def run(repo: Path, calls: int, flags: list[str], deadline_s: float) -> dict[str, object]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", "--model-repository", str(REPO / "models/model_repository"), *flags]
    print("$ (cd " + str(repo) + ") " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    address = metrics = ""
    for line in proc.stdout:
        if m := re.search(r"gRPC on (\S+:\d+).*metrics (http\S+?);?\s", line):
            address, metrics = m.group(1), m.group(2)
        if "SERVING" in line or "cannot" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss_mib(proc.pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(0.5)
    before = rss_mib(proc.pid)
    stub = pb_grpc.TranslatorStub(grpc.insecure_channel(address))
    heavy = [stub.Translate.future(pb.TranslateRequest(sentences=SENTENCES, options=HEAVY), timeout=deadline_s)
             for _ in range(calls)]
    time.sleep(0.5)
    good_started = time.monotonic()
    good = stub.Translate.future(pb.TranslateRequest(sentences=SENTENCES[:1], options=pb.DecodingOptions(beam_size=4)),
                                 timeout=60.0)
    codes = [h.code().name for h in heavy]
    deadline_at = time.monotonic()
    good_code = good.code().name
    good_latency = time.monotonic() - good_started
    # decoding after the deadline: until the decoder-step counter stops moving
    last, still = steps(metrics), time.monotonic()
    while time.monotonic() - still < 1.0 and time.monotonic() - deadline_at < 120:
        time.sleep(0.2)
        now = steps(metrics)
        if now != last:
            last, still = now, time.monotonic()
    busy_after_deadline = max(0.0, still - deadline_at)
    time.sleep(5.0)
    after_idle = rss_mib(proc.pid)
    stop.set()
    sampler.join()
    terminate(proc)
    return {"repo": str(repo), "deadline_s": deadline_s, "heavy_statuses": codes, "good_status": good_code,
            "good_latency_s": round(good_latency, 2), "decoding_after_deadline_s": round(busy_after_deadline, 1),
            "rss_before_mib": round(before), "rss_peak_mib": round(max(r for _, r in samples)),
            "rss_after_idle_mib": round(after_idle)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, action="append", help="checkout(s) to run, in order (default: this one)")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--deadline-s", type=float, default=3.0, help="deadline of the heavy calls")
    parser.add_argument("--server-flag", action="append", default=[], help="extra `rosetta serve` flag")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/heavy_request.json")
    args = parser.parse_args(argv)
    results = [run(repo, args.calls, args.server_flag, args.deadline_s) for repo in (args.repo or [REPO])]
    print("| checkout | heavy calls | good call | good latency s | decoding after deadline s | "
          "RSS before / peak / 5 s after (MiB) |")
    print("|---|---|---|---:|---:|---|")
    for r in results:
        print(f"| {r['repo']} | {', '.join(r['heavy_statuses'])} | {r['good_status']} | {r['good_latency_s']} | "  # type: ignore[arg-type]
              f"{r['decoding_after_deadline_s']} | {r['rss_before_mib']} / {r['rss_peak_mib']} / "
              f"{r['rss_after_idle_mib']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
