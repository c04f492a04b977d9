"""The blip2_opt zoo entries over a tiny random HF BLIP-2 (OPT LM) saved sharded by transformers, with
a tiny byte-level BPE tokenizer in OPT's files: the same logits as transformers, captions, and the
errors for a missing shard and for a T5 BLIP-2."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipForConditionalGeneration, GPT2TokenizerFast

from tests.hub.test_load import save_hf_model
from tests.models.tiny_blip import images
from vlforge import load_model, load_model_and_preprocess
from vlforge.hub.sources import WeightsNotFoundError
from vlforge.models.blip2.convert import blip2_dimensions

WIDTH, QUERIES, VOCAB, IMAGE_TOKEN = 32, 4, 320, 319
TEXTS = ["a photo of a red circle", "a blue square on the left", "two green triangles"]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "home"


def hf_blip2_config(**text: object) -> Blip2Config:
    config = Blip2Config(
        vision_config=dict(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                            encoder_hidden_size=WIDTH, cross_attention_frequency=2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        # The LM 64 wide: bitsandbytes' CPU 4-bit kernels quantize rows in blocks of 64.
        text_config={"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "ffn_dim": 128, "vocab_size": VOCAB, "word_embed_proj_dim": 64, "max_position_embeddings": 64,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1, "dropout": 0.0, **text},
        num_query_tokens=QUERIES)
    config.image_token_id = IMAGE_TOKEN  # transformers 5 splices the queries in at this token
    return config


def save_opt_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer in the files OPT's repos ship (vocab.json, merges.txt, tokenizer.json),
    "</s>" (id 1) its bos and eos, as OPT's."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 4, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "</s>", "<unk>"])
    bpe.save_model(str(directory))
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                      unk_token="<unk>", add_bos_token=True).save_pretrained(str(directory))


def save_hf_blip2(directory: Path) -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(hf_blip2_config()).eval()
    with torch.no_grad():  # off the init (zero biases, unit norms, near-uniform attention): every weight shows
        for param in hf.parameters():
            param.add_(0.1 * torch.randn_like(param))
    hf.save_pretrained(str(directory), max_shard_size="100KB")  # sharded, as the published repos are
    save_opt_tokenizer(directory)
    return hf


def test_blip2_opt_matches_transformers_and_captions(_offline_cache: Path) -> None:
    directory = _offline_cache / "models" / "blip2_opt" / "caption_coco_opt2.7b"
    hf = save_hf_blip2(directory)
    assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    model, vis, _ = load_model_and_preprocess("blip2_opt", "caption_coco_opt2.7b")
    assert model.prompt == "a photo of " and model.encoder.qformer.num_queries == QUERIES

    pixels, normalised = images(2, seed=3)
    tok = GPT2TokenizerFast.from_pretrained(str(directory))
    text = tok(["a photo of a red circle", "a blue square"], padding="longest", return_tensors="pt")
    ids, mask = text["input_ids"], text["attention_mask"]
    with torch.no_grad():
        embeds, full_mask = model._inputs(pixels, ids, mask)
        got = model.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, QUERIES:]
        hf_ids = torch.cat([torch.full((2, QUERIES), IMAGE_TOKEN), ids], dim=1)
        hf_mask = torch.cat([torch.ones(2, QUERIES, dtype=mask.dtype), mask], dim=1)
        expected = hf(pixel_values=normalised, input_ids=hf_ids, attention_mask=hf_mask).logits[:, QUERIES:]
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)
    # The LM head is tied to the word embeddings the file carries once (save_pretrained drops the copy).
    assert torch.equal(model.language_model.lm_head.weight, hf.language_model.lm_head.weight)

    captions = model.generate({"image": pixels}, num_beams=2, max_length=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert vis["eval"](__import__("PIL.Image").Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_blip2_opt_pretrained_type_has_no_prompt(tmp_path: Path) -> None:
    save_hf_blip2(tmp_path / "blip2")
    model = load_model("blip2_opt", "pretrain_opt2.7b", checkpoint=tmp_path / "blip2")
    assert model.prompt == "" and model.prompt_length == 1  # OPT's bos only


def test_a_missing_shard_is_named_before_anything_loads(_offline_cache: Path) -> None:
    directory = _offline_cache / "models" / "blip2_opt" / "pretrain_opt2.7b"
    save_hf_blip2(directory)
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=shard.name) as err:
        load_model("blip2_opt", "pretrain_opt2.7b")
    assert time.perf_counter() - start < 5
    assert "https://huggingface.co/Salesforce/blip2-opt-2.7b" in str(err.value)


def test_an_encoder_decoder_blip2_is_refused_by_name() -> None:
    config = Blip2Config(text_config={"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2,
                                      "d_ff": 48, "vocab_size": 64})
    with pytest.raises(ValueError, match="t5 .*decoder-only"):
        blip2_dimensions(config)


def _linear_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the LM's layer weights, as stored (the head excluded: it stays unquantized)."""
    head = module.get_output_embeddings()
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules()
               if hasattr(m, "in_features") and m is not head)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loading_shrinks_the_lm_and_keeps_the_tower_in_half_precision(tmp_path: Path, bits: int) -> None:
    pytest.importorskip("bitsandbytes")
    save_hf_blip2(tmp_path / "blip2")
    full = load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=tmp_path / "blip2")
    quantized = load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=tmp_path / "blip2",
                           load_4bit=bits == 4, load_8bit=bits == 8)
    layers = [m for m in quantized.language_model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert len(layers) == 2 * 6  # q, k, v, out, fc1, fc2 per decoder layer; the head is not among them
    fp16_bytes = _linear_weight_bytes(full.language_model) / 2  # the published weights are fp16
    ratio = fp16_bytes / _linear_weight_bytes(quantized.language_model)
    assert ratio == pytest.approx(16 / bits)
    assert quantized.language_model.lm_head.weight.dtype == torch.float32
    assert quantized.encoder.vision.backbone.patch_embed.proj.weight.dtype == torch.bfloat16  # CPU default

    pixels, _ = images(2, seed=3)
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with torch.no_grad():
        embeds, mask = quantized._inputs(pixels, ids, torch.ones_like(ids))
        logits = quantized.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        embeds, mask = full._inputs(pixels, ids, torch.ones_like(ids))
        reference = full.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    # Lossy, but the same model: far closer to its full-precision logits than to another input's.
    assert (logits - reference).abs().mean() < 0.5 * (reference - reference.flip(0)).abs().mean()
    assert len(quantized.generate({"image": pixels}, num_beams=1, max_length=4)) == 2


def test_placement_options_are_checked(tmp_path: Path) -> None:
    save_hf_blip2(tmp_path / "blip2")
    with pytest.raises(ValueError, match="exclusive"):
        load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=tmp_path / "blip2", load_4bit=True, load_8bit=True)
    with pytest.raises(ValueError, match="compute_dtype='float8'"):
        load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=tmp_path / "blip2", load_8bit=True,
                   compute_dtype="float8")
    save_hf_model(BlipForConditionalGeneration, tmp_path / "caption")
    with pytest.raises(ValueError, match="BlipCaptioner has none"):
        load_model("blip_caption", "base_coco", checkpoint=tmp_path / "caption", load_4bit=True)


def test_device_map_without_accelerate_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_hf_blip2(tmp_path / "blip2")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # what an environment without it imports
    with pytest.raises(ImportError, match=r"device_map=.*accelerate.*pip install 'vlforge\[quant\]'"):
        load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=tmp_path / "blip2", device_map={"": "cpu"})


def test_device_map_places_the_lm_through_accelerate(tmp_path: Path) -> None:
    save_hf_blip2(tmp_path / "blip2")
    plain = load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=tmp_path / "blip2")
    mapped = load_model("blip2_opt", "caption_coco_opt2.7b", checkpoint=tmp_path / "blip2",
                        device_map={"": "cpu"})
    assert getattr(mapped.language_model, "hf_device_map", None) == {"": "cpu"}
    pixels, _ = images(2, seed=7)
    assert mapped.generate({"image": pixels}, num_beams=2, max_length=5) == plain.generate({"image": pixels}, num_beams=2,
                                                                                           max_length=5)


def test_a_language_model_without_linear_layers_is_not_quantized_silently() -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import GPT2Config, GPT2LMHeadModel

    from vlforge.models.language.quantize import quantize_language_model

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize.*Conv1D"):
        quantize_language_model(gpt2, 4, "bfloat16", "cpu")
