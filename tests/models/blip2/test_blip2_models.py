"""BLIP-2: the Q-Former's attention masks, stage-1 losses, and the stage-2 visual prefix to a causal LM."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from tests.models.training import loss_parts_before_and_after
from vlforge.models.blip2.causal_lm import Blip2CausalLM
from vlforge.models.blip2.pretrain import Blip2Pretrain
from vlforge.models.fusion.qformer import QFormer
from vlforge.models.language.causal_lm import build_causal_lm, build_seq2seq_lm
from vlforge.models.layers.contrastive import contrastive_loss, image_text_similarity

VISION = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=4)
QFORMER = dict(num_queries=4, width=32, layers=2, heads=4, intermediate=64, cross_every=2, vocab_size=50, max_len=16)
LM = dict(model_type="opt", vocab_size=50, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
          max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Four image/caption pairs whose captions depend on the image, so every objective can learn.
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 10, 2], [1, 11, 12, 13, 2], [1, 14, 15, 2, 0]])
    return {"image": images, "text_input_ids": ids, "text_attention_mask": (ids != 0).long()}


def test_qformer_masks_decide_who_sees_whom() -> None:
    torch.manual_seed(0)
    qformer = QFormer(image_width=24, **QFORMER).eval()
    image = torch.randn(2, 5, 24)
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    other = ids.clone()
    other[:, 2:] = 20
    q = qformer.num_queries

    # ITG: queries never see the text; text token i sees the queries and tokens <= i only.
    a = qformer(image, ids, causal_text=True)
    b = qformer(image, other, causal_text=True)
    assert torch.allclose(a[:, :q], b[:, :q]) and torch.allclose(a[:, :q], qformer(image))
    assert torch.allclose(a[:, q : q + 2], b[:, q : q + 2]) and not torch.allclose(a[:, q + 2 :], b[:, q + 2 :])
    assert not torch.allclose(a[:, q:], qformer(image * 2, ids, causal_text=True)[:, q:])  # the image reaches the text
    # ITM: bidirectional, so the queries read the text.
    assert not torch.allclose(qformer(image, ids)[:, :q], qformer(image, other)[:, :q])
    # Text alone: no queries, no image.
    assert qformer(input_ids=ids).shape == (2, 4, 32)
    # Padding is invisible.
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    assert torch.allclose(qformer(image, padded, mask)[:, : q + 4], qformer(image, ids), atol=1e-5)


def test_qformer_cross_attends_every_kth_layer_and_stage2_has_no_text_parts() -> None:
    qformer = QFormer(image_width=24, **{**QFORMER, "layers": 4, "cross_every": 2})
    assert [layer.cross_attention is not None for layer in qformer.layers] == [True, False, True, False]
    bridge = QFormer(image_width=24, **{**QFORMER, "vocab_size": None})
    assert bridge.word_embeddings is None and all(layer.text_ffn is None for layer in bridge.layers)
    with pytest.raises(ValueError, match="without text"):
        bridge(torch.randn(1, 5, 24), torch.tensor([[1, 2]]))


def test_qformer_queries_read_the_image_and_train() -> None:
    torch.manual_seed(0)
    qformer = QFormer(image_width=24, num_queries=4, width=32, layers=2, heads=4, intermediate=64, cross_every=1, vocab_size=None)
    image_tokens = torch.randn(6, 10, 24)
    target = image_tokens.mean(dim=1)[:, :8]
    head = torch.nn.Linear(32, 8)
    optimizer = torch.optim.AdamW([*qformer.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(40):
        out = qformer(image_tokens)
        assert out.shape == (6, 4, 32)
        loss = (head(out.mean(dim=1)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_similarity_takes_the_best_query() -> None:
    image = F.normalize(torch.randn(3, 4, 8), dim=-1)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    sim = image_text_similarity(image, text)
    expected = torch.stack([torch.stack([(image[i] @ text[t]).max() for t in range(5)]) for i in range(3)])
    assert torch.allclose(sim, expected)
    scale = torch.tensor(10.0)
    loss = contrastive_loss(image[:, :, :], text[:3], scale)
    logits = scale * expected[:, :3]
    manual = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3)))
    assert torch.allclose(loss, manual)


def test_stage1_a_few_steps_lower_every_loss() -> None:
    torch.manual_seed(0)
    model = Blip2Pretrain(VISION, QFORMER, embed_dim=16, bos_token_id=3, eos_token_id=2)
    batch = _batch()
    assert model.extract_features(batch, mode="image")["image_embeds"].shape == (4, 4, 16)
    first, last = loss_parts_before_and_after(model, batch)
    assert set(first) == {"itc", "itm", "itg"}
    for name in first:
        assert last[name] < first[name], (name, first[name], last[name])


def _stage2(**kwargs) -> Blip2CausalLM:
    torch.manual_seed(0)
    return Blip2CausalLM({**VISION, "freeze": True}, QFORMER, {"config": LM}, **kwargs)


def test_stage2_trains_the_bridge_and_leaves_the_lm_frozen() -> None:
    model = _stage2().train()
    assert model.encoder.qformer.word_embeddings is None
    assert not model.language_model.training  # frozen: dropout stays off
    lm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    losses = []
    for _ in range(25):
        out = model(batch)
        losses.append(out.losses["lm"].item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    # A tiny random LM answers to its inputs only faintly; what matters is that the prefix alone moves it.
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(p.grad is None for p in model.encoder.vision.parameters())
    assert all(torch.equal(v, lm_before[k]) for k, v in model.language_model.state_dict().items())
    assert model.language_projection.weight.grad is not None


@pytest.mark.parametrize("per_row", [False, True])
def test_stage2_loss_scores_the_text_after_prefix_and_prompt(per_row: bool) -> None:
    model = _stage2().eval()
    batch = _batch()
    if per_row:  # the collator's count, when it added the prompt (data.prompts)
        prompt = [2, 3, 1, 2]
        batch["text_prompt_length"] = torch.tensor(prompt)
    else:  # the model's own: [bos] and one prompt token are given, not predicted
        model.prompt_length = 2
        prompt = [2] * 4
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
    prefix = model.visual_prefix(batch["image"])
    embeds = torch.cat([prefix, model.language_model.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(4, prefix.shape[1], dtype=torch.long), mask], dim=1)
    logits = model.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
    q = prefix.shape[1]
    terms = [F.cross_entropy(logits[r, q + t - 1], ids[r, t]) for r in range(4) for t in range(prompt[r], 5) if mask[r, t]]
    assert torch.allclose(model(batch).loss, torch.stack(terms).mean(), atol=1e-6)


def test_stage2_generate_is_greedy_decoding_after_the_prefix() -> None:
    model = _stage2().eval()
    image = _batch()["image"][:2]
    prompt = torch.tensor([[1], [1]])
    ids = model.generate_ids(image, prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    embeds = torch.cat([model.visual_prefix(image), model.language_model.get_input_embeddings()(prompt)], dim=1)
    expected = []
    for _ in range(5):
        logits = model.language_model(inputs_embeds=embeds).logits[:, -1]
        token = logits.argmax(dim=-1)
        expected.append(token)
        embeds = torch.cat([embeds, model.language_model.get_input_embeddings()(token)[:, None]], dim=1)
    assert torch.equal(ids[:, -5:], torch.stack(expected, dim=1))


def test_language_model_from_a_local_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = dict(LM)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    reference.save_pretrained(tmp_path / "lm")
    loaded = build_causal_lm(pretrained=str(tmp_path / "lm"))
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="exactly one"):
        build_causal_lm()
    with pytest.raises(ValueError, match="model_type"):
        build_causal_lm(config={"hidden_size": 8})
    with pytest.raises(OSError, match="no_such_lm"):
        build_causal_lm(pretrained=str(tmp_path / "no_such_lm"))


def test_config_overrides_replace_derived_attributes_and_name_unknown_ones(tmp_path: Path) -> None:
    # T5's config derives dense_act_fn from feed_forward_proj; the override wins over the derivation
    # whether the LM is built from a config or loaded from a directory (LAVIS's FlanT5: exact GELU).
    t5 = {"model_type": "t5", "vocab_size": 32, "d_model": 16, "d_kv": 4, "num_heads": 2, "d_ff": 32,
          "num_layers": 1, "feed_forward_proj": "gated-gelu"}
    built = build_seq2seq_lm(config=t5, config_overrides={"dense_act_fn": "gelu"})
    assert type(built.encoder.block[0].layer[1].DenseReluDense.act).__name__ == "GELUActivation"
    build_seq2seq_lm(config=t5).save_pretrained(tmp_path / "t5")
    loaded = build_seq2seq_lm(pretrained=str(tmp_path / "t5"), config_overrides={"dense_act_fn": "gelu"})
    assert loaded.config.dense_act_fn == "gelu"
    assert type(loaded.decoder.block[0].layer[2].DenseReluDense.act).__name__ == "GELUActivation"
    with pytest.raises(ValueError, match=r"config_overrides\.no_such_field: the t5 config .* has no such attribute"):
        build_seq2seq_lm(pretrained=str(tmp_path / "t5"), config_overrides={"no_such_field": 1})


def test_the_clip_demo_tower_is_every_tower_weight_of_the_blip2_demo_model() -> None:
    # blip2_pretrain starts its frozen tower from runs/clip_demo through this converter.
    from pathlib import Path

    import hydra
    from omegaconf import OmegaConf

    from vlforge.hub.weights import load_into_model
    from vlforge.models.blip2.convert import clip_tower_as_query_encoder

    recipes = Path(__file__).resolve().parents[3] / "recipes" / "model"
    clip = hydra.utils.instantiate(OmegaConf.merge(OmegaConf.load(recipes / "clip_tiny.yaml"), {"tokenizer": None}))
    blip2 = hydra.utils.instantiate(OmegaConf.merge(OmegaConf.load(recipes / "blip2_tiny.yaml"),
                                                    {"tokenizer": None, "bos_token_id": 1, "eos_token_id": 2}))
    mapped = clip_tower_as_query_encoder(clip.state_dict())
    tower = {k for k in blip2.state_dict() if k.startswith("encoder.vision.")}
    assert set(mapped) == tower
    load_into_model(blip2, mapped, allow_unexpected=False, partial=True)
    for key in tower:
        assert torch.equal(blip2.state_dict()[key], clip.state_dict()[key[len("encoder."):]]), key
