#!/usr/bin/env bash
# The GPU variant of the benchmarks, one script to run the moment an accelerator is lent; each part
# prints its own side-by-side table (record them in docs/benchmarks.md with the card's name).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# Serving: one `vlforge serve` process against Ray Serve with 1 and 2 replicas on the GPUs (replicas
# share a GPU by fractions where there are fewer GPUs than replicas), LLaVA-style, concurrency 32.
python benchmarks/serve.py --models llava --concurrency 32 --replicas 1 2 --device cuda
