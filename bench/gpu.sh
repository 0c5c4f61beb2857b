#!/usr/bin/env bash
# One prepared GPU session: correctness, then projection and generation figures on a random
# Llama-3.1-8B-shaped model. Logs land in $OUT (device tool) or ./bench-gpu-out.
set -u
OUT=${OUT:-bench-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 180 python gpu_check.py 2>&1 | tee "$OUT/check.log"
timeout 300 python projection.py --device cuda --random-weights --shape llama-3.1-8b \
  --prompts 256 --min-len 200 --max-len 600 --batch-tokens 32768 \
  --repeats 3 2>&1 | grep -v "Loading weights" | tee "$OUT/projection.log"
timeout 240 python generation.py --device cuda --random-weights --shape llama-3.1-8b \
  --prompts 128 --max-new-tokens 64 --fixed-batch 16 --batch-tokens 65536 --max-batch 128 \
  --static-cache 2>&1 | grep -v "Loading weights" | tee "$OUT/generation.log"
