"""LAVIS's stage-1 BLIP-2 checkpoints (blip2, blip2_feature_extractor, blip2_image_text_matching)
through `load_model(..., checkpoint=<.pth>)` give LAVIS's outputs: a tiny Blip2ITM built and run by
LAVIS 1.0.2 itself (tests/fixtures/lavis/make_fixtures.py), saved as LAVIS saves a pretraining run
(without the frozen EVA tower, which comes from eva_vit_g.pth beside it), compared at 1e-5."""
from __future__ import annotations

import pytest
import torch

from tests.models.lavis_fixtures import (  # noqa: F401 - offline_home is a fixture
    FIXTURES,
    TOL,
    expected,
    offline_home,
    tokens,
    weights,
)
from vlforge import load_model
from vlforge.hub.sources import WeightsNotFoundError

pytestmark = pytest.mark.usefixtures("offline_home")

_VOCAB = len((FIXTURES / "vocab.txt").read_text().split())

# The fixture's sizes: an EVA ViT of 2 blocks at 56 px, a 2-layer Q-Former with 4 queries.
_TINY = ["model.vision.img_size=56", "model.vision.embed_dim=48", "model.vision.depth=2", "model.vision.num_heads=4",
         "model.qformer.num_queries=4", "model.qformer.width=32", "model.qformer.layers=2", "model.qformer.heads=4",
         "model.qformer.intermediate=64", "model.qformer.max_len=64", f"model.qformer.vocab_size={_VOCAB + 1}",
         "model.embed_dim=16", "data.train_image.size=56", "data.eval_image.size=56"]


@pytest.fixture(scope="module")
def ref() -> dict:
    return expected("blip2")


@pytest.mark.parametrize("name", ["blip2", "blip2_feature_extractor", "blip2_image_text_matching"])
def test_stage1_features_matching_and_losses(ref: dict, name: str) -> None:
    model = load_model(name, "pretrain", checkpoint=weights("blip2"), overrides=_TINY)
    features = model.extract_features({"image": ref["pixels"], "text_input": ref["texts"]}, max_text_len=32)
    torch.testing.assert_close(features["image_embeds"], ref["image_embeds_proj"], **TOL)
    torch.testing.assert_close(features["text_embeds"], ref["text_embeds_proj"][:, 0], **TOL)
    ids, mask = tokens(model, ref["texts"], 32)
    with torch.no_grad():
        image_tokens, image_emb = model.image_features(ref["pixels"])
        torch.testing.assert_close(model.itm_logits(image_tokens, ids, mask), ref["itm_logits"], **TOL)
        multimodal = model.encoder.qformer(image_tokens, ids, mask)[:, : model.num_queries]
        torch.testing.assert_close(multimodal, ref["multimodal_embeds"], **TOL)
        torch.testing.assert_close(features["image_embeds"].new_tensor(0) + (torch.einsum(
            "iqd,td->iqt", image_emb, model.encode_text(ids, mask)).amax(1)), ref["itc_similarity"], **TOL)
        losses = model({"image": ref["pixels"], "text_input_ids": ids, "text_attention_mask": mask}).losses
    torch.testing.assert_close(losses["itc"], ref["loss_itc"], **TOL)
    torch.testing.assert_close(losses["itg"], ref["loss_lm"], **TOL)


def test_without_the_tower_file_the_error_names_it(tmp_path, ref: dict) -> None:
    lone = tmp_path / "blip2.pth"
    lone.write_bytes(weights("blip2").read_bytes())
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    with pytest.raises(WeightsNotFoundError, match=r"eva_vit_g\.pth is missing and the network is off.*"
                                                   r"download .*LAVIS/models/BLIP2/eva_vit_g\.pth"):
        load_model("blip2", "pretrain", checkpoint=lone, overrides=_TINY)


# blip2_opt: the same tower and Q-Former sizes, no text in the Q-Former, the fixture's tiny OPT.
_TINY_OPT = [o for o in _TINY if not o.startswith(("model.qformer.vocab_size", "model.qformer.max_len",
                                                   "model.embed_dim"))]


def _saved_with_lm_files(tmp_path_factory: pytest.TempPathFactory, name: str, lm: str, files: tuple[str, ...]) -> tuple:
    """`name`.pth as LAVIS's runner saves it (no tower, no LM), beside eva_vit_g.pth and the LM's
    tokenizer files, as a user would keep them; and LAVIS's outputs."""
    directory = tmp_path_factory.mktemp(name)
    for source in (weights(name), FIXTURES / "eva_vit_g.pth", *(FIXTURES / lm / file for file in files)):
        (directory / source.name).write_bytes(source.read_bytes())
    return directory / f"{name}.pth", expected(name)


