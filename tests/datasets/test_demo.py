import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand
from PIL import Image

from vlforge.config.data import DemoConfig
from vlforge.datasets.demo import build_demo_dataset
from vlforge.datasets.demo_scenes import (
    COLORS,
    LARGE_PX,
    SHAPES,
    SMALL_PX,
    Background,
    Scene,
    SceneObject,
    relation,
    render_scene,
)
from vlforge.datasets.demo_tokenizer import SPECIAL_TOKENS, wordpiece_vocab

SMALL = dict(num_train=24, num_val=6, num_test=8, samples_per_shard=10, seed=3)


def _shards(url: str) -> list[Path]:
    return [Path(p) for p in braceexpand(url)]


def _samples(url: str) -> list[dict]:
    samples = []
    for shard in _shards(url):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for jpg, meta in zip(names[::2], names[1::2], strict=True):
                samples.append({"image": tar.extractfile(jpg).read(), **json.loads(tar.extractfile(meta).read())})
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = DemoConfig(root=str(tmp_path_factory.mktemp("demo") / "data"), **SMALL)
    return cfg, build_demo_dataset(cfg)


def test_paths_are_absolute_brace_urls_with_expected_counts(built):
    cfg, paths = built
    root = Path(cfg.root).resolve()
    assert paths.root == str(root)
    assert paths.train == f"{root}/train-{{000000..000002}}.tar"
    assert paths.val == f"{root}/val-{{000000..000000}}.tar"
    assert paths.classes == list(SHAPES)
    assert json.loads((root / "classes.json").read_text()) == list(SHAPES)
    assert [len(_samples(url)) for url in (paths.train, paths.val, paths.test)] == [24, 6, 8]


def test_same_seed_gives_byte_identical_build(built, tmp_path):
    cfg, paths = built
    again = build_demo_dataset(replace(cfg, root=str(tmp_path / "again")))
    for first, second in [(paths.train, again.train), (paths.val, again.val), (paths.test, again.test)]:
        assert [p.read_bytes() for p in _shards(first)] == [p.read_bytes() for p in _shards(second)]
    for name in ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "meta.json", "classes.json"):
        assert (Path(paths.root) / name).read_bytes() == (Path(again.root) / name).read_bytes()
    other_seed = build_demo_dataset(replace(cfg, root=str(tmp_path / "other"), seed=cfg.seed + 1))
    assert _shards(other_seed.val)[0].read_bytes() != _shards(paths.val)[0].read_bytes()


def test_splits_hold_different_images(built):
    _, paths = built
    images = [s["image"] for url in (paths.train, paths.val, paths.test) for s in _samples(url)]
    assert len(set(images)) == len(images)


def test_second_call_is_cached_and_touches_nothing(built):
    cfg, paths = built
    root = Path(cfg.root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert build_demo_dataset(cfg) == paths
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_changed_config_rebuilds(tmp_path):
    cfg = DemoConfig(root=str(tmp_path / "d"), **{**SMALL, "num_train": 5})
    build_demo_dataset(cfg)
    paths = build_demo_dataset(replace(cfg, num_train=12))
    assert len(_samples(paths.train)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "d.lock"]


def test_refuses_to_replace_unrelated_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_demo_dataset(DemoConfig(root=str(tmp_path), **SMALL))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _build_and_stat(root: str) -> tuple[dict, int]:
    paths = build_demo_dataset(DemoConfig(root=root, **SMALL))
    return asdict(paths), os.stat(Path(root) / "meta.json").st_ino


def test_concurrent_callers_build_once(tmp_path):
    root = str(tmp_path / "shared")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_build_and_stat, [root] * 3)
    # A second build would have swapped in a new directory, giving a different meta.json inode.
    final_inode = os.stat(Path(root) / "meta.json").st_ino
    assert all(result == (results[0][0], final_inode) for result in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "shared.lock"]


def test_labels_captions_and_answers_agree_with_objects(built):
    _, paths = built
    for sample in _samples(paths.train) + _samples(paths.test):
        main = sample["objects"][0]
        assert sample["class_name"] == main["shape"] == SHAPES[sample["label"]]
        # Every template caption, so equal facts give equal captions (retrieval matches by wording).
        assert len(sample["captions"]) == len(set(sample["captions"])) == (7 if len(sample["objects"]) == 1 else 8)
        assert all(f"{main['color']} {main['shape']}" in c and c == c.lower() for c in sample["captions"])
        answers = {qa["answer_type"]: qa["answers"] for qa in sample["qa"]}
        assert all(len(qa["answers"]) == 10 for qa in sample["qa"])
        assert answers["number"][0] == str(len(sample["objects"]))  # digits, as VQAv2 writes numbers
        assert sample["qa"][0]["answers"][0] == main["color"] and sample["qa"][1]["answers"][0] == main["shape"]
        assert ("position" in answers) == (len(sample["objects"]) > 1)


