"""deploy/docker: the Dockerfiles lint clean, agree with the server's ports and the manifests, keep torch
out, and the build context (.dockerignore) carries what they copy and nothing heavy. No image is built
here (no Docker daemon in CI); the serving entry point is run without torch instead."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.tools import DEPLOY, REPO, tool

DOCKERFILES = {name: DEPLOY / "docker" / f"Dockerfile.{name}" for name in ("cpu", "gpu")}
TRAINING_ONLY = ("torch", "onnx", "onnxscript", "sacrebleu", "safetensors", "matplotlib")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def args_of(path: Path, word: str) -> list[str]:
    return [rest for w, rest in instructions(path) if w == word]


def arg_default(path: Path, name: str) -> str:
    for rest in args_of(path, "ARG"):
        key, _, value = rest.partition("=")
        if key == name and value:
            return value.strip('"')
    raise AssertionError(f"{path.name}: no ARG {name} with a default")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    proc = subprocess.run([tool("hadolint"), str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_multi_stage_with_base_images_as_build_arguments(name: str) -> None:
    path = DOCKERFILES[name]
    froms = args_of(path, "FROM")
    stages: set[str] = set()
    first_from = next(i for i, (w, _) in enumerate(instructions(path)) if w == "FROM")
    global_args = {rest.partition("=")[0] for w, rest in instructions(path)[:first_from] if w == "ARG"}
    for rest in froms:
        image, _, stage = re.sub(r"(?i)\s+as\s+", " AS ", rest).partition(" AS ")
        base = re.fullmatch(r"\$\{(\w+)\}", image)
        assert base and base[1] in global_args or image.split("-$")[0] in {s.split("-")[0] for s in stages}, (
            f"{path.name}: FROM {image} is neither a build argument nor an earlier stage")
        stages.add(stage.strip())
    assert {"build", "runtime"} <= stages and len(froms) >= 3
    assert froms[-1].endswith("AS runtime"), "the last stage is the image"
    copies_from_build = [c for c in args_of(path, "COPY") if c.startswith("--from=build")]
    assert copies_from_build, "the runtime stage takes the virtual environment from the build stage"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_agrees_with_the_server_and_the_manifests(name: str, server_defaults: Any) -> None:
    path = DOCKERFILES[name]
    env = {}
    for rest in args_of(path, "ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    assert int(env["ROSETTA_PORT"]) == server_defaults.port
    assert int(env["ROSETTA_METRICS_PORT"]) == server_defaults.metrics_port
    assert env["ROSETTA_HOST"] == "0.0.0.0"
    assert env["ROSETTA_PROVIDER"] == name.replace("gpu", "cuda")
    exposed = {int(p) for rest in args_of(path, "EXPOSE") for p in rest.split()}
    assert exposed == {server_defaults.port, server_defaults.metrics_port}
    # Models land where the ConfigMap (deploy/k8s/base/rosetta.env) points the server.
    model_copy = [c for c in args_of(path, "COPY") if c.startswith("--from=model ")]
    assert model_copy and model_copy[0].split()[-1] == env["ROSETTA_MODEL_REPOSITORY"]
    base_env = (DEPLOY / "k8s" / "base" / "rosetta.env").read_text()
    assert f"ROSETTA_MODEL_REPOSITORY={env['ROSETTA_MODEL_REPOSITORY']}\n" in base_env
    # Non-root (numeric, so the kubelet can check runAsNonRoot), exec-form entry point `rosetta serve`.
    user = args_of(path, "USER")[-1]
    assert re.fullmatch(r"[1-9]\d*:\d+", user), user
    assert json.loads(args_of(path, "ENTRYPOINT")[-1]) == ["rosetta"]
    assert json.loads(args_of(path, "CMD")[-1]) == ["serve"]
    assert "healthcheck.py" in args_of(path, "HEALTHCHECK")[-1]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_training_dependency_is_installed(name: str) -> None:
    text = DOCKERFILES[name].read_text()
    for rest in args_of(DOCKERFILES[name], "RUN"):
        for pkg in TRAINING_ONLY:
            assert not re.search(rf"pip install[^&;]*\b{pkg}\b", rest), f"{name}: installs {pkg}"
    assert ".[train" not in text and "[train]" not in text
    assert "pip install --no-deps ." in text, "the rosetta package goes in without pulling pyproject's deps"


def test_images_pin_the_same_onnx_runtime_release() -> None:
    cpu = arg_default(DOCKERFILES["cpu"], "ONNXRUNTIME")
    gpu = arg_default(DOCKERFILES["gpu"], "ONNXRUNTIME")
    assert cpu.startswith("onnxruntime==") and gpu.startswith("onnxruntime-gpu==")
    assert cpu.split("==")[1] == gpu.split("==")[1]


def test_gpu_base_image_cuda_matches_the_pinned_onnxruntime_gpu() -> None:
    """onnxruntime-gpu wheels are built for one CUDA major; the image's base must provide that one. Checked
    against the installed wheel when it is the pinned release (the image build re-checks it anyway)."""
    pinned = arg_default(DOCKERFILES["gpu"], "ONNXRUNTIME").split("==")[1]
    try:
        installed = importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here")
    if installed != pinned:
        pytest.skip(f"installed onnxruntime-gpu {installed} is not the pinned {pinned}")
    from onnxruntime.capi import build_and_package_info

    cuda_image = arg_default(DOCKERFILES["gpu"], "CUDA_IMAGE")
    tag = re.search(r":(\d+)\.\d+", cuda_image)
    assert tag and tag[1] == build_and_package_info.cuda_version.split(".")[0], (
        f"{cuda_image} vs onnxruntime-gpu {pinned} built for CUDA {build_and_package_info.cuda_version}")
    assert "cudnn" in cuda_image and "runtime" in cuda_image


def test_serving_requirements_swap_onnx_runtime_and_leave_out_training() -> None:
    sys.path.insert(0, str(DEPLOY / "docker"))
    try:
        from serving_requirements import serving_requirements
    finally:
        sys.path.pop(0)
    reqs = serving_requirements(REPO / "pyproject.toml", "onnxruntime==1.2.3")
    names = [re.split(r"[<>=!~;\s\[]", r, maxsplit=1)[0].lower() for r in reqs]
    assert [r for r in reqs if r.startswith("onnxruntime")] == ["onnxruntime==1.2.3"]
    assert not set(names) & set(TRAINING_ONLY)
    for needed in ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "prometheus-client",
                   "numpy", "tokenizers"):
        assert needed in names


def test_serve_entry_point_runs_without_training_packages() -> None:
    """The image has no torch/onnx: `rosetta serve --help` must not import them (blocked here)."""
    blocker = "; ".join(f"sys.modules[{m!r}] = None" for m in TRAINING_ONLY)
    code = f"import sys; {blocker}; from service.cli import main; sys.exit(main(['serve', '--help']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--drain-grace-s" in proc.stdout


# ---- .dockerignore --------------------------------------------------------------------------------


def glob_regex(pattern: str) -> str:
    """Docker's pattern syntax as a regex: `*` and `?` stay inside one folder, `**` spans folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = glob_regex((raw[1:] if negate else raw).strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "model/config.py", "export/api.py", "service/server/app.py",
    "service/proto/translate_pb2.py", "models/model_repository/de-en/1/manifest.json",
    "models/model_repository/de-en/1/encoder.onnx", "deploy/docker/serving_requirements.py",
    "deploy/docker/healthcheck.py",
])
def test_build_context_keeps_what_the_images_copy(path: str, ignore_patterns: list[str]) -> None:
    assert not docker_ignored(path, ignore_patterns)


@pytest.mark.parametrize("path", [
    "runs/transformer/epoch_1.safetensors", ".venv/bin/python", ".git/HEAD", "tests/conftest.py",
    "benchmarks/load.py", "service/__pycache__/server.cpython-311.pyc", "model/__pycache__/x.pyc",
    "deploy/k8s/base/deployment.yaml", "rosetta.egg-info/PKG-INFO", "models/de-en/tokenizer.json",
])
def test_build_context_leaves_out_checkpoints_environments_and_tests(path: str, ignore_patterns: list[str]) -> None:
    assert docker_ignored(path, ignore_patterns)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copied_source_is_in_the_build_context(name: str, ignore_patterns: list[str]) -> None:
    path = DOCKERFILES[name]
    for rest in args_of(path, "COPY"):
        if rest.startswith("--from="):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            if src.startswith("${"):
                src = arg_default(path, src.strip("${}"))
            probe = src.rstrip("/") + ("/x.py" if src.endswith("/") or "." not in Path(src).name else "")
            assert not docker_ignored(probe, ignore_patterns), f"{name}: COPY {src} is excluded by .dockerignore"
