#!/usr/bin/env bash
# One device check of lora-fast on a CUDA GPU (an H100/H200 image: python3 3.12, torch, triton, transformers, peft,
# no network). Run from the repository root:
#
#     bash bench/device_check.sh              # on the GPU machine; results under $OUT (./device_out when unset)
#     DRY_RUN=1 bash bench/device_check.sh    # on a CPU machine: the same steps on tiny shapes under Triton's
#                                             # interpreter, to keep the plumbing working (tests/bench/test_device_check.py)
#
# The real data does not travel with the checkout. Before the GPU run, fill the ignored folder .device_data/ once:
#
#     bash bench/device_check.sh fill         # copies ../shared/data/{rotten_tomatoes,gpt2-tokenizer} (7.6 MB)
#
# and send it along: the device tool's `carry` must name ".device_data" (DEVICE_DATA points elsewhere if needed).
#
# Steps, each with its own time limit; the timing rows come first, so a cut-short run still has them:
#   1. offline install of this checkout (no index, no dependencies, no build isolation); stop at once if
#      the kernel modules (`lora_fast.kernels.lora_forward`, `.lora_backward`) do not import;
#   2. kernel timing that attributes (bench/kernel_timing.py; its JSONs are rewritten after every row): per shape
#      each pass of each design (fused, split, hybrid) alone and each of its kernels alone beside the cuBLAS
#      floor, the configurations chosen and any fallback, a mixed-dtype row (bf16 with fp32 LoRA weights); and
#      designs.json, the measured design table (LORA_FAST_DESIGNS=designs.json makes `auto` use it on this GPU);
#   3. the CUDA test tier with the reduced case list (LORA_FAST_CUDA_QUICK=1), JUnit XML into $OUT;
#   4. the main job as a user runs it: train_sentiment.py --fused on a small random GPT-2 with the real data for
#      20 steps.
# Every step runs with one TRITON_CACHE_DIR, so a kernel compiled once is not compiled again.
#
# Comes back in $OUT: device_check.log (every step's output and exit status), kernel_timing.json/.md, designs.json,
# pytest_cuda.xml, train_summary.json.
#
# Time budget (docs/KERNELS.md, "Device check"): the worst case, every step killed at its limit (timeout -k: a
# step that ignores SIGTERM is killed 5 s later), is 30 + 15 + 135 + 75 + 15 + 55 s + 6 × 5 s = 355 s, under 6
# minutes, so a 15-minute lease can run it twice. The model benchmark (bench/run.py --quick --model-only, about a
# minute) is not in it: run it as a second call where the lease allows.
#
# Exit status: 0 only when every step succeeded; 1 otherwise (the failed steps are listed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."

DATA="${DEVICE_DATA:-.device_data}"
if [ "${1:-}" = "fill" ]; then
    SRC="${SHARED_DATA:-../shared/data}"
    mkdir -p "$DATA"
    cp -r "$SRC/rotten_tomatoes" "$SRC/gpt2-tokenizer" "$DATA/" || exit 1
    echo "filled $DATA from $SRC; carry \"$DATA\" with the device run"
    exit 0
fi

OUT="${OUT:-device_out}"
mkdir -p "$OUT"
# Scratch for what must not come back (the tiny model, the training run's folder, Triton's kernel cache): $OUT
# returns only a few files, so it gets logs and results alone.
if [ -z "${WORK:-}" ]; then
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"
LOG="$OUT/device_check.log"
: >"$LOG"
DRY_RUN="${DRY_RUN:-0}"
failed=()

# ---------------------------------------------------------------- the commands a user runs (one place)
# The main job as a user runs it (train_sentiment.py, lora_fast.study.tiny): change it here only.
TINY="$WORK/tiny-gpt2"
if [ "$DRY_RUN" = "1" ]; then
    export TRITON_INTERPRET=1
    DEVICE=cpu
    TRAIN_STEPS=2
    TIMING_ARGS=(--device cpu)
else
    DEVICE=cuda
    TRAIN_STEPS=20
    TIMING_ARGS=(--device cuda)
fi
MAKE_TINY=(python3 -m lora_fast.study.tiny "$TINY" --tokenizer "$DATA/gpt2-tokenizer")
TRAIN=(python3 train_sentiment.py --fused --device "$DEVICE" --model "$TINY" --data-dir "$DATA/rotten_tomatoes"
    --max-steps "$TRAIN_STEPS" --batch-size 8 --grad-accum 1 --eval-every "$TRAIN_STEPS" --max-val 64 --max-test 64
    --out "$WORK/train")
# ----------------------------------------------------------------

# run NAME LIMIT_S CMD...: the command's output goes to the terminal and to $LOG; a failure (or a timeout, status
# 124, or 137 where SIGTERM was ignored) is recorded and the script goes on. pipefail makes the status the
# command's, not tee's.
run() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
    return "$rc"
}

# 1. Install this checkout as is, offline; without a working import nothing else can run.
if [ "$DRY_RUN" = "1" ]; then
    echo "== install: skipped (DRY_RUN: the checkout is already installed here)" | tee -a "$LOG"
else
    run install 30 env PIP_NO_INDEX=1 python3 -m pip install -q --no-deps --no-build-isolation -e .
fi
if ! run import 15 python3 -c "import lora_fast.kernels.lora_forward, lora_fast.kernels.lora_backward, torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.cuda.is_available())"; then
    echo "device check: lora_fast.kernels does not import; stopping" >&2
    exit 1
fi

# 2. The timing rows, each written to $OUT/kernel_timing.json and $OUT/designs.json as soon as it is measured.
run kernel_timing 135 python3 bench/kernel_timing.py --out "$OUT" "${TIMING_ARGS[@]}"

# 3. The CUDA tier (on CPU every case is skipped, visibly: the plumbing and the JUnit file still run).
run pytest_cuda 75 env LORA_FAST_CUDA_QUICK=1 python3 -m pytest tests -m cuda -q -rs -p no:cacheprovider \
    --junitxml="$OUT/pytest_cuda.xml"

# 4. The main job as a user runs it.
if [ -d "$DATA/rotten_tomatoes" ] && [ -d "$DATA/gpt2-tokenizer" ]; then
    if run tiny_model 15 "${MAKE_TINY[@]}" && run train 55 "${TRAIN[@]}"; then
        if [ -s "$WORK/train/summary.json" ]; then
            cp "$WORK/train/summary.json" "$OUT/train_summary.json"
        else
            failed+=("train: no summary.json")
        fi
    fi
else
    echo "== train: $DATA has no rotten_tomatoes/ and gpt2-tokenizer/ (run 'bash bench/device_check.sh fill')" \
        | tee -a "$LOG"
    failed+=("train (no data in $DATA)")
fi
echo "== results in $OUT (the measured design table: LORA_FAST_DESIGNS=$OUT/designs.json)" | tee -a "$LOG"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" | tee -a "$LOG" >&2
    exit 1
fi
echo "device check: all steps passed" | tee -a "$LOG"
