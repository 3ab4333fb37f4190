"""ExportConfig: how one model-repository entry is exported. Torch- and onnx-free, so the CLI and
export/evaluate.py read it without importing the exporter (export/api.py imports evaluate, not back)."""

from __future__ import annotations

from dataclasses import dataclass

from export.manifest import PRECISIONS
from service.engine.cpu import INT8_FORMS


@dataclass(frozen=True)
class ExportConfig:
    """How one entry is exported. Built by the CLI (flags with ROSETTA_ env twins) or by callers."""

    precision: str = "fp32"  # "fp32", "fp16" (K/V and weights half; log_probs stay fp32) or "int8" (dynamic)
    name: str = ""  # entry name in the manifest; "" takes the parent folder's name (model_repository/NAME/..)
    version: str = ""  # entry version; "" takes the output folder's name (model_repository/NAME/VERSION)
    source_lang: str = "de"
    target_lang: str = "en"
    optimize: bool = True  # run the exporter's graph optimiser (folding, CSE, dead code); see export/README.md
    check: bool = False  # run the parity check against PyTorch after export; raise ParityError on failure
    evaluate_dir: str = ""  # Multi30k folder: if set, measure BLEU on test_2016_flickr into the manifest
    evaluate_sentences: int = 0  # evaluate on the first N test sentences (0: all 1000)
    reference_entry: str = ""  # an fp32 entry to compare quality against ("vs_fp32"); "" when none
    # int8 only: "avx2" (7-bit weights, right on any x86), "vnni" (full 8-bit, for VNNI/AMX CPUs), or
    # "auto": the form right for the machine that exports (service/engine/cpu.py)
    int8_form: str = "avx2"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.int8_form not in (*INT8_FORMS, "auto"):
            raise ValueError(f"int8_form must be one of {(*INT8_FORMS, 'auto')}, got {self.int8_form!r}")
