#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 8 minutes on a lent GPU machine:
#   1. the GPU tests (pytest -m gpu);
#   2. bench/train_speed.py and bench/distill_speed.py on CUDA: the share of a step spent waiting for data
#      with 0 loader workers and with the training default (issue 13: under 10% wanted), and one job trained
#      with DDP on all GPUs present (torchrun, NCCL) against one GPU: images/s in total and per GPU;
#   3. bench/latency.py on CUDA: PyTorch CUDA fp32 and fp16, ONNX Runtime's CUDA provider (and TensorRT)
#      where this onnxruntime has them, the fp16 export.
# Results go to bench/results/*_cuda.* (and are copied to $OUT when the machine's runner sets it).
#
# The lent machine has no network and its own torch; the copied tree carries at most 64 MiB of ignored
# paths, so .venv usually does not come along. This script therefore installs nothing: it finds a Python
# that imports torch, says what it found, runs what it can and prints, at the end, what it could not
# measure and why. Exit status 0 when it found CUDA and everything it ran passed, 1 otherwise.
#
#   scripts/gpu_check.sh            # all of it (about 6 minutes on an H200)
#   GPU_CHECK_QUICK=1 scripts/gpu_check.sh   # fewer iterations (about 3 minutes)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}   # stop starting new steps after this many seconds (8-minute limit)
QUICK=${GPU_CHECK_QUICK:-0}
SKIPPED=()
FAILED=()
RAN=()

say() { printf '== %s\n' "$*"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# -- what is here ---------------------------------------------------------------------------------
PY=""
for cand in "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
done
say "machine: $(uname -srm), $(nproc) CPUs"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/== GPU: /'
else
    say "nvidia-smi: not found"
fi
if [ -z "$PY" ]; then
    say "no Python here imports torch: nothing can be measured (this script installs nothing)"
    exit 1
fi
$PY - <<'EOF'
import importlib, sys
print(f"== python: {sys.executable} {sys.version.split()[0]}")
for name in ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "openvino", "pycocotools", "fastapi",
             "pytest", "celery", "sqlalchemy"):
    try:
        m = importlib.import_module(name)
        print(f"== {name}: {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"== {name}: MISSING ({type(e).__name__})")
try:
    import torch
    print(f"== torch CUDA: {torch.cuda.is_available()}" + (f", {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
                                                           if torch.cuda.is_available() else ""))
except Exception:
    pass
try:
    import onnxruntime as ort
    print(f"== onnxruntime providers: {', '.join(ort.get_available_providers())}")
except Exception:
    pass
EOF

has() { $PY -c "import $1" >/dev/null 2>&1; }
cuda_ok=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
ort_cuda=$($PY -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" \
           2>/dev/null || echo 0)
if [ "$cuda_ok" != 1 ]; then
    say "torch sees no CUDA device: the GPU tests and benchmarks cannot run here"
    SKIPPED+=("everything on CUDA: torch.cuda.is_available() is False")
fi

step() {  # step NAME SECONDS_NEEDED COMMAND...
    local name=$1 need=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then
        SKIPPED+=("$name: not started, $(left) s of the time budget left (needs ~$need s)"); return
    fi
    say "$name: $*"
    local t0=$(date +%s)
    if timeout "$(left)" "$@"; then RAN+=("$name ($(( $(date +%s) - t0 )) s)")
    else FAILED+=("$name (exit $?, $(( $(date +%s) - t0 )) s)"); fi
}

if [ "$cuda_ok" = 1 ]; then
    # 1. GPU tests
    if has pytest; then
        step "GPU tests" 60 $PY -m pytest -q -m gpu tests -p no:cacheprovider -x
    else
        SKIPPED+=("GPU tests: pytest is not installed in $PY")
    fi
    # 2. training and distillation step speed
    iters=10; [ "$QUICK" = 1 ] && iters=4
    ngpu=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 1)
    ddp="1"; [ "$ngpu" -gt 1 ] && ddp="1 $ngpu"
    [ "$ngpu" -gt 1 ] || SKIPPED+=("DDP over several GPUs: this machine has $ngpu GPU (the 1-process job row still \
runs through python -m distill train)")
    # shellcheck disable=SC2086  # $ddp is a list of process counts
    step "train_speed cuda (+ DDP on $ngpu GPU(s))" 150 $PY bench/train_speed.py --device cuda --iters "$iters" \
        --batch 8 --workers 0 auto --ddp $ddp
    step "distill_speed cuda" 90 $PY bench/distill_speed.py --device cuda --iters "$iters" --batch 8
    # 3. latency: PyTorch CUDA fp32/fp16 always; ONNX Runtime rows on CUDA only with onnxruntime-gpu
    if has onnx && has onnxruntime; then
        rounds=12; [ "$QUICK" = 1 ] && rounds=6
        step "latency cuda" 150 $PY bench/latency.py --device cuda --fp16 --rounds "$rounds"
        [ "$ort_cuda" = 1 ] || SKIPPED+=("ONNX Runtime on CUDA (fp32, fp16): this onnxruntime has no CUDAExecutionProvider \
(onnxruntime-gpu is not installed); its rows ran on the CPU and are labelled so")
    else
        SKIPPED+=("latency (every ONNX row): onnx/onnxruntime missing in $PY")
    fi
fi

# -- report ---------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp bench/results/*_cuda.* "$OUT/results/" 2>/dev/null
fi
say "took $(( $(date +%s) - START )) s"
for r in "${RAN[@]}"; do say "ran: $r"; done
for s in "${SKIPPED[@]}"; do say "NOT MEASURED: $s"; done
for f in "${FAILED[@]}"; do say "FAILED: $f"; done
[ ${#FAILED[@]} -eq 0 ] && [ "$cuda_ok" = 1 ]
