"""load_model / load_model_and_preprocess / model_zoo over HF-format checkpoints placed locally (tiny
random BLIPs saved by transformers, with a tiny tokenizer), and the offline errors when they are not."""
from __future__ import annotations

import json
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

from tests.models.perturb import noisy
from tests.models.tiny_blip import BOS, IMAGE, PAD, SEP, VOCAB, hf_config, images
from vlforge import load_model, load_model_and_preprocess, model_zoo
from vlforge.datasets.demo_tokenizer import save_vocab_tokenizer
from vlforge.hub.sources import WeightsNotFoundError
from vlforge.hub.zoo import ENTRIES
from vlforge.models.towers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

WORDS = ["a", "picture", "of", "red", "blue", "circle", "square", "what", "colour", "is", "the", "?"]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("VLFORGE_HOME", str(home))
    # Never the machine's own Hugging Face cache (huggingface_hub reads HF_HOME when it is imported).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def save_tiny_tokenizer(directory: Path) -> None:
    """A BERT tokenizer whose special ids are the tiny config's: [PAD] 0, [DEC] 1 (bos), [SEP] 2; with
    the vocab.txt an HF BLIP repository ships beside tokenizer.json."""
    specials = ["[PAD]", "[DEC]", "[SEP]", "[CLS]", "[UNK]", "[MASK]"]
    tokens = specials + WORDS + [f"w{i}" for i in range(VOCAB - len(specials) - len(WORDS))]
    save_vocab_tokenizer(tokens, directory)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")


def save_hf_model(model_class: type, directory: Path, **config: object) -> torch.nn.Module:
    torch.manual_seed(0)
    hf = noisy(model_class(hf_config(**config)), seed=0)
    hf.save_pretrained(str(directory))
    save_tiny_tokenizer(directory)
    return hf


def test_model_zoo_lists_lavis_names_and_where_weights_come_from() -> None:
    table = str(model_zoo)
    for name, model_type in [("blip_caption", "base_coco"), ("blip_caption", "large_coco"), ("blip_vqa", "vqav2"),
                             ("blip_retrieval", "coco"), ("blip_retrieval", "flickr"),
                             ("clip_feature_extractor", "ViT-B-32"), ("clip_feature_extractor", "ViT-B-16"),
                             ("clip_feature_extractor", "ViT-L-14")]:
        assert any(e.name == name and e.model_type == model_type for e in ENTRIES)
    assert "hf:Salesforce/blip-image-captioning-base" in table and "run:runs/blip_caption_demo" in table
    assert len(model_zoo) == len(table.splitlines()) - 2


def test_unknown_names_and_types_list_what_exists() -> None:
    with pytest.raises(ValueError, match="unknown model 'blip_captions'.*blip_caption"):
        load_model("blip_captions", "base_coco")
    with pytest.raises(ValueError, match="has no type 'base'; its types: base_coco, large_coco, demo"):
        load_model("blip_caption", "base")


def test_offline_without_the_files_fails_fast_naming_the_file(_offline_cache: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        load_model("blip_caption", "base_coco")
    assert time.perf_counter() - start < 5
    missing = _offline_cache / "models" / "blip_caption" / "base_coco" / "config.json"
    assert str(missing) in str(err.value)
    assert "https://huggingface.co/Salesforce/blip-image-captioning-base" in str(err.value)


def test_a_demo_entry_without_its_run_says_which_recipe_makes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError, match="recipe=blip_vqa_demo"):
        load_model("blip_vqa", "demo")
    with pytest.raises(WeightsNotFoundError, match="checkpoint=.*nowhere: no such file"):
        load_model("blip_vqa", "demo", checkpoint=tmp_path / "nowhere")