def test_position_answers_match_geometry(built):
    _, paths = built
    checked = 0
    for sample in _samples(paths.train):
        for qa in sample["qa"]:
            if qa["answer_type"] != "position":
                continue
            main, second = (
                SceneObject(o["shape"], o["color"], (0, 0, 0), o["size"], o["size_px"], o["x"], o["y"])
                for o in sample["objects"][:2]
            )
            asked = qa["question"].removeprefix(f"is the {main.shape} ").removesuffix(f" the {second.shape}?")
            assert qa["answers"][0] == ("yes" if asked == relation(main, second) else "no")
            checked += 1
    assert checked > 0


def test_object_sizes_and_no_overlap(built):
    _, paths = built
    for sample in _samples(paths.train):
        assert Image.open(io.BytesIO(sample["image"])).size == (64, 64)
        objects = sample["objects"]
        assert objects[0]["size"] == "large" and LARGE_PX[0] <= objects[0]["size_px"] <= LARGE_PX[1]
        for obj in objects[1:]:
            assert obj["size"] == "small" and SMALL_PX[0] <= obj["size_px"] <= SMALL_PX[1]
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                reach = (a["size_px"] + b["size_px"]) / 2
                assert abs(a["x"] - b["x"]) >= reach or abs(a["y"] - b["y"]) >= reach


@pytest.mark.parametrize("shape", SHAPES)
def test_drawn_shape_spans_its_size_in_pixels(shape):
    flat = Background("shaded", ((230, 230, 230), (230, 230, 230)), 0.0, 8.0, 0)
    obj = SceneObject(shape, "blue", COLORS["blue"], "large", 30, 32, 32)
    pixels = np.asarray(render_scene(Scene((obj,), flat), 64)).astype(int)
    covered = np.abs(pixels - 230).sum(axis=2) > 150  # at least about half covered by the shape
    ys, xs = np.nonzero(covered)
    assert covered[32, 32]
    assert 28 <= xs.max() - xs.min() + 1 <= 30
    assert 26 <= ys.max() - ys.min() + 1 <= 30


_TOKENIZER_PROBE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("a picture of a large red circle to the left of a small blue square").input_ids
print(json.dumps({
    "special": [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.bos_token],
    "wrapped": [ids[0] == tok.cls_token_id, ids[-1] == tok.sep_token_id],
    "decoded": tok.decode(ids, skip_special_tokens=True),
    "unk_in_demo_text": tok.unk_token_id in ids,
    "unk_in_other_text": tok.unk_token_id in tok("A zebra, 42 Xylophones!").input_ids,
}))
"""


def test_tokenizer_loads_offline_with_autotokenizer(built):
    _, paths = built
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _TOKENIZER_PROBE, paths.tokenizer], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "special": [0, 2, 3, "[DEC]"],
        "wrapped": [True, True],
        "decoded": "a picture of a large red circle to the left of a small blue square",
        "unk_in_demo_text": False,
        "unk_in_other_text": False,
    }


def test_cli_builds_and_prints_paths(tmp_path):
    args = ["--root", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--num-test", "2"]
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "vlforge.datasets.demo", *args], capture_output=True, text=True, cwd=repo
    )
    assert result.returncode == 0, result.stderr
    assert f"train: {tmp_path / 'cli'}/train-{{000000..000000}}.tar" in result.stdout


def test_wordpiece_vocab_is_order_independent_and_frequency_ranked():
    texts = ["red circle", "a red square", "a red star?"]
    vocab = wordpiece_vocab(texts, vocab_size=1000)
    assert vocab == wordpiece_vocab(list(reversed(texts)), vocab_size=1000)
    assert vocab[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and vocab[0] == "[PAD]"
    words = [t for t in vocab if len(t) > 1 and not t.startswith(("##", "["))]
    assert words == ["red", "circle", "square", "star"]  # by count, then alphabetically
    assert "##q" in vocab and "?" in vocab
