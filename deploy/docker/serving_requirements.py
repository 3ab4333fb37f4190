"""Print the serving image's requirements: the core dependencies of pyproject.toml, ONNX Runtime swapped.

    python serving_requirements.py pyproject.toml "onnxruntime==1.31.1" > requirements.txt

pyproject.toml picks onnxruntime-gpu on Linux x86-64 for every install; an image chooses its own build
(CPU: onnxruntime, GPU: onnxruntime-gpu matched to the base image's CUDA major), so every
onnxruntime* line is replaced by the one given. Optional extras (torch: `train`) are never included.
Standard library only (tomllib: Python >= 3.11).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def serving_requirements(pyproject: Path, onnxruntime: str) -> list[str]:
    """Core dependencies of `pyproject`, every onnxruntime* requirement replaced by `onnxruntime`."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    kept = [d for d in deps if not re.match(r"\s*onnxruntime(-gpu)?\b", d)]
    return kept + [onnxruntime]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} PYPROJECT ONNXRUNTIME_REQUIREMENT")
    print("\n".join(serving_requirements(Path(sys.argv[1]), sys.argv[2])))
