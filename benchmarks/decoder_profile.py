"""Where a decoder step's time goes: ONNX Runtime's per-operator profile while the engine translates.

    python benchmarks/decoder_profile.py models/model_repository/de-en/1 --sentences 256 --batch 32

Translates the first --sentences lines of test_2016_flickr (beam 4) with the engine on one thread and
ONNX Runtime's profiler on the decoder session, then prints per decoder call: the session's run time,
the kernels' sum, each operator type (time and node count) and the five slowest GEMM nodes. The
profiler adds its own overhead per node: use it to compare parts of one step, not for throughput.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import service.engine.runtime as runtime
from service.engine import Engine, EngineConfig
from service.options import DecodingOptions

GEMMS = ("Gemm", "MatMul", "FusedGemm", "DynamicQuantizeMatMul", "MatMulInteger")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="rosetta-profile-")
    plain = runtime.session_options

    def profiled(settings: runtime.SessionSettings) -> Any:
        options = plain(settings)
        options.enable_profiling = True
        options.profile_file_prefix = f"{folder}/ort"
        return options

    runtime.session_options = profiled  # type: ignore[assignment]
    engine = Engine.load(args.entry, EngineConfig(provider="cpu", intra_op_threads=1, parallel_batches=1,
                                                  max_batch_sentences=args.batch, max_batch_tokens=1 << 30))
    lines = gzip.open(args.data_dir / "test_2016_flickr.de.gz", "rt", encoding="utf-8").read().splitlines()
    engine.translate_batch(lines[: args.sentences],
                           DecodingOptions(beam_size=args.beam_size, max_decoding_length=256,
                                           max_decoding_length_ratio=0.0))
    events = json.loads(Path(engine.runtime.decoder.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    gemms: collections.Counter[str] = collections.Counter()
    runs, run_us = 0, 0.0
    for e in events:
        if e.get("cat") == "Session" and e["name"] == "model_run":
            runs, run_us = runs + 1, run_us + e["dur"]
        elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            nodes[op] += 1
            if op in GEMMS:
                gemms[e["name"][: -len("_kernel_time")]] += e["dur"]
    print(f"{args.entry}: {runs} decoder calls at batch {args.batch}, beam {args.beam_size}: "
          f"run {run_us / runs:.0f} us/call, kernels {sum(by_op.values()) / runs:.0f} us/call")
    for op, us in by_op.most_common():
        print(f"  {op:34s} {us / runs:8.1f} us/call  ({nodes[op] / runs:.0f} nodes)")
    print("  slowest GEMM nodes:")
    for name, us in gemms.most_common(5):
        print(f"    {name:40s} {us / runs:8.1f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
