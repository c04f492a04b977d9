#!/usr/bin/env bash
# The GPU variant of the benchmarks, one script to run the moment an accelerator is lent (about 5 minutes
# on one GPU); each part prints its own side-by-side table (record them in docs/benchmarks.md with the
# card's name).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# Training step, BLIP-base captioning, bf16 autocast, vlforge against transformers.
python benchmarks/train_step.py --only blip --precision bf16 --warmup 2 --repeats 5

# Caption latency and tokens/s, BLIP-base: bf16 autocast for both, then vlforge's int8 weights with its
# compiled static decoding step against transformers' fp32.
python benchmarks/generate.py --only greedy_1 --only greedy_8 --precision bf16
python benchmarks/generate.py --only greedy_1 --only greedy_8 --precision fp32 --quant int8 --compile

# Serving: one `vlforge serve` process against Ray Serve with 1 and 2 replicas on the GPUs (replicas
# share a GPU by fractions where there are fewer GPUs than replicas), LLaVA-style, concurrency 32.
python benchmarks/serve.py --models llava --concurrency 32 --replicas 1 2 --device cuda

# ZeRO-3 memory per rank needs two GPUs (benchmarks/memory.py launches two ranks):
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python benchmarks/memory.py --stages 0 3
fi
