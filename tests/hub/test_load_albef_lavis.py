"""load_model("albef_retrieval", "coco"): LAVIS's ALBEF retrieval checkpoint (a "url:" source, one .pth
file beside bert-base-uncased's tokenizer files), here a tiny one with exactly its key layout.

LAVIS's AlbefRetrieval (lavis/models/albef_models/albef_retrieval.py) keeps `visual_encoder`, a med.py
BertModel as `text_encoder` (no `bert.` prefix, no MLM head), `vision_proj`, `text_proj`, `itm_head`,
their momentum copies `*_m`, `image_queue`, `text_queue`, `idx_queue`, `queue_ptr` and `temp`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tests.models.lavis_reference import (
    EMBED,
    FUSION,
    MAXLEN,
    QUEUE,
    TEXT,
    TEXT_WIDTH,
    VISION,
    VISION_WIDTH,
    VOCAB,
    assert_close,
    make_encoder,
    make_linear,
    make_vit,
    run_layers,
    under_prefix,
)
from tests.models.tiny_blip import images
from vlforge import load_model
from vlforge.hub import zoo
from vlforge.hub.sources import WeightsNotFoundError, download, url_model_dir

WEIGHTS = "albef_coco_retrieval_lavis.pt"
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "grass"]
TEXTS = ["a red circle", "the blue square on the grass"]
# The tiny dimensions of tests/models/lavis_reference.py, over the recipe's albef_base.
TINY = (f"model.embed_dim={EMBED}", f"model.fusion_layer={FUSION}", f"model.queue_size={QUEUE}",
        *(f"model.text.{key}={value}" for key, value in TEXT.items()),
        *(f"{'' if key == 'img_size' else '+'}model.vision.{key}={value}" for key, value in VISION.items() if key != "name"),
        f"data.train_image.size={VISION['img_size']}", f"data.eval_image.size={VISION['img_size']}")


@pytest.fixture(autouse=True)
def _offline_tiny_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty offline cache, and the zoo entry with the tiny dimensions (the real one takes the
    recipe's, ViT-B/16 and BERT-base)."""
    home = tmp_path / "home"
    monkeypatch.setenv("VLFORGE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entries = tuple(dataclasses.replace(e, overrides=(*e.overrides, *TINY))
                    if (e.name, e.model_type) == ("albef_retrieval", "coco") else e for e in zoo.ENTRIES)
    monkeypatch.setattr(zoo, "ENTRIES", entries)
    return home / "models" / "lavis" / "albef_retrieval" / "coco"


def _parts(seed: int) -> dict[str, torch.nn.Module]:
    return {"visual_encoder": make_vit(seed), "text_encoder": make_encoder(seed + 1),
            "vision_proj": make_linear(VISION_WIDTH, EMBED, seed + 2), "text_proj": make_linear(TEXT_WIDTH, EMBED, seed + 3)}


