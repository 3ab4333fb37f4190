#!/usr/bin/env bash
# The GPU checks, run on a lent device machine in the last call of benchmarks/gpu/kit.sh's sequence:
#   1. ONNX Runtime's CUDA provider loads and runs; the `gpu`-marked tests (CUDA provider chosen by really
#      running it, CUDA engine against the CPU engine);
#   2. engine_benchmark.py --device cuda: engine fp32 and fp16 against the PyTorch reference on the same GPU;
#   3. loadgen.py: the decode loop against request-level batches on the GPU (closed C=1 and C=64).
# Everything goes to $OUT (at most 8 files come back): log.txt, engine_benchmark_gpu.{md,json,png},
# loadgen_gpu.{md,json,png}. Each step has its own time limit, in the order of what is owed first.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/rosetta-gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
started=$SECONDS
step() { echo; echo "== $* ($((SECONDS - started)) s)"; }

step "unpack ONNX Runtime GPU and the wheels"
mkdir -p /tmp/site
cat .gpu/site.part.* | zstd -q -d --long=27 | tar -x -C /tmp/site || { echo "pieces missing or broken:"; ls -la .gpu; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ROSETTA_DATA_DIR=$PWD/.gpu/data
# the CUDA 13 and cuDNN libraries of the image's nvidia-* wheels
nvlibs=$(python3 -c 'import nvidia, os; print(" ".join(nvidia.__path__))' 2>/dev/null)
LD_LIBRARY_PATH=$(find $nvlibs -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c 'import onnxruntime as o, torch; print("onnxruntime", o.__version__, o.__file__, o.get_available_providers()); print("torch", torch.__version__, torch.cuda.is_available())'

step "CUDA provider smoke test"
timeout 120 python3 - <<'EOF' || { echo "the CUDA provider does not run: stopping here"; exit 1; }
from service.engine import Engine, EngineConfig
from service.options import DecodingOptions
engine = Engine.load("models/model_repository/de-en/1", EngineConfig(provider="cuda"))
result = engine.translate_batch(["Ein Mann fährt Fahrrad."], DecodingOptions(beam_size=4))[0]
print(engine.provider, result.hypotheses[0].text)
EOF

step "gpu-marked tests"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/service/test_engine.py

step "fp16 entry (the image's torch exports it)"
systems=engine-fp32,pytorch fp16=()
if timeout 120 python3 -m service.cli export models/de-en --out /tmp/gpu-models/de-en-fp16/1 --precision fp16; then
  systems=engine-fp32,engine-fp16,pytorch fp16=(--fp16 /tmp/gpu-models/de-en-fp16/1)
fi

step "engine benchmark on the GPU: $systems"
timeout 240 python3 benchmarks/engine_benchmark.py --device cuda --checkpoint models/de-en \
  --fp32 models/model_repository/de-en/1 --int8 models/model_repository/de-en/1 "${fp16[@]}" \
  --systems "$systems" --data-dir "$ROSETTA_DATA_DIR" --sentences 500 --batch-sizes 32,1 --repeat 2 --out "$OUT"

step "decode loop against request-level batches on the GPU"
timeout 150 python3 benchmarks/loadgen.py --data "$ROSETTA_DATA_DIR/test_2016_flickr.de.gz" \
  --serve batch="--provider cuda --scheduler batch --max-batch-sentences 64" \
  --serve loop="--provider cuda --scheduler loop" \
  --closed 1,64 --rates '' --duration-s 10 --warmup-s 3 --baseline batch --out "$OUT/loadgen_gpu"

step "done"
ls -la "$OUT"
sleep 1  # tee writes the last lines
