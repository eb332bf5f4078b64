#!/usr/bin/env bash
# On one CUDA GPU, in about 8 minutes: the GPU tests, then bench.py's step, memory and loader
# figures for vit_b16 at 224 px. Every line it prints is a command and what that command measured;
# the README's GPU rows come from here. Run from the repository root: bash tests/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

step() {
    echo
    echo "\$ $*"
    timeout 150 "$@" 2>&1 | tail -n 25
    echo "(exit ${PIPESTATUS[0]})"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "cpus: $(nproc)"

step python -m pytest -q tests/test_gpu.py
B16="--model vit_b16 --device cuda --precision bf16"
step python tools/bench.py $B16 --batch-size 256 --steps 10 --compile --compare xclip clip nclip
step python tools/bench.py $B16 --batch-size 256 --steps 10 --compare xclip
step python tools/bench.py $B16 --loss xclip --largest-batch
step python tools/bench.py $B16 --loss xclip --largest-batch --grad-checkpointing
WORKERS=$(( $(nproc) - 2 ))
step python tools/bench.py --loader --jpeg-shards --model vit_b16 --batch-size 256 --workers 8
step python tools/bench.py --loader --jpeg-shards --model vit_b16 --batch-size 256 --workers $WORKERS