def test_caption_model_from_the_cache_matches_transformers(_offline_cache: Path) -> None:
    hf = save_hf_model(BlipForConditionalGeneration, _offline_cache / "models" / "blip_caption" / "base_coco")
    model, vis, txt = load_model_and_preprocess("blip_caption", "base_coco")
    assert not model.training
    pixels, normalised = images(2, seed=5)
    ids = torch.tensor([[BOS, 6, 7, 8, 9, SEP], [BOS, 6, 7, 10, SEP, PAD]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        expected = hf(pixel_values=normalised, input_ids=ids, attention_mask=mask).logits
        got = model.logits(model.image_tokens(pixels), ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)
    # The prompt comes from the recipe and the tokenizer from the checkpoint's directory.
    assert (model.bos_token_id, model.eos_token_id, model.prompt_length) == (BOS, SEP, 4)
    image = vis["eval"](Image.new("RGB", (50, 40), (200, 30, 30)))
    assert image.dtype == torch.uint8 and image.shape == (3, IMAGE, IMAGE)
    captions = model.generate({"image": image[None]}, num_beams=1, max_length=9, min_length=7)
    # The text a user reads: transformers' greedy caption of the same pixels and prompt, decoded by the
    # checkpoint's own tokenizer, its prompt cut off.
    tok = AutoTokenizer.from_pretrained(str(_offline_cache / "models" / "blip_caption" / "base_coco"))
    prompt = tok(["a picture of "], return_tensors="pt").input_ids
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = hf.generate(pixel_values=(image[None].float() / 255 - mean) / std, input_ids=prompt,
                                max_length=9, min_length=7, num_beams=1, do_sample=False)
    expected = tok.decode(reference[0, prompt.shape[1] - 1:], skip_special_tokens=True).strip()
    assert len(expected.split()) >= 3  # a caption of words, not an empty string
    assert captions == [expected]
    assert txt["eval"]("A Picture, of THE Circle.") == "a picture, of the circle"


def test_a_snapshot_in_the_hugging_face_cache_loads_offline(tmp_path: Path) -> None:
    # The layout huggingface_hub writes: models--<org>--<name>/refs/main naming a snapshot directory.
    repo = tmp_path / "hf_home" / "hub" / "models--Salesforce--blip-image-captioning-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    hf = save_hf_model(BlipForConditionalGeneration, repo / "snapshots" / "0123abcd")
    model = load_model("blip_caption", "base_coco")
    pixels, normalised = images(1, seed=6)
    ids = torch.tensor([[BOS, 6, 7, SEP]])
    with torch.no_grad():
        expected = hf(pixel_values=normalised, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = model.logits(model.image_tokens(pixels), ids, torch.ones_like(ids))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_vqa_and_retrieval_load_from_a_checkpoint_directory(tmp_path: Path) -> None:
    vqa_hf = save_hf_model(BlipForQuestionAnswering, tmp_path / "vqa")
    vqa = load_model("blip_vqa", "vqav2", checkpoint=tmp_path / "vqa")
    hf_state = {k: v for k, v in vqa_hf.state_dict().items() if k.startswith("vision_model.")}
    assert torch.equal(vqa.vision.backbone.patch_embed.proj.weight, hf_state["vision_model.embeddings.patch_embedding.weight"])
    # LAVIS's call: question strings under text_input, tokenized by the checkpoint's own tokenizer.
    pixels, _ = images(2, seed=4)
    questions = ["what colour is the circle?", "what is the square?"]
    answers = vqa.predict_answers({"image": pixels, "text_input": questions}, max_length=6)
    tokens = AutoTokenizer.from_pretrained(str(tmp_path / "vqa"))(questions, padding="longest", return_tensors="pt")
    assert answers == vqa.predict_answers({"image": pixels, "question_input_ids": tokens["input_ids"],
                                           "question_attention_mask": tokens["attention_mask"]}, max_length=6)
    with pytest.raises(ValueError, match="1 questions for 2 images"):
        vqa.predict_answers({"image": pixels, "text_input": "what is it?"})

    itm_hf = save_hf_model(BlipForImageTextRetrieval, tmp_path / "itm", image_text_hidden_size=24)
    itm = load_model("blip_retrieval", "coco", checkpoint=tmp_path / "itm")
    pixels, normalised = images(2, seed=9)
    ids = torch.tensor([[3, 6, 7, 8, SEP], [3, 9, 10, SEP, PAD]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        expected = itm_hf(input_ids=ids, pixel_values=normalised, attention_mask=mask, use_itm_head=False).itm_score
        got = itm.encode_image(pixels) @ itm.encode_text(ids, mask).t()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # extract_features on strings (LAVIS's text_input) tokenizes with the checkpoint's tokenizer.
    texts = ["a red circle", "the blue square"]
    features = itm.extract_features({"image": pixels, "text_input": texts})
    tokens = AutoTokenizer.from_pretrained(str(tmp_path / "itm"))(texts, padding="longest", return_tensors="pt")
    torch.testing.assert_close(features["text_embeds"], itm.encode_text(tokens["input_ids"], tokens["attention_mask"]))
    torch.testing.assert_close(features["image_embeds"], itm.encode_image(pixels))
    assert set(itm.extract_features({"image": pixels}, mode="image")) == {"image_embeds"}


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_key(tmp_path: Path) -> None:
    hf = save_hf_model(BlipForConditionalGeneration, tmp_path / "caption")
    del hf
    with pytest.raises(Exception, match="missing|unexpected|no vlforge name"):
        load_model("blip_vqa", "vqav2", checkpoint=tmp_path / "caption")


def test_openai_clip_from_an_open_clip_directory_keeps_quick_gelu(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    from vlforge.models.towers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model_cfg = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}}
    torch.manual_seed(0)
    reference = open_clip.CLIP(**model_cfg).eval()
    directory = tmp_path / "clip"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_tiny_tokenizer(directory)  # stands in for CLIP's BPE files: the tower reads ids either way
    (directory / "vocab.json").write_text("{}")
    (directory / "merges.txt").write_text("")

    model, vis, _ = load_model_and_preprocess("clip_feature_extractor", "ViT-B-16", checkpoint=directory)
    assert type(model.text.blocks[0].mlp[1]).__name__ == "QuickGELU"
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    tokens = AutoTokenizer.from_pretrained(str(directory))(["a red circle", "what is it"], padding="longest",
                                                          return_tensors="pt")
    with torch.no_grad():
        expected_image = reference.encode_image((pixels.float() / 255 - mean) / std, normalize=True)
        features = model.extract_features({"image": pixels, "text_input": ["a red circle", "what is it"]})
    torch.testing.assert_close(features["image_embeds"], expected_image, rtol=1e-4, atol=1e-5)
    # open_clip pools at the largest id (its end token); the tiny tokenizer ends with [SEP] instead,
    # so the reference pools at each text's last real token here the way vlforge does.
    with torch.no_grad():
        hidden = reference.transformer(reference.token_embedding(tokens["input_ids"]) + reference.positional_embedding[:tokens["input_ids"].shape[1]],
                                       attn_mask=reference.attn_mask[:tokens["input_ids"].shape[1], :tokens["input_ids"].shape[1]])
        hidden = reference.ln_final(hidden)
        last = tokens["attention_mask"].sum(1) - 1
        expected_text = torch.nn.functional.normalize(hidden[torch.arange(2), last] @ reference.text_projection, dim=-1)
    torch.testing.assert_close(features["text_embeds"], expected_text, rtol=1e-4, atol=1e-5)
    assert vis["eval"](Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_a_source_picks_the_release_and_a_pth_means_lavis(tmp_path: Path) -> None:
    from vlforge.hub.zoo import find_entry

    assert find_entry("blip_vqa", "vqav2").origin == "hf"  # the first row of a type is the default
    lavis = find_entry("blip_vqa", "vqav2", source="lavis")
    assert lavis.special_tokens and "++model.enc_token_id='[ENC]'" in lavis.overrides
    with pytest.raises(ValueError, match="has no source 'open_clip'; its sources: hf, lavis"):
        load_model("blip_vqa", "vqav2", source="open_clip")
    with pytest.raises(WeightsNotFoundError, match=r"models/lavis/blip_vqa/vqav2/vocab\.txt is missing"):
        load_model("blip_vqa", "vqav2", source="lavis")
    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"")
    with pytest.raises(ValueError, match="'clip_feature_extractor' type 'ViT-B-16' has no source 'lavis'"):
        load_model("clip_feature_extractor", "ViT-B-16", checkpoint=pth)
