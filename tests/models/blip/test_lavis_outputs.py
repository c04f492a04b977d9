"""LAVIS's BLIP checkpoints through `load_model(..., checkpoint=<.pth>)` give LAVIS's outputs: tiny
models built and run by LAVIS 1.0.2 itself (tests/fixtures/lavis/make_fixtures.py), compared at 1e-5 on
floats and exactly on token ids and strings. The rows carry what LAVIS runs with (ViT eps 1e-6, [ENC]
for image-grounded text encoding, VQA answers ranked by the 0.1-smoothed loss)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.lavis_fixtures import (  # noqa: F401 - offline_home is a fixture
    TOL,
    assert_ranked_answers,
    assert_retrieval_matches,
    expected,
    offline_home,
    tiny_overrides,
    tokens,
    weights,
)
from vlforge import load_model, normalized_pixels
from vlforge.datasets.collate import Collator
from vlforge.datasets.samples import VQASample
from vlforge.datasets.shards import RawSample

pytestmark = pytest.mark.usefixtures("offline_home")


def _load(name: str, model_type: str, embed: bool = False):
    return load_model(name, model_type, checkpoint=weights(name), overrides=tiny_overrides(embed=embed))


def test_caption_loss_and_captions() -> None:
    ref = expected("blip_caption")
    model = _load("blip_caption", "base_coco")
    ids, mask = tokens(model, ref["captions"], 40)
    loss = model({"image": ref["pixels"], "text_input_ids": ids, "text_attention_mask": mask}).loss
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    lengths = ref["generate"]
    for beams, key in ((3, "beam"), (1, "greedy")):
        prompt = torch.tensor([model.prompt_ids()] * 3)
        out = model.generate_ids(ref["pixels"], prompt, num_beams=beams, **lengths)
        assert out.tolist() == ref[f"{key}_ids"].tolist(), key
        assert model.generate({"image": ref["pixels"]}, num_beams=beams, **lengths) == ref[f"{key}_captions"]


def test_images_normalised_by_lavis_processors_go_in_as_normalized_pixels() -> None:
    ref = expected("blip_caption")
    model = _load("blip_caption", "base_coco")
    captions = model.generate({"image": normalized_pixels(ref["image"])}, num_beams=3, **ref["generate"])
    assert captions == ref["beam_captions"]
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*normalized_pixels"):
        model.generate({"image": ref["image"]})


def test_vqa_answers_generated_and_ranked() -> None:
    ref = expected("blip_vqa")
    model = _load("blip_vqa", "vqav2")
    samples = {"image": ref["pixels"], "text_input": ref["questions"]}
    ids, mask = tokens(model, ref["questions"], 35)
    for beams, key in ((3, "beam"), (1, "greedy")):
        assert model.predict_answers(samples, num_beams=beams, max_length=10) == ref[f"{key}_answers"], key
        out = model.generate_answer_ids(ref["pixels"], ids, mask, max_length=10, num_beams=beams)
        assert out.tolist() == ref[f"{key}_ids"].tolist(), key
    assert_ranked_answers(model, ref)


def test_vqa_weighted_training_loss_through_the_data_pipeline() -> None:
    # LAVIS's training loss on every distinct answer weighted by its share of the annotators: the
    # fixture's weights (1.0; 0.6 / 0.4; 0.7 / 0.3) come from these annotators through VQASample.
    ref = expected("blip_vqa")
    model = _load("blip_vqa", "vqav2")
    annotators = [["red"] * 10, ["two"] * 6 + ["one"] * 4, ["table"] * 7 + ["on the table"] * 3]
    sample = VQASample(lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1), str, train=True,
                       weighted_answers=True)
    rows = []
    for i, (question, answers) in enumerate(zip(ref["questions"], annotators)):
        png = io.BytesIO()
        Image.fromarray(ref["pixels"][i].permute(1, 2, 0).numpy()).save(png, format="PNG")
        meta = {"image_id": str(i), "question": question, "answers": answers}
        rows.append(sample(RawSample(str(i), "shard-0.tar", {"png": png.getvalue(), "json": json.dumps(meta).encode()})))
    assert [a for row in rows for a in row["answer"]] == ref["train_answers"]
    assert [w for row in rows for w in row["answer_weight"]] == pytest.approx(ref["train_weights"])
    batch = Collator(model.tokenizer_name, 35, ("question", "answer"))(rows)
    assert torch.equal(batch["image"], ref["pixels"])
    with torch.no_grad():
        loss = model(batch).loss
    torch.testing.assert_close(loss, ref["train_loss"], **TOL)


def test_image_text_matching_and_lavis_retrieval_scores() -> None:
    ref = expected("blip_image_text_matching")
    model = _load("blip_image_text_matching", "base", embed=True)
    ids, mask = tokens(model, ref["texts"], 35)
    with torch.no_grad():
        image_tokens, _ = model.image_features(ref["pixels"])
        torch.testing.assert_close(model.itm_logits(image_tokens, ids, mask), ref["itm_logits"], **TOL)
    assert_retrieval_matches(model, ref)


def test_feature_extractor_features() -> None:
    ref = expected("blip_feature_extractor")
    model = _load("blip_feature_extractor", "base", embed=True)
    features = model.extract_features({"image": ref["pixels"], "text_input": ref["texts"]}, max_text_len=40)
    torch.testing.assert_close(features["image_embeds"], ref["image_embeds_proj"][:, 0], **TOL)
    torch.testing.assert_close(features["text_embeds"], ref["text_embeds_proj"][:, 0], **TOL)
    ids, mask = tokens(model, ref["texts"], 40)
    with torch.no_grad():
        image_tokens, _ = model.image_features(ref["pixels"])
        torch.testing.assert_close(image_tokens, ref["image_embeds"], **TOL)
        torch.testing.assert_close(model.text_encoder(ids, mask), ref["text_embeds"], **TOL)
        multimodal = model.text_encoder(torch.cat([torch.full_like(ids[:, :1], model.enc_token_id), ids[:, 1:]], 1),
                                        mask, encoder_hidden_states=image_tokens)
    torch.testing.assert_close(multimodal, ref["multimodal_embeds"], **TOL)
