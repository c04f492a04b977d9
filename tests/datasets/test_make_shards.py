import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vlforge.datasets.make_shards import (
    main,
    write_caption_shards,
    write_conversation_shards,
    write_folder_shards,
    write_vqa_shards,
)


def _jpeg(path: Path, color=(200, 30, 30), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def _png(path: Path, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, (0, 0, 255, 255)).save(path, format="PNG")


def _truncated_jpeg(path: Path) -> None:
    # A valid header with half the scan data missing: only a real decode notices.
    out = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(out, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue()[: len(out.getvalue()) // 2])


def _read_samples(shards: list[Path]) -> dict[str, dict]:
    """image bytes and meta by sample key, across shards."""
    samples: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: {"jpg": v["jpg"], "meta": json.loads(v["json"])} for k, v in samples.items()}


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    _jpeg(root / "train" / "a.jpg")
    _png(root / "train" / "b.png")
    _truncated_jpeg(root / "train" / "corrupt.jpg")
    return root


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_caption_merges_entries_and_reports_skips(tmp_path, images):
    ann = _write_json(
        tmp_path / "captions.json",
        [
            {"image": "train/a.jpg", "caption": "A red box."},
            {"image": "train/b.png", "caption": ["blue", "very blue"], "image_id": 17},
            {"image": "train/missing.jpg", "caption": "gone"},
            {"image": "train/a.jpg", "caption": ["still red"]},
            {"image": "train/corrupt.jpg", "caption": "broken"},
            {"image": "train/b.png"},
        ],
    )
    report = write_caption_shards(ann, images, tmp_path / "out" / "cap-%06d.tar", max_count=1)
    assert report.written == 2
    assert [p.name for p in report.shards] == ["cap-000000.tar", "cap-000001.tar"]
    metas = sorted((s["meta"] for s in _read_samples(report.shards).values()), key=lambda m: m["image_id"])
    assert metas == [
        {"image_id": "17", "captions": ["blue", "very blue"]},
        {"image_id": "a", "captions": ["A red box.", "still red"]},
    ]
    skipped = dict(report.skipped)
    assert len(skipped) == 3
    assert "not found" in skipped["ann[2] train/missing.jpg"]
    assert "decode" in skipped["ann[4] train/corrupt.jpg"]
    assert "caption" in skipped["ann[5] train/b.png"]


def test_jpeg_copied_unchanged_and_other_formats_converted(tmp_path, images):
    entries = [{"image": "train/a.jpg", "caption": "x"}, {"image": "train/b.png", "caption": "y"}]
    ann = _write_json(tmp_path / "c.json", entries)
    report = write_caption_shards(ann, images, tmp_path / "out-%06d.tar")
    by_id = {s["meta"]["image_id"]: s["jpg"] for s in _read_samples(report.shards).values()}
    assert by_id["a"] == (images / "train" / "a.jpg").read_bytes()
    converted = Image.open(io.BytesIO(by_id["b"]))
    assert converted.format == "JPEG" and converted.mode == "RGB" and converted.size == (24, 20)
    r, g, b = converted.getpixel((12, 10))
    assert b > 200 and r < 50 and g < 50


def test_vqa_one_sample_per_question(tmp_path, images):
    ann = _write_json(
        tmp_path / "vqa.json",
        [
            {"image": "train/a.jpg", "question": "What color?", "answer": "red", "question_id": 5},
            {"image": "train/a.jpg", "question": "Is it square?", "answers": ["no", "no", "yes"]},
            {"image": "train/b.png", "question": "Which?", "answer": ["blue"], "image_id": "b1"},
            {"image": "nope/x.jpg", "question": "?", "answer": "?"},
            {"image": "train/b.png", "question": "No answer here"},
        ],
    )
    report = write_vqa_shards(ann, images, tmp_path / "vqa-%06d.tar")
    assert report.written == 3
    metas = [s["meta"] for s in _read_samples(report.shards).values()]
    assert metas == [
        {"image_id": "a", "question_id": "5", "question": "What color?", "answers": ["red"]},
        {"image_id": "a", "question_id": "1", "question": "Is it square?", "answers": ["no", "no", "yes"]},
        {"image_id": "b1", "question_id": "2", "question": "Which?", "answers": ["blue"]},
    ]
    assert [entry for entry, _ in report.skipped] == ["ann[3] nope/x.jpg", "ann[4] train/b.png"]


def test_conversations_one_sample_per_entry_with_bad_ones_named(tmp_path, images):
    good = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    ann = _write_json(
        tmp_path / "llava.json",
        [
            {"id": "000001", "image": "train/a.jpg", "conversations": good},
            {"id": "000002", "conversations": good},  # text-only, as some of llava_v1_5_mix665k
            {"id": "000003", "image": "train/b.png", "conversations": good[:1]},
            {"id": "000004", "image": "train/b.png", "conversations": [good[1], good[0]]},
        ],
    )
    report = write_conversation_shards(ann, images, tmp_path / "llava-%06d.tar")
    assert report.written == 1
    assert [s["meta"] for s in _read_samples(report.shards).values()] == [{"image_id": "000001", "conversations": good}]
    skipped = dict(report.skipped)
    assert "text-only" in skipped["ann[1]"]
    assert "end with a human turn" in skipped["ann[2] train/b.png"]
    assert "conversations[0] must be" in skipped["ann[3] train/b.png"]


def test_folder_labels_follow_sorted_class_names(tmp_path):
    root = tmp_path / "folder"
    _jpeg(root / "dog" / "1.jpg")
    _png(root / "cat" / "1.png")
    _jpeg(root / "cat" / "nested" / "2.jpeg")
    _truncated_jpeg(root / "dog" / "bad.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    report = write_folder_shards(root, tmp_path / "out" / "train-%06d.tar")
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]
    assert report.written == 3
    metas = sorted((s["meta"] for s in _read_samples(report.shards).values()), key=lambda m: m["image_id"])
    assert metas == [
        {"image_id": "cat/1", "label": 0, "class_name": "cat"},
        {"image_id": "cat/nested/2", "label": 0, "class_name": "cat"},
        {"image_id": "dog/1", "label": 1, "class_name": "dog"},
    ]
    assert [entry for entry, _ in report.skipped] == ["dog/bad.jpg"]


def test_folder_caption_templates_fill_in_each_class_name(tmp_path):
    root = tmp_path / "folder"
    _jpeg(root / "sea lion" / "1.jpg")
    _png(root / "ant" / "1.png")
    out = tmp_path / "out" / "train-%06d.tar"
    assert main(["folder", "--root", str(root), "--out", str(out),
                 "--caption-template", "a photo of a {}", "--caption-template", "{}, up close"]) == 0
    samples = _read_samples(sorted((tmp_path / "out").glob("*.tar")))
    metas = {s["meta"]["image_id"]: s["meta"] for s in samples.values()}
    assert metas["ant/1"]["captions"] == ["a photo of a ant", "ant, up close"]
    assert metas["sea lion/1"]["captions"] == ["a photo of a sea lion", "sea lion, up close"]
    assert metas["sea lion/1"]["label"] == 1


def test_folder_caption_template_without_one_placeholder_is_refused(tmp_path, capsys):
    root = tmp_path / "folder"
    _jpeg(root / "dog" / "1.jpg")
    out = tmp_path / "out" / "train-%06d.tar"
    assert main(["folder", "--root", str(root), "--out", str(out), "--caption-template", "a photo"]) == 2
    assert "caption template 'a photo' must hold exactly one '{}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_prints_counts_and_skipped_entries(tmp_path, images, capsys):
    entries = [{"image": "train/a.jpg", "caption": "x"}, {"image": "train/gone.jpg", "caption": "y"}]
    ann = _write_json(tmp_path / "c.json", entries)
    out = tmp_path / "s-%06d.tar"
    assert main(["caption", "--ann", str(ann), "--image-root", str(images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 samples to 1 shards" in printed
    assert "ann[1] train/gone.jpg: file not found" in printed


def test_cli_fails_when_nothing_written(tmp_path, images):
    ann = _write_json(tmp_path / "c.json", [{"image": "train/gone.jpg", "caption": "y"}])
    args = ["caption", "--ann", str(ann), "--image-root", str(images), "--out", str(tmp_path / "s-%06d.tar")]
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "vlforge.datasets.make_shards", *args], capture_output=True, text=True, cwd=repo
    )
    assert result.returncode == 1
    assert "wrote 0 samples" in result.stdout and "file not found" in result.stdout
    assert not list(tmp_path.glob("s-*"))
