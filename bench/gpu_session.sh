#!/usr/bin/env bash
# Every GPU check the open issues ask for, as ONE prepared call on a lent GPU machine (about 9.5 minutes
# at most; each step has its own time limit, so one that hangs cannot cost the rest):
#   1. the GPU code paths on a tiny model (seconds): bench/gpu.py --smoke --device cuda
#   2. the CUDA-only tests: graphs against eager decoding, int8 against bf16, our logits and greedy
#      tokens against transformers on the GPU, int8 compiling nothing after start-up (200 prompt
#      lengths), batched device sampling against the per-row reference, the decode runtime reused
#      across generate() calls, linear rope scaling against transformers
#   3. the serving engine at Llama-2-7B shapes on the paged KV cache (bench/gpu_engine.py): the cache's
#      start-up plan, cold vs cached TTFT, decode at batch 1 and 8, eight editors on one file
#   4. the full bench/gpu.py run: Llama-2-7B shapes, floor, matvec ceiling, ours, int8 (each decode
#      kernel of quantize.DECODE_KERNEL's choices), transformers; the targets as PASS/FAIL lines
#      beside the measured floor and times, repeated at the end of this script's output
# Run from the repository root, e.g. through the device tool:
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
# Each step's output goes to $OUT/<step>.txt (OUT defaults to ./gpu-session-out) and to stdout.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the output, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started))s"
}

# The machine has torch, transformers, safetensors and sentencepiece but not this package.
$PYTHON -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.txt" 2>&1 \
    || { echo "editable install failed (see $OUT/install.txt); using PYTHONPATH"; export PYTHONPATH=$PWD; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
$PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step smoke 60 $PYTHON bench/gpu.py --smoke --device cuda --skip-transformers --int8-kernels compiled
step cuda_tests 170 $PYTHON -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_decode_step.py tests/test_model_parity.py tests/test_int8_no_recompile.py \
    tests/test_sampling_batched.py tests/test_rope_scaling.py
step gpu_engine 130 $PYTHON bench/gpu_engine.py
step gpu_bench 220 $PYTHON bench/gpu.py
echo "=== the issue's targets (bench/gpu.py, beside the measured floor):"
sed -n '/^targets:/,$p' "$OUT/gpu_bench.txt"
