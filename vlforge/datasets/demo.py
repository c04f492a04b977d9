"""The built-in demo dataset: procedural shape scenes with captions, questions and class labels.

    python -m vlforge.datasets.demo --root data/demo

Builds train/val/test shards plus a WordPiece tokenizer, needs no network and is deterministic.
The build is cached (root/meta.json) and safe to call from every rank of a distributed job.
"""
from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tqdm import tqdm

from vlforge.config.data import DemoConfig
from vlforge.datasets.demo_scenes import (
    BACKGROUNDS,
    COLORS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    render_scene,
    sample_scene,
    scene_captions,
    scene_questions,
)
from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer
from vlforge.datasets.writer import ShardWriter

# Bump whenever generation changes, so cached datasets built by older code are rebuilt.
FORMAT_VERSION = 3  # 2: count answers are digits, as VQAv2 writes them; 3: every template caption

JPEG_QUALITY = 90

SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}

TOKENIZER_MAX_LENGTH = 128


@dataclass
class DemoPaths:
    root: str
    train: str  # brace-expandable shard URL, e.g. /abs/root/train-{000000..000023}.tar
    val: str
    test: str
    tokenizer: str  # directory loadable with transformers.AutoTokenizer.from_pretrained
    classes: list[str]  # label index -> class name; also stored as root/classes.json


def _split_sizes(cfg: DemoConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}


def _recorded_config(cfg: DemoConfig) -> dict:
    # The root is where the data lives, not what it contains; leaving it out lets a moved dataset stay cached.
    return {k: v for k, v in asdict(cfg).items() if k != "root"}


def _shard_url(root: Path, split: str, num_shards: int) -> str:
    return f"{root}/{split}-{{000000..{num_shards - 1:06d}}}.tar"


def _paths_from_meta(root: Path, meta: dict) -> DemoPaths:
    urls = {split: _shard_url(root, split, len(meta["splits"][split]["shards"])) for split in SPLIT_OFFSETS}
    return DemoPaths(root=str(root), tokenizer=str(root / meta["tokenizer"]), classes=list(meta["classes"]), **urls)


def _load_cached(root: Path, cfg: DemoConfig) -> DemoPaths | None:
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("format_version") != FORMAT_VERSION or meta.get("config") != _recorded_config(cfg):
        return None
    expected = [name for split in meta["splits"].values() for name in split["shards"]]
    expected += [meta["tokenizer"], "classes.json"]
    if not all((root / name).exists() for name in expected):
        return None
    return _paths_from_meta(root, meta)


def _generate_split(split: str, cfg: DemoConfig) -> Iterator[tuple[str, bytes, dict]]:
    # Disjoint seeds per split (and per cfg.seed) keep train, val and test images different.
    rng = random.Random(cfg.seed * len(SPLIT_OFFSETS) + SPLIT_OFFSETS[split])
    for index in range(_split_sizes(cfg)[split]):
        scene = sample_scene(rng, cfg.image_size)
        out = io.BytesIO()
        render_scene(scene, cfg.image_size).save(out, format="JPEG", quality=JPEG_QUALITY)
        key = f"{split}_{index:06d}"
        meta = {
            "image_id": key,
            "captions": scene_captions(scene),
            "label": SHAPES.index(scene.main.shape),
            "class_name": scene.main.shape,
            "qa": scene_questions(scene, rng),
            "objects": [obj.to_json() for obj in scene.objects],
        }
        yield key, out.getvalue(), meta


def _vocabulary_words() -> list[str]:
    # The words questions hinge on, so even a tiny build has a whole-word token for each of them.
    words = list(SHAPES) + list(COLORS) + list(BACKGROUNDS) + list(NUMBER_WORDS) + list(RELATIONS)
    return words + ["yes", "no", "small", "large", "shapes", "smaller", "shape", "1", "2", "3"]


def _build_into(directory: Path, cfg: DemoConfig) -> dict:
    """Write shards, tokenizer and meta.json into `directory`; returns the meta record."""
    splits: dict[str, dict] = {}
    texts: list[str] = _vocabulary_words()
    for split in SPLIT_OFFSETS:
        with ShardWriter(directory / f"{split}-%06d.tar", max_count=cfg.samples_per_shard) as writer:
            samples = tqdm(_generate_split(split, cfg), total=_split_sizes(cfg)[split], desc=f"demo data {split}",
                           unit="scene", disable=None, leave=False)  # a bar on a terminal only
            for key, image, meta in samples:
                writer.write(key, image, meta)
                texts += meta["captions"]
                texts += [part for qa in meta["qa"] for part in (qa["question"], qa["answers"][0])]
        splits[split] = {"num_samples": writer.count, "shards": [p.name for p in writer.shards]}
    actual_vocab = save_wordpiece_tokenizer(texts, cfg.vocab_size, directory / "tokenizer", TOKENIZER_MAX_LENGTH)
    # Same file make_shards' folder mode writes, so zero-shot evaluation finds class names the same way.
    (directory / "classes.json").write_text(json.dumps(list(SHAPES)) + "\n", encoding="utf-8")
    meta = {
        "format_version": FORMAT_VERSION,
        "config": _recorded_config(cfg),
        "splits": splits,
        "classes": list(SHAPES),
        "tokenizer": "tokenizer",
        "tokenizer_vocab_size": actual_vocab,
    }
    # meta.json is written last: its presence marks a complete build.
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _check_replaceable(root: Path) -> None:
    # Refuse to clobber a directory the demo builder did not create (e.g. a mistyped --root).
    if root.exists() and any(root.iterdir()) and not (root / "meta.json").exists():
        raise FileExistsError(f"{root} exists and is not a demo dataset; refusing to replace it")


def _replace_dir(new: Path, root: Path) -> None:
    if not root.exists():
        os.rename(new, root)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.rename(root, trash / root.name)
    os.rename(new, root)
    shutil.rmtree(trash, ignore_errors=True)


def build_demo_dataset(cfg: DemoConfig) -> DemoPaths:
    """Build the demo dataset under cfg.root, or return the existing build if it matches cfg.

    Concurrent callers (e.g. every rank of a job) serialise on an flock of `root + ".lock"`:
    the first builds into a temporary directory beside root and renames it into place, the
    others wait and then find the finished build.
    """
    cfg.validate()
    root = Path(cfg.root).expanduser().resolve()
    cached = _load_cached(root, cfg)
    if cached is not None:
        return cached
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _load_cached(root, cfg)
        if cached is not None:
            return cached
        _check_replaceable(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the dataset should be readable like any dir
            meta = _build_into(staging, cfg)
            _replace_dir(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return _paths_from_meta(root, meta)


def _parse_args(argv: list[str] | None) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="python -m vlforge.datasets.demo", description=__doc__.split("\n")[0])
    defaults = DemoConfig(root="")
    for f in fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "root":
            parser.add_argument(flag, required=True, help="output directory")
        else:
            parser.add_argument(flag, type=int, default=getattr(defaults, f.name), help="default: %(default)s")
    return DemoConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = _parse_args(argv)
    start = time.perf_counter()
    paths = build_demo_dataset(cfg)
    for name, value in asdict(paths).items():
        print(f"{name}: {value}")
    print(f"ready in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
