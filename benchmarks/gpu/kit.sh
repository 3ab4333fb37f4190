#!/usr/bin/env bash
# Gets a lent GPU machine (the `device` tool, ../shared/docs/GPU.md) what benchmarks/gpu/checks.sh needs,
# within its limit of 64 MiB per call for the working tree and the carried paths together.
#
#   benchmarks/gpu/kit.sh pack      # here, once: .gpu/site.part.* (ONNX Runtime GPU + wheels), .gpu/data
#   benchmarks/gpu/kit.sh slim      # before the device calls: models/ stops travelling with the tree
#   benchmarks/gpu/kit.sh restore   # after them: models/ tracked again, as before
#
# The device image has Python 3.12 and the CPU build of onnxruntime; onnxruntime-gpu is 350 MB unpacked
# (its CUDA provider alone 284 MB) and ~196 MiB compressed, so it travels in pieces on consecutive calls
# while the machine stays warm (ignored files that earlier calls left there stay). The tracked tree is
# ~45 MiB, ~29 MiB of it the shipped model, so `slim` untracks models/ for the calls (and ignores it), and
# the last call carries the two model folders checks.sh uses. The calls, one right after the other:
#   1..N-1: carry [".gpu/site.part.aa"] (then .ab, ...), command `ls -la .gpu`
#   N:      carry [".gpu/site.part.<last>", ".gpu/data", "models/de-en", "models/model_repository/de-en"],
#           command `bash benchmarks/gpu/checks.sh`, timeout_s 590
set -euo pipefail
cd "$(dirname "$0")/../.."
PIECE_MIB=${PIECE_MIB:-60}
EXCLUDE=$(git rev-parse --git-path info/exclude)
HOOK=$(git rev-parse --git-path hooks)/pre-commit
MARK=$(git rev-parse --git-path gpu-kit-hook)  # the hook is ours to remove

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

pins() {  # the versions this checkout runs with here, for the device's Python 3.12
  "$PYTHON" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
               ("onnxruntime-gpu", "protobuf", "grpcio", "grpcio-health-checking", "grpcio-reflection")))
EOF
}

case "${1:-}" in
  pack)
    grep -qx '/.gpu/' "$EXCLUDE" || echo '/.gpu/' >>"$EXCLUDE"
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    # shellcheck disable=SC2046
    "$PYTHON" -m pip install --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --target "$stage/site" $(pins)
    rm -rf .gpu && mkdir -p .gpu/data
    tar -C "$stage/site" -cf - . | zstd -q -19 --long=27 -T0 | split -b "${PIECE_MIB}M" - .gpu/site.part.
    cp ../shared/data/multi30k/{train,val,test_2016_flickr}.{de,en}.gz .gpu/data/
    ls -la .gpu .gpu/data
    echo "pieces: $(ls .gpu/site.part.* | wc -l) (carry one per call, the last with the models and .gpu/data)"
    ;;
  slim)
    git diff --quiet --cached || { echo "commit or unstage your changes first" >&2; exit 1; }
    grep -qx '/models/' "$EXCLUDE" || echo '/models/' >>"$EXCLUDE"
    git rm -r -q --cached models
    if [ ! -e "$HOOK" ]; then  # no commit can drop the model while it is untracked
      mkdir -p "$(dirname "$HOOK")"
      printf '#!/bin/sh\necho "models/ is untracked for the GPU calls: benchmarks/gpu/kit.sh restore first" >&2\nexit 1\n' \
        >"$HOOK"
      chmod +x "$HOOK"
      touch "$MARK"
    fi
    echo "models/ untracked and ignored until 'benchmarks/gpu/kit.sh restore': do not commit in between"
    echo "the tree that travels now: $(git ls-files -z -co --exclude-standard | du --files0-from=- -cb | tail -1 | cut -f1) bytes"
    ;;
  restore)
    sed -i '\#^/models/$#d' "$EXCLUDE"
    git reset -q -- models
    if [ -e "$MARK" ]; then rm -f "$HOOK" "$MARK"; fi
    git status --short models
    ;;
  *)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