def _state_dict(parts: dict[str, torch.nn.Module], suffix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        out.update(under_prefix(f"{name}{suffix}.", module))
    # med.py builds cross-attention only in layers >= fusion_layer.
    return {k: v for k, v in out.items() if not any(f".layer.{i}.crossattention." in k for i in range(FUSION))}


def save_bert_tokenizer(directory: Path) -> None:
    """bert-base-uncased's three tokenizer files, over a tiny vocabulary ([PAD] 0, as BERT's)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + WORDS + [f"w{i}" for i in range(VOCAB - len(specials) - len(WORDS))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": MAXLEN}))
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": VOCAB}))


@pytest.fixture(scope="module")
def lavis() -> dict:
    online, momentum = _parts(40), _parts(50)
    state = {**_state_dict(online, ""), **_state_dict(momentum, "_m"),
             **under_prefix("itm_head.", make_linear(TEXT_WIDTH, 2, 60)), "temp": torch.tensor(0.0421),
             "image_queue": F.normalize(torch.randn(EMBED, QUEUE), dim=0),
             "text_queue": F.normalize(torch.randn(EMBED, QUEUE), dim=0),
             "idx_queue": torch.full((1, QUEUE), -100), "queue_ptr": torch.tensor([2])}
    return {"state": state, "online": online}


def save_checkpoint(directory: Path, state: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 4}, directory / WEIGHTS)  # LAVIS's {"model": state_dict, ...}
    save_bert_tokenizer(directory)
    return directory


def test_lavis_checkpoint_gives_the_reference_similarities(lavis: dict, tmp_path: Path) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", lavis["state"])
    model = load_model("albef_retrieval", "coco", checkpoint=directory)
    pixels, normalised = images(2, seed=3)
    tokens = AutoTokenizer.from_pretrained(str(directory))(TEXTS, padding="longest", return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids[0, 0].item() == 2 and ids[0, 4].item() == 3  # [CLS] a red circle [SEP]: the tokenizer is BERT's
    parts = lavis["online"]
    with torch.no_grad():
        image_tokens = parts["visual_encoder"].forward_features(normalised)
        image_feat = F.normalize(parts["vision_proj"](image_tokens[:, 0]), dim=-1)
        bert = parts["text_encoder"]
        text = run_layers(bert.encoder.layer[:FUSION], bert.embeddings(input_ids=ids), mask, None)
        text_feat = F.normalize(parts["text_proj"](text[:, 0]), dim=-1)
        fused = run_layers(bert.encoder.layer[FUSION:], text, mask, image_tokens)
        expected_itm = F.linear(fused[:, 0], lavis["state"]["itm_head.weight"], lavis["state"]["itm_head.bias"])[:, 1]
        features = model.extract_features({"image": pixels, "text_input": TEXTS})
        ours_tokens, _ = model.image_features(pixels)
        itm = model.itm_match_scores(ours_tokens, ids, mask)
    assert_close(features["image_embeds"] @ features["text_embeds"].t(), image_feat @ text_feat.t())
    assert_close(itm, expected_itm)
    torch.testing.assert_close(model.logit_scale().double(), 1 / torch.tensor(0.0421).double(), rtol=1e-6, atol=0.0)
    assert bool(model.momentum_ready) and model.queue_ptr.item() == 2
    assert torch.equal(model.momentum_model.text_proj.weight, lavis["state"]["text_proj_m.weight"])
    # The MLM head the checkpoint lacks keeps its initialisation; its tied projection is the embeddings'.
    assert model.model.mlm_head.decoder.weight is model.model.text.word_embeddings.weight


def test_the_cache_directory_is_read_without_checkpoint(lavis: dict, _offline_tiny_entry: Path) -> None:
    save_checkpoint(_offline_tiny_entry, lavis["state"])
    model = load_model("albef_retrieval", "coco")
    assert torch.equal(model.model.vision_proj.weight, lavis["state"]["vision_proj.weight"])


def test_offline_without_the_files_fails_fast_naming_them(_offline_tiny_entry: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        load_model("albef_retrieval", "coco")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert str(_offline_tiny_entry / "vocab.txt") in message
    assert f"{WEIGHTS} from https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/ALBEF/{WEIGHTS}" in message
    assert "vocab.txt, tokenizer_config.json, config.json from https://huggingface.co/google-bert/bert-base-uncased" in message
    save_bert_tokenizer(_offline_tiny_entry)  # the tokenizer there, the weights not: the weights are named
    with pytest.raises(WeightsNotFoundError, match=str(_offline_tiny_entry / WEIGHTS).replace(".", r"\.")):
        load_model("albef_retrieval", "coco")


@pytest.mark.parametrize("key", ["prompt_embeddings", "text_encoder.cls.predictions.bias"])
def test_an_unexpected_checkpoint_key_is_named(lavis: dict, tmp_path: Path, key: str) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", {**lavis["state"], key: torch.zeros(1)})
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        load_model("albef_retrieval", "coco", checkpoint=directory)


def test_online_the_weights_are_downloaded_whole(lavis: dict, tmp_path: Path, _offline_tiny_entry: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A file:// address stands in for the web; the tokenizer is already cached, so the hub is not asked."""
    source = save_checkpoint(tmp_path / "web", lavis["state"]) / WEIGHTS
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    save_bert_tokenizer(_offline_tiny_entry)
    entry = dataclasses.replace(zoo.find_entry("albef_retrieval", "coco"), source=f"url:{source.as_uri()}")
    assert url_model_dir(entry) == _offline_tiny_entry
    assert (_offline_tiny_entry / WEIGHTS).read_bytes() == source.read_bytes()
    missing = dataclasses.replace(entry, source=f"url:{(tmp_path / 'nowhere.pt').as_uri()}", weights=("other.pt",))
    with pytest.raises(WeightsNotFoundError, match="other.pt is missing and fetching failed"):
        url_model_dir(missing)
    assert set(os.listdir(_offline_tiny_entry)) == {"config.json", "tokenizer_config.json", WEIGHTS, "vocab.txt"}


def test_a_short_download_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 100)

    class Short:
        headers = {"Content-Length": "200"}

        def __init__(self) -> None:
            self.body = source.open("rb")

        def read(self, size: int = -1) -> bytes:
            return self.body.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.body.close()

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Short())
    with pytest.raises(OSError, match="sent 100 of its 200 bytes"):
        download("https://example.invalid/w.pt", tmp_path / "out" / "w.pt")
    assert os.listdir(tmp_path / "out") == []


def test_download_removes_the_parts_of_killed_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A SIGKILLed download leaves its part behind; the next download of the file removes it, but not
    # the part of a download still running (here: this test's parent process) nor another host's.
    import io
    import subprocess
    import sys

    from vlforge.hub.sources import _HOST, download

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".w.pt.{_HOST}.{int(dead.stdout)}.part"
    running = out / f".w.pt.{_HOST}.{os.getppid()}.part"
    elsewhere = out / ".w.pt.other-host.1.part"
    for part in (stale, running, elsewhere):
        part.write_bytes(b"x" * 10)

    class Whole(io.BytesIO):
        headers = {"Content-Length": "4"}

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Whole(b"abcd"))
    download("https://example.invalid/w.pt", out / "w.pt")
    assert (out / "w.pt").read_bytes() == b"abcd"
    assert sorted(os.listdir(out)) == sorted(["w.pt", running.name, elsewhere.name])


def test_original_albef_token_type_table_is_folded(lavis: dict) -> None:
    """Original ALBEF's mscoco.pth has this layout plus BERT's token type table (LAVIS's med.py drops it):
    row 0, the only type ALBEF uses, folds into the position embeddings, as for its pretraining files."""
    from vlforge.models.albef.convert import albef_retrieval_from_lavis

    table = torch.randn(2, TEXT_WIDTH)
    state = {**lavis["state"], "text_encoder.embeddings.token_type_embeddings.weight": table,
             "text_encoder_m.embeddings.token_type_embeddings.weight": table}
    converted = albef_retrieval_from_lavis(state)
    assert torch.equal(converted["model.text.position_embeddings.weight"],
                       state["text_encoder.embeddings.position_embeddings.weight"] + table[0])
    assert not any("mlm_head" in key for key in converted)
