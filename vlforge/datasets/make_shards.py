"""Convert caption / VQA annotation files and class folders into WebDataset shards.

    python -m vlforge.datasets.make_shards caption --ann ann.json --image-root images --out out/train-%06d.tar
    python -m vlforge.datasets.make_shards vqa --ann ann.json --image-root images --out out/train-%06d.tar
    python -m vlforge.datasets.make_shards conversation --ann llava_v1_5_mix665k.json --image-root images \
        --out out/train-%06d.tar
    python -m vlforge.datasets.make_shards folder --root imagenet/train --out out/train-%06d.tar \
        [--caption-template "a photo of a {}" ...]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from vlforge.datasets.conversation import check_conversation
from vlforge.datasets.samples import SampleError
from vlforge.datasets.writer import ShardWriter

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CONVERTED_JPEG_QUALITY = 95
DEFAULT_MAX_COUNT = 10000
DEFAULT_MAX_BYTES = int(3e9)


@dataclass
class ShardReport:
    written: int = 0
    shards: list[Path] = field(default_factory=list)
    # (entry description such as "ann[12] images/a.jpg", reason) for every sample left out.
    skipped: list[tuple[str, str]] = field(default_factory=list)


class ImageError(Exception):
    """An image could not be read or decoded; the sample is skipped instead of ending the run."""


def load_image_as_jpeg(path: Path) -> bytes:
    """Return JPEG bytes for `path`: JPEG files verbatim, anything else re-encoded as RGB JPEG."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                # Decode at reduced DCT scale: still walks the whole entropy-coded stream, so
                # truncated or corrupt files are caught without paying for a full decode.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                return data
            image.load()
            return _encode_jpeg(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def _encode_jpeg(image: Image.Image) -> bytes:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white; a plain convert("RGB") would expose whatever colour
        # happens to sit under fully transparent pixels (often black).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=CONVERTED_JPEG_QUALITY)
    return out.getvalue()


class _ImageCache:
    """Remember the last few converted images: VQA files list several questions per image."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Path, bytes | ImageError] = OrderedDict()

    def get(self, path: Path) -> bytes:
        if path not in self._items:
            try:
                self._items[path] = load_image_as_jpeg(path)
            except ImageError as exc:
                self._items[path] = exc
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        self._items.move_to_end(path)
        value = self._items[path]
        if isinstance(value, ImageError):
            raise ImageError(str(value))  # a fresh exception, so tracebacks do not pile up on the cached one
        return value


def _load_annotations(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of annotation entries, got {type(data).__name__}")
    return data


def _text_list(value: object) -> list[str]:
    """Accept a single string or a list of strings; drop empty ones."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [s for s in items if isinstance(s, str) and s.strip()]


@dataclass
class _Sample:
    entry: str  # how the report names this annotation if the sample is skipped
    image_path: Path
    meta: dict


@dataclass
class _Skip:
    entry: str
    reason: str


def _write_samples(items: Iterable[_Sample | _Skip], out: str | Path, max_count: int, max_bytes: int) -> ShardReport:
    report = ShardReport()
    cache = _ImageCache()
    with ShardWriter(out, max_count=max_count, max_bytes=max_bytes) as writer:
        # A progress bar on a terminal only (tqdm's disable=None): logs and pipes get the summary alone.
        progress = tqdm(items, desc=f"make-shards {Path(str(out)).name}", unit="sample", disable=None, leave=False)
        for index, item in enumerate(progress):
            if isinstance(item, _Skip):
                report.skipped.append((item.entry, item.reason))
                continue
            try:
                image_bytes = cache.get(item.image_path)
            except ImageError as exc:
                report.skipped.append((item.entry, str(exc)))
                continue
            # Keys follow source order so a sample can be traced back to its annotation.
            writer.write(f"{index:09d}", image_bytes, item.meta)
    report.written = writer.count
    report.shards = writer.shards
    return report


def _caption_samples(annotations: list[dict], image_root: Path) -> Iterator[_Sample | _Skip]:
    groups: dict[str, dict] = {}
    problems: list[_Skip] = []
    for i, ann in enumerate(annotations):
        image = ann.get("image") if isinstance(ann, dict) else None
        if not isinstance(image, str) or not image:
            problems.append(_Skip(f"ann[{i}]", "no 'image' field"))
            continue
        captions = _text_list(ann.get("caption", ann.get("captions")))
        if not captions:
            problems.append(_Skip(f"ann[{i}] {image}", "no caption"))
            continue
        group = groups.setdefault(image, {"indices": [], "captions": [], "image_id": ann.get("image_id")})
        group["indices"].append(i)
        group["captions"].extend(captions)
    yield from problems
    for image, group in groups.items():
        image_id = group["image_id"] if group["image_id"] is not None else Path(image).stem
        indices = ",".join(str(i) for i in group["indices"])
        meta = {"image_id": str(image_id), "captions": group["captions"]}
        yield _Sample(f"ann[{indices}] {image}", image_root / image, meta)


def _entries_with_images(annotations: list[dict], no_image: str = "no 'image' field") -> Iterator[tuple[int, dict, str] | _Skip]:
    """(index, entry, image path) of every annotation naming an image; a _Skip (reason `no_image`) otherwise."""
    for i, ann in enumerate(annotations):
        image = ann.get("image") if isinstance(ann, dict) else None
        if not isinstance(image, str) or not image:
            yield _Skip(f"ann[{i}]", no_image)
            continue
        yield i, ann, image


def _vqa_samples(annotations: list[dict], image_root: Path) -> Iterator[_Sample | _Skip]:
    for item in _entries_with_images(annotations):
        if isinstance(item, _Skip):
            yield item
            continue
        i, ann, image = item
        entry = f"ann[{i}] {image}"
        question = ann.get("question")
        if not isinstance(question, str) or not question.strip():
            yield _Skip(entry, "no question")
            continue
        answers = _text_list(ann["answers"] if "answers" in ann else ann.get("answer"))
        if not answers:
            yield _Skip(entry, "no answer")
            continue
        image_id = ann.get("image_id")
        image_id = Path(image).stem if image_id is None else image_id
        question_id = ann.get("question_id")
        question_id = i if question_id is None else question_id
        meta = {"image_id": str(image_id), "question_id": str(question_id), "question": question, "answers": answers}
        yield _Sample(entry, image_root / image, meta)


def _conversation_samples(annotations: list[dict], image_root: Path) -> Iterator[_Sample | _Skip]:
    """LLaVA's instruction JSON (entries: id, image, conversations), one sample per entry."""
    for item in _entries_with_images(annotations, "no 'image' field (text-only conversations are not supported)"):
        if isinstance(item, _Skip):
            yield item
            continue
        i, ann, image = item
        entry = f"ann[{i}] {image}"
        try:
            turns = check_conversation(ann.get("conversations"))
        except SampleError as err:
            yield _Skip(entry, str(err))
            continue
        image_id = ann.get("id", Path(image).stem)
        yield _Sample(entry, image_root / image, {"image_id": str(image_id), "conversations": turns})


def write_caption_shards(
    ann: str | Path,
    image_root: str | Path,
    out: str | Path,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ShardReport:
    """LAVIS/Karpathy caption JSON -> shards; entries sharing an image become one multi-caption sample."""
    samples = _caption_samples(_load_annotations(ann), Path(image_root))
    return _write_samples(samples, out, max_count, max_bytes)


def write_vqa_shards(
    ann: str | Path,
    image_root: str | Path,
    out: str | Path,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ShardReport:
    """VQA JSON -> shards, one sample per question (the image is repeated in each)."""
    return _write_samples(_vqa_samples(_load_annotations(ann), Path(image_root)), out, max_count, max_bytes)


def write_conversation_shards(ann: str | Path, image_root: str | Path, out: str | Path,
                              max_count: int = DEFAULT_MAX_COUNT, max_bytes: int = DEFAULT_MAX_BYTES) -> ShardReport:
    """LLaVA conversation JSON -> shards, one sample per entry (task.source=conversations reads them)."""
    samples = _conversation_samples(_load_annotations(ann), Path(image_root))
    return _write_samples(samples, out, max_count, max_bytes)


def find_class_images(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folder names and (image path, label) pairs, like torchvision's ImageFolder."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders found")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((path, label))
    return classes, items


def write_folder_shards(
    root: str | Path,
    out: str | Path,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    seed: int = 0,
    caption_templates: Sequence[str] = (),
) -> ShardReport:
    """Class-per-folder images -> shards plus classes.json beside them.

    Samples are shuffled with `seed` so that no shard holds a single class: streaming readers
    only shuffle within a bounded buffer and would otherwise see long runs of one label.
    With `caption_templates` (each holding one `{}`), every sample also gets `captions`, the templates
    filled with its class name, so image-text tasks (CLIP) train on the folder; training draws one.
    """
    for template in caption_templates:
        if template.count("{}") != 1:
            raise ValueError(f"caption template {template!r} must hold exactly one '{{}}' for the class name")
    root = Path(root)
    classes, items = find_class_images(root)
    random.Random(seed).shuffle(items)
    samples = (
        _Sample(
            entry=path.relative_to(root).as_posix(),
            image_path=path,
            meta={
                "image_id": path.relative_to(root).with_suffix("").as_posix(),
                "label": label,
                "class_name": classes[label],
                **({"captions": [t.format(classes[label]) for t in caption_templates]} if caption_templates else {}),
            },
        )
        for path, label in items
    )
    report = _write_samples(samples, out, max_count, max_bytes)
    classes_path = Path(str(out)).parent / "classes.json"
    classes_path.parent.mkdir(parents=True, exist_ok=True)
    classes_path.write_text(json.dumps(classes, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return report


def _parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)

    def add_output_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="shard pattern, e.g. out/train-%%06d.tar")
        p.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="samples per shard")
        p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="bytes per shard")

    for kind in ("caption", "vqa", "conversation"):
        p = sub.add_parser(kind, help=f"{kind} annotation JSON")
        p.add_argument("--ann", required=True, help="annotation JSON file (a list of entries)")
        p.add_argument("--image-root", required=True, help="directory the entries' 'image' paths are relative to")
        add_output_args(p)
    p = sub.add_parser("folder", help="image folder with one sub-folder per class")
    p.add_argument("--root", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling samples across shards")
    p.add_argument("--caption-template", action="append", default=[], metavar="TEMPLATE",
                   help="e.g. 'a photo of a {}': captions from the class name (repeatable), for image-text training")
    add_output_args(p)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m vlforge.datasets.make_shards") -> int:
    args = _parse_args(argv, prog)
    limits = {"max_count": args.max_count, "max_bytes": args.max_bytes}
    try:
        if args.kind == "caption":
            report = write_caption_shards(args.ann, args.image_root, args.out, **limits)
        elif args.kind == "vqa":
            report = write_vqa_shards(args.ann, args.image_root, args.out, **limits)
        elif args.kind == "conversation":
            report = write_conversation_shards(args.ann, args.image_root, args.out, **limits)
        else:
            report = write_folder_shards(args.root, args.out, seed=args.seed,
                                         caption_templates=args.caption_template, **limits)
    except (OSError, ValueError) as exc:  # unreadable annotation file, bad pattern, no class folders
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.written} samples to {len(report.shards)} shards")
    for shard in report.shards:
        print(f"  {shard}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} entries:")
        for entry, reason in report.skipped:
            print(f"  {entry}: {reason}")
    return 0 if report.written > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
