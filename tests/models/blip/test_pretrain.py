"""BLIP pretraining: the decoder shares all but self-attention with the encoder, and every loss trains."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.training import loss_parts_before_and_after
from vlforge.models.blip.pretrain import BlipPretrain

TEXT = dict(vocab_size=50, width=32, layers=2, heads=4, intermediate=64, max_len=16)
VISION = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


def _model(share: bool = True) -> BlipPretrain:
    torch.manual_seed(0)
    return BlipPretrain(VISION, TEXT, embed_dim=16, bos_token_id=1, eos_token_id=2, share_weights=share)


def test_decoder_shares_everything_but_self_attention() -> None:
    model = _model()
    enc, dec = model.text_encoder, model.text_decoder
    assert dec.word_embeddings is enc.word_embeddings and dec.embed_norm is enc.embed_norm
    for e, d in zip(enc.layers, dec.layers):
        assert d.cross_attention is e.cross_attention and d.intermediate is e.intermediate and d.norm is e.norm
        assert d.attention is not e.attention
    assert model.lm_head.decoder.weight is enc.word_embeddings.weight
    unshared = sum(p.numel() for p in _model(share=False).parameters())
    shared = sum(p.numel() for p in model.parameters())
    self_attention = sum(p.numel() for layer in dec.layers for p in layer.attention.parameters())
    embeddings = sum(p.numel() for m in (enc.word_embeddings, enc.position_embeddings, enc.embed_norm) for p in m.parameters())
    per_layer_shared = sum(p.numel() for layer in enc.layers for n in ("cross_attention", "intermediate", "output", "norm")
                           for p in getattr(layer, n).parameters())
    assert unshared - shared == embeddings + per_layer_shared
    assert self_attention > 0


def test_a_few_steps_lower_every_loss() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    # Four image/caption pairs whose captions depend on the image, so all three objectives can learn.
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 10, 2], [1, 11, 12, 13, 2], [1, 14, 15, 16, 2]])
    batch = {"image": images, "text_input_ids": ids, "text_attention_mask": torch.ones_like(ids)}
    first, last = loss_parts_before_and_after(model, batch)
    assert set(first) == {"itc", "itm", "lm"}
    for name in first:
        assert last[name] < first[name], (name, first[name], last[name])


def test_captioning_loss_is_the_label_smoothed_cross_entropy_of_the_decoder() -> None:
    torch.manual_seed(0)
    model = BlipPretrain(VISION, TEXT, embed_dim=16, bos_token_id=1, eos_token_id=2, label_smoothing=0.1).eval()
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    ids = torch.tensor([[3, 5, 6, 7, 2], [3, 8, 9, 2, 0]])  # [CLS]-style first token; the decoder reads [DEC] (1)
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model({"image": images, "text_input_ids": ids, "text_attention_mask": mask})
        image_tokens, _ = model.image_features(images)
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = 1
        logits = model.lm_head(model.text_decoder(decoder_ids, mask, encoder_hidden_states=image_tokens, causal=True))
    # Each token after the first predicted from those before it; padding not scored; smoothing 0.1.
    scored = [(row, t) for row in range(2) for t in range(1, 5) if mask[row, t]]
    predicted = torch.stack([logits[row, t - 1] for row, t in scored])
    targets = torch.tensor([int(ids[row, t]) for row, t in scored])
    expected = F.cross_entropy(predicted, targets, label_smoothing=0.1)
    torch.testing.assert_close(out.losses["lm"], expected)
    torch.testing.assert_close(out.loss, out.losses["itc"] + out.losses["itm"] + expected)


def test_albef_losses_and_momentum_in_one_process() -> None:
    from vlforge.models.albef.model import ALBEF

    torch.manual_seed(0)
    model = ALBEF(VISION, dict(TEXT, layers=4), embed_dim=16, fusion_layer=2, queue_size=8, momentum=0.5,
                  mask_token_id=4, special_token_ids=(0, 1, 2))
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 10, 2], [1, 11, 12, 13, 2], [1, 14, 15, 16, 2]])
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "text_input_ids": ids,
             "text_attention_mask": torch.ones_like(ids)}
    out = model(batch)
    assert set(out.losses) == {"itc", "itm", "mlm"} and torch.isfinite(out.loss)
    # The first forward copies the model into the momentum encoder; the queue advanced by the batch.
    for param, shadow in zip(model.model.parameters(), model.momentum_model.parameters()):
        torch.testing.assert_close(shadow, param)
    assert int(model.queue_ptr) == 4
    assert not any(p.requires_grad for p in model.momentum_model.parameters())
    with torch.no_grad():
        before = [p.clone() for p in model.model.parameters()]
        for p in model.model.parameters():
            p.add_(1.0)
    model.momentum_update()
    for param, shadow, old in zip(model.model.parameters(), model.momentum_model.parameters(), before):
        torch.testing.assert_close(shadow, 0.5 * old + 0.5 * param)
    with pytest.raises(ValueError, match="queue_size 8 is not a multiple of the global batch 3"):
        model({k: v[:3] for k, v in batch.items()})


def test_albef_queue_position_survives_a_state_dict_round_trip() -> None:
    from vlforge.models.albef.model import ALBEF

    kwargs = dict(embed_dim=16, fusion_layer=2, queue_size=8, mask_token_id=4, special_token_ids=(0, 1, 2))
    torch.manual_seed(0)
    model = ALBEF(VISION, dict(TEXT, layers=4), **kwargs)
    ids = torch.tensor([[1, 5, 6, 2], [1, 8, 9, 2]])
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "text_input_ids": ids,
             "text_attention_mask": torch.ones_like(ids)}
    model(batch)
    model(batch)
    restored = ALBEF(VISION, dict(TEXT, layers=4), **kwargs)
    restored(batch)  # its own host-side position is now 2
    restored.load_state_dict(model.state_dict())
    restored(batch)
    assert int(restored.queue_ptr) == 6 and bool(restored.momentum_ready)


def test_albef_without_mlm_trains_itc_and_itm_only() -> None:
    # ALBEF's retrieval finetune: no masked-LM forward, so the MLM head gets no gradient.
    from vlforge.models.albef.model import ALBEF

    torch.manual_seed(0)
    model = ALBEF(VISION, dict(TEXT, layers=4), embed_dim=16, fusion_layer=2, queue_size=8, mlm=False,
                  mask_token_id=4, special_token_ids=(0, 1, 2))
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 10, 2], [1, 11, 12, 13, 2], [1, 14, 15, 16, 2]])
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "text_input_ids": ids,
             "text_attention_mask": torch.ones_like(ids)}
    out = model(batch)
    assert set(out.losses) == {"itc", "itm"}
    out.loss.backward()
    assert model.model.mlm_head.dense.weight.grad is None
    assert model.itm_head.weight.grad is not None


def test_albef_distillation_weight_ramps_up_and_resumes_where_it_was() -> None:
    from vlforge.models.albef.model import ALBEF

    kwargs = dict(embed_dim=16, fusion_layer=2, queue_size=8, alpha=0.4, alpha_warmup_steps=2, mask_token_id=4,
                  special_token_ids=(0, 1, 2))
    model = ALBEF(VISION, dict(TEXT, layers=4), **kwargs)
    assert [model._next_alpha() for _ in range(2)] == pytest.approx([0.0, 0.2])
    resumed = ALBEF(VISION, dict(TEXT, layers=4), **kwargs)
    resumed.load_state_dict(model.state_dict())
    assert [resumed._next_alpha() for _ in range(2)] == pytest.approx([0.4, 0.4])
    assert ALBEF(VISION, dict(TEXT, layers=4), **{**kwargs, "alpha_warmup_steps": 0})._next_alpha() == 0.4


def test_albef_identical_texts_are_queued_with_their_wording() -> None:
    # match_identical_texts: the queue remembers each text's wording, so a later batch's identical
    # caption counts as a positive there too; off (ALBEF's own rule), no such state exists.
    from vlforge.models.albef.model import ALBEF
    from vlforge.models.layers.contrastive import text_groups

    kwargs = dict(embed_dim=16, fusion_layer=2, queue_size=8, mlm=False)
    assert "group_queue" not in ALBEF(VISION, dict(TEXT, layers=4), **kwargs).state_dict()
    torch.manual_seed(0)
    model = ALBEF(VISION, dict(TEXT, layers=4), match_identical_texts=True, **kwargs)
    ids = torch.tensor([[1, 5, 6, 2], [1, 5, 6, 2], [1, 8, 9, 2], [1, 11, 2, 0]])
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "text_input_ids": ids,
             "text_attention_mask": (ids != 0).long()}
    assert model.group_queue.tolist() == [-1] * 8
    out = model(batch)
    assert torch.isfinite(out.loss)
    assert model.group_queue[:4].tolist() == text_groups(ids, batch["text_attention_mask"]).tolist()
    assert model.group_queue[0] == model.group_queue[1] != model.group_queue[2]
    assert "group_queue" in model.state_dict()  # a resumed run keeps it with the feature queues