@pytest.fixture(scope="module")
def opt_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return _saved_with_lm_files(tmp_path_factory, "blip2_opt", "opt",
                                ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"))


def test_blip2_opt_loss_and_texts(opt_checkpoint: tuple) -> None:
    checkpoint, ref = opt_checkpoint
    model = load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=checkpoint,
                       overrides=[*_TINY_OPT, f"model.language_model.pretrained={FIXTURES / 'opt'}"])
    assert model.prompt == "a photo of" and model.eos_token_id() == tokens(model, ["\n"], 4)[0][0, 1]
    # The texts as the data pipeline gives them: the model ends each with "\n", as LAVIS's Blip2OPT does.
    # Of different lengths: each "\n" goes after its own text, before the padding.
    ids, mask = tokens(model, ref["texts"], 32)
    loss = model({"image": ref["pixels"], "text_input_ids": ids, "text_attention_mask": mask}).loss
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    prompt = ref["beam_ids"].shape[1] - ref["generate"]["max_length"]
    for beams, key in ((3, "beam"), (1, "greedy")):
        assert model.generate({"image": ref["pixels"]}, num_beams=beams, **ref["generate"]) == ref[f"{key}_texts"], key
        out = model.generate_ids(ref["pixels"], ref[f"{key}_ids"][:, :prompt], num_beams=beams,
                                 max_new_tokens=ref["generate"]["max_length"], eos_token_id=model.eos_token_id())
        assert out.tolist() == ref[f"{key}_ids"][:, prompt:].tolist(), key


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    # LAVIS's checkpoint keeps the T5's embed_tokens aliases of its frozen embedding (see the converter).
    return _saved_with_lm_files(tmp_path_factory, "blip2_t5", "t5",
                                ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))


def test_blip2_t5_loss_and_texts(t5_checkpoint: tuple) -> None:
    checkpoint, ref = t5_checkpoint
    model = load_model("blip2_t5", "caption_coco_flant5xl", checkpoint=checkpoint,
                       overrides=[*_TINY_OPT, f"model.language_model.pretrained={FIXTURES / 't5'}"])
    assert model.prompt == "a photo of" and model.language_model.config.dense_act_fn == "gelu"
    ids, mask = tokens(model, ref["targets"], 32)
    prompt_ids, prompt_mask = tokens(model, ref["prompts"], 32)
    with torch.no_grad():
        loss = model({"image": ref["pixels"], "text_input_ids": ids, "text_attention_mask": mask,
                      "prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask}).loss
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    # Beam search after the model's prompt; greedy after a prompt per image (padded on the right).
    beam = model.generate({"image": ref["pixels"]}, num_beams=3, **ref["beam"])
    assert beam == ref["beam_texts"]
    greedy = model.generate({"image": ref["pixels"], "prompt": ref["prompts"]}, num_beams=1, **ref["greedy"])
    assert greedy == ref["greedy_texts"]
    for key, beams, prompts in (("beam", 3, ["a photo of"] * 3), ("greedy", 1, ref["prompts"])):
        prompt_ids, prompt_mask = tokens(model, prompts, 32)
        out = model.generate_ids(ref["pixels"], prompt_ids, prompt_mask, num_beams=beams,
                                 max_new_tokens=ref[key]["max_length"], min_length=ref[key]["min_length"])
        assert out.tolist() == ref[f"{key}_ids"].tolist(), key


def test_blip2_t5_refuses_a_prompt_in_front_of_the_text(t5_checkpoint: tuple) -> None:
    checkpoint, ref = t5_checkpoint
    model = load_model("blip2_t5", "pretrain_flant5xl", checkpoint=checkpoint,
                       overrides=[*_TINY_OPT, f"model.language_model.pretrained={FIXTURES / 't5'}"])
    ids, mask = tokens(model, ref["targets"], 32)
    batch = {"image": ref["pixels"], "text_input_ids": ids, "text_attention_mask": mask,
             "text_prompt_length": torch.tensor([3, 3, 3])}
    with pytest.raises(ValueError, match=r"data\.prompts\.text: ''"):
        model(batch)
