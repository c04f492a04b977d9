"""Data pipeline throughput, same machine, same run (issue 7, benchmark 3): images/s through shard
read + JPEG decode + training transforms + collate (tokenized captions), at 224 and 384 px, with 0, 1
and 2 loader workers, on the same 640x480 JPEGs:

- per-file (the LAVIS pattern): a map-style Dataset that per sample reads its JSON annotation file and
  opens its JPEG, RandomResizedCrop (bicubic, scale 0.5-1) + flip, ToTensor + Normalize (float32 out
  of the workers), default batching + the same tokenizer;
- vlforge with `draft: false`: the shards, the same transforms, uint8 through the collate
  (normalisation is the model's);
- vlforge as configured by default (`draft: true`: JPEGs decoded at reduced scale where the output
  size allows it).

Target: >= 1.5x per-file at the same workers. One pass = one epoch of the images, DataLoader start
included; the median of `--repeats` passes after one warm-up pass.

    python benchmarks/data_pipeline.py [--images 256] [--repeats 5] [--sizes 224 384] [--workers 0 1 2]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timing, environment, setup_cpu, time_steps  # noqa: E402

BATCH, WIDTH, HEIGHT = 32, 640, 480
WORDS = "a the photo of dog cat man woman red blue green large small on in near table street sky tree".split()


def synthetic_photo(rng: random.Random) -> bytes:
    """A 640x480 JPEG (quality 90) with photo-like statistics: smooth gradients, shapes, soft edges and
    sensor-like noise (a flat image would decode unrealistically fast, pure noise too slowly)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([(np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6)) + 1) * rng.uniform(40, 120)
                     + (y / HEIGHT) * rng.uniform(0, 100) for _ in range(3)], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(8, 20)):
        x0, y0 = rng.randint(0, WIDTH - 20), rng.randint(0, HEIGHT - 20)
        box = (x0, y0, x0 + rng.randint(10, 300), y0 + rng.randint(10, 250))
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(image).astype(np.int16) + np.random.default_rng(rng.randint(0, 2**31)).integers(-12, 13, (HEIGHT, WIDTH, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_data(root: Path, count: int) -> tuple[list[str], Path, str]:
    """(shard urls, the per-file directory, a tokenizer directory), all holding the same samples."""
    from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer
    from vlforge.datasets.writer import ShardWriter

    rng = random.Random(0)
    per_file = root / "files"
    per_file.mkdir(parents=True)
    with ShardWriter(str(root / "shards" / "train-%06d.tar"), max_count=64) as writer:
        for i in range(count):
            jpeg = synthetic_photo(rng)
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
            meta = {"image_id": i, "captions": [caption]}
            writer.write(f"{i:06d}", jpeg, meta)
            (per_file / f"{i:06d}.jpg").write_bytes(jpeg)
            (per_file / f"{i:06d}.json").write_text(json.dumps({"image": f"{i:06d}.jpg", "caption": caption}))
    urls = [str(p) for p in writer.shards]  # the last shard is listed once the writer has closed it
    save_wordpiece_tokenizer(WORDS * 3, 64, root / "tokenizer")
    return urls, per_file, str(root / "tokenizer")


class PerFileDataset(torch.utils.data.Dataset):
    """LAVIS's pattern: one JSON annotation and one JPEG opened per sample, float tensors out."""

    def __init__(self, root: Path, size: int) -> None:
        from torchvision import transforms

        self.root, self.count = root, len(list(root.glob("*.json")))
        # LAVIS's BlipImageTrainProcessor without its RandAugment: crop, flip, ToTensor, Normalize.
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ])

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        meta = json.loads((self.root / f"{index:06d}.json").read_text())
        image = Image.open(self.root / meta["image"]).convert("RGB")
        return self.transform(image), meta["caption"]


class PerFileCollate:
    def __init__(self, tokenizer: str) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        from vlforge.core.tokenizers import load_tokenizer

        tokens = load_tokenizer(self.tokenizer)([s[1] for s in samples], padding="longest", return_tensors="pt")
        return {"image": torch.stack([s[0] for s in samples]), **tokens}


def per_file_pass(root: Path, tokenizer: str, size: int, workers: int) -> int:
    loader = torch.utils.data.DataLoader(PerFileDataset(root, size), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, collate_fn=PerFileCollate(tokenizer), drop_last=True)
    return sum(batch["image"].shape[0] for batch in loader)


def vlforge_pass(urls: list[str], tokenizer: str, size: int, workers: int, draft: bool) -> int:
    from vlforge.config.data import ImageTransformConfig
    from vlforge.datasets.collate import Collator
    from vlforge.datasets.loader import ShardLoader
    from vlforge.datasets.processors import TextProcessor, build_image_transform
    from vlforge.datasets.samples import ImageTextSample
    from vlforge.datasets.shards import ShardStream

    transform = build_image_transform(ImageTransformConfig(size=size, train=True, hflip=True, draft=draft))
    stream = ShardStream(urls, ImageTextSample(transform, TextProcessor(), train=True), Collator(tokenizer, 32),
                         BATCH, split_by="sample", shuffle_buffer=256)
    return sum(batch["image"].shape[0] for batch in ShardLoader(stream, num_workers=workers, epochs=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    device = setup_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        urls, per_file, tokenizer = write_data(Path(tmp), args.images)
        total = args.images // BATCH * BATCH
        print(f"# Data pipeline, {total} images of {WIDTH}x{HEIGHT} per pass, batch {BATCH} ({environment()})\n")
        print("| size | workers | per-file images/s | vlforge draft off | ratio | vlforge | **ratio** |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            for workers in args.workers:
                runs: list[Timing] = []
                for name, run in (("per-file", lambda: per_file_pass(per_file, tokenizer, size, workers)),
                                  ("draft off", lambda: vlforge_pass(urls, tokenizer, size, workers, draft=False)),
                                  ("vlforge", lambda: vlforge_pass(urls, tokenizer, size, workers, draft=True))):
                    def one_pass(run=run, name=name) -> None:
                        seen = run()
                        assert seen == total, (name, seen, total)
                    runs.append(time_steps(name, one_pass, device, total, warmup=1, repeats=args.repeats))
                base, plain, ours = runs
                print(f"| {size} | {workers} | {base.throughput:.0f} | {plain.throughput:.0f} | "
                      f"{plain.throughput / base.throughput:.2f}x | {ours.throughput:.0f} | "
                      f"**{ours.throughput / base.throughput:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
