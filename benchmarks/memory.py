"""Memory per rank by ZeRO stage, same machine, same run (issue 7, benchmark 4): BLIP-base captioning
(ViT-B/16 at 384 px, BERT-base decoder; 224M parameters) trained for a few steps on 2 ranks with
ZeRO-0, 2, 3 and 3 with optimizer and parameters offloaded to CPU memory, each run through the launcher
as a user runs it (`deepspeed --num_gpus 2 launch/train.py ...`, AdamW, fp32 on CPU / bf16 on GPUs).
The figure is the trainer's `system/peak_memory_mib`: the largest rank's peak resident set on CPU
(the process, loader workers not counted), or its peak of allocated GPU memory.

Target: ZeRO-3 <= 0.6x ZeRO-0 per rank.

    python benchmarks/memory.py [--stages 0 2 3 3_offload] [--model blip_caption_base] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlforge.core.distributed import _free_port as free_port

REPO = Path(__file__).resolve().parents[1]
STAGES = {"0": "zero0", "2": "zero2", "3": "zero3", "3_offload": "zero3_offload"}


def run_stage(stage: str, model: str, steps: int, batch: int, work: Path) -> tuple[float, float]:
    """(peak MiB of the largest rank, seconds) of a short BLIP training run under ZeRO `stage`."""
    run_dir = work / f"zero{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", "recipe=blip_caption_demo", f"model={model}", f"deepspeed={STAGES[stage]}",
           f"run_dir={run_dir}", "logger=jsonl", f"trainer.max_steps={steps}", "trainer.log_every=1",
           "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0", "trainer.save_at_end=false",
           f"data.batch_size={batch}", "data.num_workers=1", "data.train_image.size=384", "data.eval_image.size=384",
           # The demo recipe's fp32 suits a CPU; on GPUs (the variant of benchmark 6) BLIP trains in bf16.
           f"trainer.precision={'bf16' if torch.cuda.is_available() else 'fp32'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLFORGE_DATA_DIR": str(work / "data")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ZeRO-{stage} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(row["system/peak_memory_mib"] for row in rows if "system/peak_memory_mib" in row), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=tuple(STAGES), default=list(STAGES))
    parser.add_argument("--model", default="blip_caption_base", help="a recipes/model node of the BLIP captioner")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="per rank")
    args = parser.parse_args()
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    with tempfile.TemporaryDirectory() as tmp:
        results = {stage: run_stage(stage, args.model, args.steps, args.batch, Path(tmp)) for stage in args.stages}
    # DeepSpeed's CPU all-reduce leaves a buffer per rank behind; only these runs' are removed.
    for leftover in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
        leftover.unlink(missing_ok=True)
    base = results.get("0", (None, None))[0]
    print(f"# Peak memory per rank, {args.model}, 2 ranks, batch {args.batch} per rank, 384 px, {args.steps} steps\n")
    print("| ZeRO stage | peak MiB (largest rank) | vs ZeRO-0 | run time (s) |")
    print("|---|---|---|---|")
    for stage, (peak, seconds) in results.items():
        ratio = f"**{peak / base:.2f}x**" if base else ""
        print(f"| {stage.replace('_', ' + ')} | {peak:.0f} | {ratio} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
