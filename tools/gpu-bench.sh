#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one short run, for a session lent a GPU (the `device` tool):
#   bash tools/gpu-bench.sh            # on the GPU machine, from the repository root, after `make install`
# Each line is `dreamloom bench` (dreamloom's loop, the example scripts' per-step work, the bare math; steps/s,
# peak CUDA memory, TFLOP/s and MFU) or `dreamloom estimate` (the predicted peak, to set beside the measured one).
# Figures land in $OUT (JSON and the printed tables). SMALL=1 runs the same lines on the tiny bases at 64 px: a
# check of the script itself on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-bench}
DL=${DL:-.venv/bin/dreamloom}
mkdir -p "$OUT"
if [[ "${SMALL:-0}" == 1 ]]; then
    SD15=tiny SDXL=tiny-xl R15=64 RXL=64 STEPS=4 WARMUP=2
else
    SD15=random:sd15 SDXL=random:sdxl R15=512 RXL=1024 STEPS=${STEPS:-60} WARMUP=${WARMUP:-10}
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi") \
    | tee "$OUT/device.txt"

bench() {  # NAME RECIPE ARGS...: the bench's table, and the JSON next to it
    local name=$1; shift
    echo "== $name" | tee -a "$OUT/tables.md"
    "$DL" bench "$@" --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/$name.json" 2>>"$OUT/$name.log" \
        | grep '^|' | tee -a "$OUT/tables.md"
}
estimate() {  # NAME RECIPE ARGS...
    local name=$1; shift
    "$DL" estimate "$@" > "$OUT/$name-estimate.txt"
    tail -n 3 "$OUT/$name-estimate.txt"
}

bench sd15-lora sd15-lora-12gb --base "$SD15" --resolution "$R15" --batch 1
bench sd15-lora-nchw sd15-lora-12gb --base "$SD15" --resolution "$R15" --batch 1 --set train.channels_last=false
bench sd15-lora-compiled sd15-lora-12gb --base "$SD15" --resolution "$R15" --batch 1 --set train.compile=blocks
bench sd15-dreambooth sd15-dreambooth-12gb --base "$SD15" --resolution "$R15" --batch 1
estimate sd15-dreambooth sd15-dreambooth-12gb --base "$SD15" --resolution "$R15"
# MFU of a full fine-tune at batch 8: plain AdamW, no checkpointing (the math alone, as MLPerf's SD reference counts it)
bench sd15-full-b8 sd15-dreambooth-12gb --base "$SD15" --resolution "$R15" --batch 8 \
    --set train.optimizer=adamw --set train.gradient_checkpointing=false --set train.fused_backward=false \
    --set train.weights_dtype=fp32
bench sd15-full-b8-compiled sd15-dreambooth-12gb --base "$SD15" --resolution "$R15" --batch 8 \
    --set train.optimizer=adamw --set train.gradient_checkpointing=false --set train.fused_backward=false \
    --set train.weights_dtype=fp32 --set train.compile=blocks
bench sdxl-lora sdxl-lora-12gb --base "$SDXL" --resolution "$RXL" --batch 1
estimate sdxl-lora sdxl-lora-12gb --base "$SDXL" --resolution "$RXL"
echo "figures in $OUT/"
