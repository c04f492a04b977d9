"""Parity of vlforge's BERT-style text model with transformers' BertModel and BlipTextModel."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextModel

from tests.models.perturb import noisy
from vlforge.models.layers.bert import BertTextModel
from vlforge.models.layers.convert import bert_from_hf, load_mapped

VOCAB, WIDTH, LAYERS, HEADS, INTER, MAXLEN, IMG_WIDTH = 99, 32, 2, 4, 37, 40, 24


def _inputs(batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0  # a padded row
    ids[1, 6:] = 0
    return ids, mask


def test_matches_hf_bert_encoder() -> None:
    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=INTER, max_position_embeddings=MAXLEN, type_vocab_size=2,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    hf = noisy(hf, seed=0)
    ours = BertTextModel(VOCAB, WIDTH, LAYERS, HEADS, INTER, MAXLEN, type_vocab_size=2).eval()
    load_mapped(ours, bert_from_hf(hf.state_dict()))
    ids, mask = _inputs()
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, token_type_ids=types)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def blip_text() -> tuple[BlipTextModel, BertTextModel]:
    torch.manual_seed(0)
    config = BlipTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, encoder_hidden_size=IMG_WIDTH, intermediate_size=INTER,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=MAXLEN,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True)
    hf = noisy(BlipTextModel(config, add_pooling_layer=False), seed=0)
    ours = BertTextModel(VOCAB, WIDTH, LAYERS, HEADS, INTER, MAXLEN, cross_attention_layers="all",
                         encoder_width=IMG_WIDTH).eval()
    load_mapped(ours, bert_from_hf(hf.state_dict()))
    return hf, ours


@pytest.mark.parametrize("causal", [False, True])
def test_matches_hf_blip_text_with_cross_attention(blip_text, causal: bool) -> None:
    hf, ours = blip_text
    ids, mask = _inputs()
    image = torch.randn(3, 5, IMG_WIDTH, generator=torch.Generator().manual_seed(1))
    image_mask = torch.ones(3, 5, dtype=torch.long)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                      encoder_attention_mask=image_mask, is_decoder=causal).last_hidden_state
        got = ours(ids, mask, encoder_hidden_states=image, encoder_attention_mask=image_mask, causal=causal)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-5)


def test_incremental_decoding_with_cache_matches_full_pass(blip_text) -> None:
    _, ours = blip_text
    ids, _ = _inputs(batch=2, length=7)
    image = torch.randn(2, 5, IMG_WIDTH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids, encoder_hidden_states=image, causal=True)
        cache = ours.new_cache()
        steps = [ours(ids[:, :3], encoder_hidden_states=image, causal=True, cache=cache)]
        for t in range(3, 7):
            steps.append(ours(ids[:, t : t + 1], torch.ones(2, t + 1), encoder_hidden_states=image, causal=True,
                              cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 7


def test_cache_reorder_follows_beams(blip_text) -> None:
    _, ours = blip_text
    ids, _ = _inputs(batch=2, length=4)
    image = torch.randn(2, 5, IMG_WIDTH)
    with torch.no_grad():
        cache = ours.new_cache()
        ours(ids, encoder_hidden_states=image, causal=True, cache=cache)
        cache.reorder(torch.tensor([1, 1, 0]))
        step = ours(ids[[1, 1, 0], :1], torch.ones(3, 5), encoder_hidden_states=image[[1, 1, 0]], causal=True, cache=cache)
        reference = ours(torch.cat([ids[[1, 1, 0]], ids[[1, 1, 0], :1]], dim=1), encoder_hidden_states=image[[1, 1, 0]],
                         causal=True)
    torch.testing.assert_close(step[:, 0], reference[:, -1], rtol=1e-5, atol=1e-5)


def test_unmapped_checkpoint_key_is_named() -> None:
    with pytest.raises(KeyError, match="encoder.layer.0.attention.mystery.weight"):
        bert_from_hf({"encoder.layer.0.attention.mystery.weight": torch.zeros(1)})


def test_load_mapped_names_missing_keys() -> None:
    ours = BertTextModel(VOCAB, WIDTH, 1, HEADS, INTER, MAXLEN)
    with pytest.raises(KeyError, match="missing .*word_embeddings.weight"):
        load_mapped(ours, {})


def test_cross_attention_needs_encoder_width() -> None:
    with pytest.raises(ValueError, match="encoder_width"):
        BertTextModel(VOCAB, WIDTH, 2, HEADS, INTER, MAXLEN, cross_attention_layers=[1])


def test_initialisation_survives_zero3_partitioning(monkeypatch) -> None:
    """Under zero.Init parameters are partitioned when each module's __init__ returns: the init must
    happen inside the layers themselves, or ZeRO-3 runs start from different weights."""
    import os

    import deepspeed

    from vlforge.models.layers.transformer import TextTransformer

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    if "MASTER_PORT" not in os.environ:
        from vlforge.core.distributed import _free_port

        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    started_here = not torch.distributed.is_initialized()
    if started_here:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        bert = BertTextModel(VOCAB, WIDTH, 1, HEADS, INTER, MAXLEN)
        clip_text = TextTransformer(vocab_size=VOCAB, width=WIDTH, layers=1, heads=HEADS, max_len=MAXLEN)
    weights = [bert.word_embeddings.weight, bert.layers[0].intermediate.weight, clip_text.token_embedding.weight]
    with deepspeed.zero.GatheredParameters(weights):
        stds = [weight.std().item() for weight in weights]
    if started_here:
        torch.distributed.destroy_process_group()
    assert all(0.01 < std < 0.03 for std in stds), stds


def test_beams_sharing_their_image_match_a_copy_per_beam(blip_text) -> None:
    """Decoded rows grouped per context row (beam search's beams of one image) attend to it exactly as
    rows with their own copy do, through a reorder within the groups, with the shared keys cached once."""
    _, ours = blip_text
    ids, _ = _inputs(batch=4, length=3)  # 2 images x 2 beams
    image = torch.randn(2, 5, IMG_WIDTH)
    with torch.no_grad():
        shared, copied = ours.new_cache(), ours.new_cache()
        a = ours(ids, encoder_hidden_states=image, causal=True, cache=shared)
        b = ours(ids, encoder_hidden_states=image.repeat_interleave(2, dim=0), causal=True, cache=copied)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert shared.layers[0].cross_k.shape[0] == 2 and copied.layers[0].cross_k.shape[0] == 4
        within_groups = torch.tensor([1, 1, 2, 3])
        shared.reorder(within_groups)
        copied.reorder(within_groups)
        a = ours(ids[within_groups, :1], torch.ones(4, 4), encoder_hidden_states=image, causal=True, cache=shared)
        b = ours(ids[within_groups, :1], torch.ones(4, 4), encoder_hidden_states=image.repeat_interleave(2, dim=0),
                 causal=True, cache=copied)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert shared.layers[0].cross_k.shape[0] == 2
