"""What the framework costs a small model (issue 21): a 2.4M-parameter CLIP on 28 px images, batch 128,
trained by vlforge from image-folder shards with one loader worker, against a plain PyTorch loop over
the same images held in memory, same machine, same run.

- plain loop: the same model class and config, the images decoded once into one uint8 tensor and the
  captions tokenized once; each step indexes a random batch, forward, backward, AdamW step. No
  loader, no DeepSpeed, no logging.
- vlforge: `python launch/train.py recipe=clip_demo` with the model and data overridden, one process
  (ZeRO-0), `data.num_workers=1`, from shards that `vlforge make-shards folder --caption-template`
  wrote from a class-per-folder tree of JPEGs.

Printed: steps/s of each (vlforge's from its logged `train/samples_per_s` windows after the first),
their ratio (target >= 0.95x), and vlforge's time from process start to the end of its first step,
its run made once before so that nothing is built on first use (target <= 10 s).

    python benchmarks/small_model.py [--images 4096] [--steps 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup_cpu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE, BATCH, MAX_LEN = 28, 128, 16
CLASSES = ["circle", "square", "triangle", "cross", "bar", "ring", "dot", "frame", "wedge", "diamond"]
COLORS = ["red", "green", "blue", "yellow", "white"]
TEMPLATES = ["a photo of a {}", "a small {}", "there is a {}", "a {} in the picture"]
LR, WEIGHT_DECAY = 1e-3, 0.1

# About 2.4M parameters: a ViT on 4 px patches (49 tokens + class token) and a 4-layer text tower.
VISION = {"name": "vit_tiny_patch16_224", "img_size": SIZE, "patch_size": 4, "embed_dim": 160, "depth": 5,
          "num_heads": 4}
TEXT = {"vocab_size": 512, "width": 128, "layers": 4, "heads": 4, "max_len": MAX_LEN, "pool": "cls"}
EMBED_DIM = 128


def draw_shape(name: str, color: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(0, 80) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    c, r = SIZE // 2 + rng.randint(-3, 3), rng.randint(7, 11)
    box = (c - r, c - r, c + r, c + r)
    if name in ("circle", "dot", "ring"):
        box = box if name != "dot" else (c - 3, c - 3, c + 3, c + 3)
        draw.ellipse(box, fill=None if name == "ring" else color, outline=color, width=2)
    elif name in ("square", "frame"):
        draw.rectangle(box, fill=None if name == "frame" else color, outline=color, width=2)
    elif name == "triangle":
        draw.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=color)
    elif name == "cross":
        draw.line((c - r, c, c + r, c), fill=color, width=3)
        draw.line((c, c - r, c, c + r), fill=color, width=3)
    elif name == "bar":
        draw.rectangle((c - r, c - 2, c + r, c + 2), fill=color)
    elif name == "wedge":
        draw.pieslice(box, 0, 120, fill=color)
    else:
        draw.polygon([(c, c - r), (c + r, c), (c, c + r), (c - r, c)], fill=color)
    return image


def write_image_folder(root: Path, count: int) -> None:
    rng = random.Random(0)
    for i in range(count):
        name = CLASSES[i % len(CLASSES)]
        (root / name).mkdir(parents=True, exist_ok=True)
        draw_shape(name, rng.choice(COLORS), rng).save(root / name / f"{i:06d}.jpg", quality=90)


def prepare(work: Path, count: int) -> tuple[Path, Path]:
    """(shard directory, tokenizer directory): the folder written as shards by the CLI, as a user would."""
    from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer

    folder, shards, tokenizer = work / "folder", work / "shards", work / "tokenizer"
    write_image_folder(folder, count)
    command = [sys.executable, "-m", "vlforge.cli", "make-shards", "folder", "--root", str(folder),
               "--out", str(shards / "train-%06d.tar"), "--max-count", "512"]
    for template in TEMPLATES:
        command += ["--caption-template", template]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    texts = [t.format(name) for t in TEMPLATES for name in CLASSES]
    save_wordpiece_tokenizer(texts, TEXT["vocab_size"], tokenizer, max_length=MAX_LEN)
    return shards, tokenizer


def build_model() -> torch.nn.Module:
    from vlforge.models.clip.model import CLIP

    return CLIP(vision=VISION, text=TEXT, embed_dim=EMBED_DIM)


def load_in_memory(folder: Path, tokenizer_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 images [N,3,H,W], input ids [N*T, L], attention masks) for every image and template."""
    from vlforge.core.tokenizers import load_tokenizer

    paths = sorted(folder.rglob("*.jpg"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    tokenizer = load_tokenizer(str(tokenizer_dir))
    captions = [t.format(p.parent.name) for p in paths for t in TEMPLATES]
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return images, tokens["input_ids"], tokens["attention_mask"]


def plain_loop(images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, steps: int, warmup: int) -> float:
    """Steps/s of the plain loop after `warmup` steps."""
    torch.manual_seed(0)
    model = build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    generator = torch.Generator().manual_seed(0)
    count = images.shape[0]
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        index = torch.randint(count, (BATCH,), generator=generator)
        caption = index * len(TEMPLATES) + torch.randint(len(TEMPLATES), (BATCH,), generator=generator)
        batch = {"image": images[index], "text_input_ids": ids[caption], "text_attention_mask": mask[caption]}
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def vlforge_overrides(shards: Path, tokenizer: Path, run_dir: Path) -> list[str]:
    model = [f"model.vision.{k}={v}" for k, v in VISION.items()] + [f"model.text.{k}={v}" for k, v in TEXT.items()]
    return [
        "recipe=clip_demo", "model=clip_tiny_vit", *model, f"model.embed_dim={EMBED_DIM}",
        "data.demo=null", "data.val=null", "data.test=null", f"task.zero_shot_classes={shards}/classes.json", f"data.tokenizer={tokenizer}", f"data.max_text_len={MAX_LEN}",
        f"data.train.shards={shards}/train-*.tar", f"data.batch_size={BATCH}", "data.num_workers=1",
        f"data.train_image.size={SIZE}", f"data.eval_image.size={SIZE}", "deepspeed=zero0",
        f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", "optim.warmup_steps=0",
        "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0", "trainer.save_at_end=false",
        "logger=jsonl", f"run_dir={run_dir}",
    ]


def vlforge_run(shards: Path, tokenizer: Path, run_dir: Path, max_steps: int, log_every: int) -> tuple[float, list[dict]]:
    """(seconds from process start to the end of step 1, the logged rows) of one `launch/train.py` run."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "launch/train.py", *vlforge_overrides(shards, tokenizer, run_dir),
               f"trainer.max_steps={max_steps}", f"trainer.log_every={log_every}"]
    started = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-4000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(row for row in rows if row["step"] == 1) if log_every == 1 else rows[0]
    return first["time"] - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per window / plain-loop run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the two")
    args = parser.parse_args()
    setup_cpu()
    print(environment())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards, tokenizer = prepare(work, args.images)
        images, ids, mask = load_in_memory(work / "folder", tokenizer)
        params = sum(p.numel() for p in build_model().parameters())
        print(f"model: {params / 1e6:.2f}M parameters; {args.images} images of {SIZE} px; batch {BATCH}")
        vlforge_run(shards, tokenizer, work / "run-warm", 1, 1)  # anything built on first use, built
        firsts, plain, framework = [], [], []
        for round_ in range(args.repeats):
            first, _ = vlforge_run(shards, tokenizer, work / f"first-{round_}", 1, 1)
            firsts.append(first)
            plain.append(plain_loop(images, ids, mask, args.steps, warmup=5))
            _, rows = vlforge_run(shards, tokenizer, work / f"run-{round_}", 3 * args.steps, args.steps)
            framework += [row["train/samples_per_s"] / BATCH for row in rows if "train/samples_per_s" in row][1:]
        plain_rate, framework_rate = statistics.median(plain), statistics.median(framework)
        print(f"{'':28s}{'steps/s':>10s}{'ratio':>8s}")
        print(f"{'plain loop (in memory)':28s}{plain_rate:10.3f}{1.0:8.2f}x")
        print(f"{'vlforge (shards, 1 worker)':28s}{framework_rate:10.3f}{framework_rate / plain_rate:8.2f}x"
              "   target >= 0.95x")
        print(f"vlforge time to the end of step 1: {statistics.median(firsts):.1f} s (each: "
              + ", ".join(f"{s:.1f}" for s in firsts) + ")   target <= 10 s")
        print("plain steps/s each round: " + ", ".join(f"{r:.3f}" for r in plain)
              + "; vlforge windows: " + ", ".join(f"{r:.3f}" for r in framework))


if __name__ == "__main__":
    main()
