#!/usr/bin/env bash
# One prepared GPU session: correctness, then the figures on a random Llama-3.1-8B-shaped model,
# the ones still missing on a GPU first. A drawn task has 15 minutes of device time in all,
# start-up included, and one command may run 10: the step limits add up to 560 s, and each
# overrun costs only its own figures. Logs land in $OUT (device tool) or ./bench-gpu-out.
set -u
OUT=${OUT:-bench-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
SHAPE=(--device cuda --random-weights --shape llama-3.1-8b --repeats 2)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 110 python gpu_check.py 2>&1 | tee "$OUT/check.log"
# Target 5 on a GPU: sorted vs fixed batches, and HF's static cache (compiled by generate).
timeout 230 python generation.py "${SHAPE[@]}" --prompts 64 --max-new-tokens 32 \
  --fixed-batch 16 --batch-tokens 65536 --max-batch 64 --static-cache 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/generation.log"
timeout 130 python projection.py "${SHAPE[@]}" --prompts 64 --min-len 200 --max-len 600 \
  --batch-tokens 32768 2>&1 | grep -v "Loading weights" | tee "$OUT/projection.log"
# HF continuous batching vs the sorted batches (information for a later HF backend choice).
timeout 90 python generation.py "${SHAPE[@]}" --prompts 64 --max-new-tokens 32 \
  --batch-tokens 65536 --max-batch 64 --no-fixed --continuous 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/continuous.log"
