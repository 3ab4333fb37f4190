"""`rosetta export CHECKPOINT --out model_repository/NAME/VERSION`: registered by service/cli.py.

Imports nothing heavy at import time (torch, onnx load inside the handler), so `rosetta serve`
never pays for the export side.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `export` subcommand to the `rosetta` parser."""
    from export.config import ExportConfig  # torch- and onnx-free
    from export.manifest import PRECISIONS
    from service.cli import ENV_PREFIX, _parse_bool, add_dataclass_flags

    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (encoder.onnx + decoder.onnx + manifest) (needs the train extra)",
        description="Write one model-repository entry. Each precision is its own entry, e.g. "
        "model_repository/de-en/1 (fp32), model_repository/de-en-int8/1 (int8), model_repository/de-en-fp16/1.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors, config.json, tokenizer.json)")
    p.add_argument("--out", required=True, help="entry folder, model_repository/NAME/VERSION")
    env = os.environ
    p.add_argument("--precision", choices=PRECISIONS, default=env.get(ENV_PREFIX + "PRECISION", "fp32"),
                   help="fp32; fp16 (GPU: half weights and K/V, fp32 log_probs); int8 (CPU: dynamic "
                   "quantization). Use one entry NAME per precision. (env ROSETTA_PRECISION)")
    p.add_argument("--check", action="store_true", default=_parse_bool(env.get(ENV_PREFIX + "CHECK", "0")),
                   help="run the ORT-vs-PyTorch parity check; exit 1 loudly if it fails (env ROSETTA_CHECK)")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   default=_parse_bool(env.get(ENV_PREFIX + "OPTIMIZE", "1")),
                   help="skip the exporter's graph optimiser (env ROSETTA_OPTIMIZE=0)")
    add_dataclass_flags(p, ExportConfig, skip=("precision", "check", "optimize"))
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    missing = [m for m in ("torch", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"rosetta export needs {', '.join(missing)}: install the train extra, e.g.\n"
              "    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\n"
              "    pip install -e '.[train]'\n"
              "Serving needs none of this: it loads an exported entry (model_repository/NAME/VERSION).",
              file=sys.stderr)
        return 2
    from export.api import ExportConfig, export_entry
    from export.parity import ParityError
    from service.cli import build_dataclass
    from service.signature import SignatureMismatch

    cfg: ExportConfig = build_dataclass(ExportConfig, args)
    try:
        out = export_entry(args.checkpoint, args.out, cfg)
    except (ParityError, SignatureMismatch) as err:
        print(f"\nEXPORT CHECK FAILED: {err}\n", file=sys.stderr)
        return 1
    from export.manifest import read_manifest

    manifest = read_manifest(out)
    summary = {k: manifest.get(k) for k in ("name", "version", "precision", "export_seconds", "timings", "quality")}
    if "parity" in manifest:
        summary["parity"] = {k: v for k, v in manifest["parity"].items() if k != "greedy_step_max_abs_diff"}
    print(json.dumps({"entry": str(out), **summary}, indent=2))
    return 0
