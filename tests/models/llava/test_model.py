"""The LLaVA-style model: image features spliced where `<image>` is, loss on the answers only, what
trains in each stage, generation from text prompts, LoRA, and 4-bit loading of the LM."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlforge.datasets.conversation import IGNORE, IMAGE_TOKEN_ID, ConversationTemplate, encode_conversation
from vlforge.datasets.demo_tokenizer import SPECIAL_TOKENS, save_vocab_tokenizer
from vlforge.models.llava.model import Llava

WORDS = ["user", "assistant", ":", "what", "colour", "is", "it", "red", "blue", "a", "circle", "square"]
LM = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
          bos_token_id=5, eos_token_id=3)
VISION = dict(name="resnet10t")
TEMPLATE = dict(name="chat", system="", user="user", assistant="assistant")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    save_vocab_tokenizer([*SPECIAL_TOKENS, *WORDS], directory)
    return directory


def build(tokenizer_dir: Path, vision: dict | None = None, **kwargs) -> Llava:
    torch.manual_seed(0)
    return Llava(vision or VISION, {"config": LM}, tokenizer=str(tokenizer_dir), template=TEMPLATE, **kwargs)


def batch_of(tokenizer_dir: Path, answers: list[str]) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [encode_conversation(tok, ConversationTemplate(**TEMPLATE),
                                [{"from": "human", "value": "<image>\nwhat colour is it"}, {"from": "gpt", "value": a}], 64)
            for a in answers]
    longest = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r[0] + [0] * (longest - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [IGNORE] * (longest - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (longest - len(r[0])) for r in rows])
    image = torch.randint(0, 256, (len(answers), 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return {"image": image, "input_ids": ids, "labels": labels, "attention_mask": mask}


def test_image_features_replace_the_placeholder_and_only_answers_are_scored(tokenizer_dir: Path) -> None:
    model = build(tokenizer_dir).eval()
    batch = batch_of(tokenizer_dir, ["red", "a blue square"])
    embeds, mask, labels = model._splice(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         left_pad=False)
    features = model.image_features(batch["image"])
    n = features.shape[1]
    at = int((batch["input_ids"][1] == IMAGE_TOKEN_ID).nonzero()[0])
    torch.testing.assert_close(embeds[1, at:at + n], features[1])
    assert labels[1, at:at + n].eq(IGNORE).all()
    assert mask[1].sum() == batch["attention_mask"][1].sum() + n - 1
    # The loss is the mean next-token loss over the answer tokens, computed by hand here.
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    scored = labels[:, 1:] != IGNORE
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][scored], labels[:, 1:][scored])
    torch.testing.assert_close(model(batch).loss, by_hand)
    assert scored.sum() == (batch["labels"] != IGNORE).sum()


def _splice_row_by_row(model: Llava, image, input_ids, attention_mask, labels, left_pad: bool):
    """The splice written the obvious way, one row at a time: the reference for the batched one."""
    from vlforge.datasets.instruct import pad_rows

    features = model.image_features(image)
    text = model.language_model.get_input_embeddings()(input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, 0))
    rows, targets = [], []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids_b, text_b, labels_b = input_ids[b][keep], text[b][keep], labels[b][keep]
        where = (ids_b == IMAGE_TOKEN_ID).nonzero()
        if len(where):
            at = int(where[0])
            text_b = torch.cat([text_b[:at], features[b], text_b[at + 1:]])
            labels_b = torch.cat([labels_b[:at], labels_b.new_full((features.shape[1],), IGNORE), labels_b[at + 1:]])
        rows.append(text_b)
        targets.append(labels_b)
    embeds, mask = pad_rows(rows, 0.0, left=left_pad)
    return embeds, mask, pad_rows(targets, IGNORE, left=left_pad)[0]


@pytest.mark.parametrize("left_pad", [False, True])
def test_batched_splice_equals_splicing_row_by_row(tokenizer_dir: Path, left_pad: bool) -> None:
    model = build(tokenizer_dir).eval()
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(6, 20, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, :3], mask[3, 7:] = 0, 0, 0  # right pads, left pads (a generation prompt), more right pads
    ids[0, 2], ids[1, 0], ids[2, 5] = IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID
    ids[3, 8] = IMAGE_TOKEN_ID  # row 3: text only, an image token under its padding mask is padding
    labels = torch.where(torch.rand(4, 9, generator=generator) < 0.5, ids, IGNORE).masked_fill(ids == IMAGE_TOKEN_ID, IGNORE)
    image = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        got = model._splice(image, ids, mask, labels, left_pad=left_pad)
    ids[3, 8] = 7  # the row-by-row reference drops masked positions before looking for the image
    with torch.no_grad():
        expected = _splice_row_by_row(model, image, ids, mask, labels, left_pad)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e)


def test_pretraining_stage_trains_the_projector_alone(tokenizer_dir: Path) -> None:
    model = build(tokenizer_dir, freeze_language_model=True, vision={**VISION, "freeze": True})
    model.train()
    model(batch_of(tokenizer_dir, ["red", "blue"])).loss.backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {"projector"}
    assert not model.language_model.training  # a frozen LM keeps dropout off


def test_lora_trains_adapters_and_the_projector(tokenizer_dir: Path) -> None:
    model = build(tokenizer_dir, lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith(("projector", "vision")) for name in trainable)
    assert any("lora_" in name for name in trainable)
    model(batch_of(tokenizer_dir, ["red", "blue"])).loss.backward()


def test_generate_from_text_prompts_matches_collated_prompts(tokenizer_dir: Path) -> None:
    model = build(tokenizer_dir).eval()
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    texts = model.generate({"image": image, "text_input": ["what colour is it", "what is it"]}, max_length=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompts = [encode_conversation(tok, ConversationTemplate(**TEMPLATE), [{"from": "human", "value": f"<image>\n{q}"}],
                                   64, prompt_only=True)[0] for q in ["what colour is it", "what is it"]]
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    assert model.generate({"image": image, "prompt_input_ids": ids, "prompt_attention_mask": mask}, max_length=5) == texts
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        model.generate({"image": image, "text_input": "what is it"})


def test_two_images_in_one_sample_are_refused(tokenizer_dir: Path) -> None:
    model = build(tokenizer_dir)
    batch = batch_of(tokenizer_dir, ["red"])
    batch["input_ids"][0, -2] = IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match="2 image tokens"):
        model(batch)


def test_4bit_language_model_is_smaller_and_finite(tokenizer_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    config = {k: v for k, v in LM.items() if k != "model_type"}
    config.update(hidden_size=256, intermediate_size=512)
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.float16).save_pretrained(str(tmp_path / "lm"))
    full = Llava(VISION, {"pretrained": str(tmp_path / "lm")}, tokenizer=str(tokenizer_dir), template=TEMPLATE)
    quantized = Llava(VISION, {"pretrained": str(tmp_path / "lm")}, tokenizer=str(tokenizer_dir), template=TEMPLATE,
                      load_4bit=True, compute_dtype="float32")
    linear_bytes = lambda m: sum(p.numel() * p.element_size() for n, p in m.language_model.model.layers.named_parameters()  # noqa: E731
                                 if n.endswith("proj.weight"))
    fp16_bytes = sum(p.numel() * 2 for n, p in full.language_model.model.layers.named_parameters() if n.endswith("proj.weight"))
    ratio = fp16_bytes / linear_bytes(quantized)
    assert 3.5 < ratio <= 4.0, ratio  # 4-bit codes, against fp16; the heads and embeddings are not quantized
    assert type(quantized.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not any(p.requires_grad for p in quantized.language_model.parameters())
    batch = batch_of(tokenizer_dir, ["red", "a blue square"])
    assert torch.isfinite(quantized.eval()(batch).loss)


def test_device_map_places_a_pretrained_lm_and_is_refused_for_a_config(tokenizer_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LM.items() if k != "model_type"})).save_pretrained(str(tmp_path / "lm"))
    model = Llava(VISION, {"pretrained": str(tmp_path / "lm"), "device_map": "auto"}, tokenizer=str(tokenizer_dir),
                  template=TEMPLATE).eval()
    # Spread over the visible GPUs; on a machine without any, everything stays on the CPU.
    expected = {str(torch.device(d)) if isinstance(d, int) else d for d in
                getattr(model.language_model, "hf_device_map", {"": "cpu"}).values()}
    assert {str(p.device) for p in model.language_model.parameters()} <= {"cpu", *expected} | {f"cuda:{d}" for d in range(8)}
    assert torch.isfinite(model(batch_of(tokenizer_dir, ["red", "a blue square"])).loss)
    with pytest.raises(ValueError, match="apply to a pretrained LM"):
        Llava(VISION, {"config": LM, "device_map": "auto"})


def test_precomputed_image_features_give_the_same_loss_and_answers(tokenizer_dir: Path) -> None:
    model = build(tokenizer_dir).eval()
    batch = batch_of(tokenizer_dir, ["red", "a blue square"])
    with torch.no_grad():
        features = model.image_features(batch["image"])
        torch.testing.assert_close(model({**batch, "image_features": features}).loss, model(batch).loss)
        prompts = {"image": batch["image"], "text_input": ["what colour is it", "what is it"]}
        assert model.generate({**prompts, "image_features": features}, max_length=4) == model.generate(prompts, max_length=4)
        # The features are what is used: others change the loss.
        assert not torch.allclose(model({**batch, "image_features": features.flip(0)}).loss, model(batch).loss)
