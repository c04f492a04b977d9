"""load_model(quant=...): a model held in bfloat16, or with its text side in torchao's int8 weights, and
the settings that refuse what cannot be combined."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers import BlipForConditionalGeneration

from tests.hub.test_load import _offline_cache, save_hf_model  # noqa: F401 (the fixture)
from tests.models.tiny_blip import BOS, PAD, SEP, images
from tests.tiny_recipes import build_tiny, save_tokenizer
from vlforge import load_model
from vlforge.config.serve import serve_config
from vlforge.core import state_dict
from vlforge.core.errors import ConfigError
from vlforge.core.host_memory import can_return_freed_memory
from vlforge.core.safetensors_read import read_safetensors_as
from vlforge.hub import low_precision
from vlforge.hub.export import export_model
from vlforge.hub.low_precision import FUSED_MAX_ROWS, Int8Linear
from vlforge.models.layers.static_decode import StaticDecoding


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("blip")
    hf = save_hf_model(BlipForConditionalGeneration, directory)
    # Weights away from their initialisation (LayerNorms included), so that a layer left in float32,
    # or a scale applied to the wrong channel, shows in the logits.
    torch.manual_seed(2)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(directory))
    return directory


def _logits(model: nn.Module, seed: int = 3) -> torch.Tensor:
    pixels, _ = images(2, seed=seed)
    ids = torch.tensor([[BOS, 6, 7, 8, 9, SEP], [BOS, 6, 7, 10, SEP, PAD]])
    with torch.no_grad():
        return model.logits(model.image_tokens(pixels), ids, (ids != PAD).long()).float()


def test_bf16_holds_every_weight_in_bfloat16_and_keeps_the_logits(caption_dir: Path) -> None:
    full = load_model("blip_caption", "base_coco", checkpoint=caption_dir)
    half = load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for name, p in half.named_parameters():  # the values are the float32 ones, rounded
        assert torch.equal(p, dict(full.named_parameters())[name].to(torch.bfloat16)), name
    expected, got = _logits(full), _logits(half)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_low_precision_reads_the_checkpoint_in_bfloat16(caption_dir: Path, monkeypatch, quant) -> None:
    # Read a tensor at a time and cast as read (tests/core/test_state_dict.py): the float32 file is never
    # held whole (peak memory, docs/benchmarks.md).
    reads = []

    def spy(path, dtype):  # noqa: ANN001
        reads.append(dtype)
        return read_safetensors_as(path, dtype)

    monkeypatch.setattr(state_dict, "read_safetensors_as", spy)
    model = load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant=quant)
    assert reads == [torch.bfloat16] and model.vision.backbone.patch_embed.proj.weight.dtype == torch.bfloat16
    load_model("blip_caption", "base_coco", checkpoint=caption_dir)
    assert reads == [torch.bfloat16]  # float32: safetensors' own reader


def test_int8_quantizes_every_text_linear_per_output_channel_and_keeps_the_tower(caption_dir: Path) -> None:
    full = load_model("blip_caption", "base_coco", checkpoint=caption_dir)
    model = load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant="int8")
    tower = {id(m) for m in model.vision.modules()}
    outside = [(name, m) for name, m in model.named_modules() if id(m) not in tower]
    assert not [name for name, m in outside if type(m) is nn.Linear or (isinstance(m, nn.Linear))]
    int8 = {name: m for name, m in outside if isinstance(m, Int8Linear)}
    # Every text linear layer: self and cross attention, the feed-forward and the LM head.
    assert len(int8) == 2 * (2 + 3 + 2) + 2, sorted(int8)
    assert all(p.dtype == torch.bfloat16 for p in model.vision.parameters())
    assert not any(isinstance(m, Int8Linear) for m in model.vision.modules())
    reference = full.state_dict()  # the tied head too
    for name, layer in int8.items():
        weight = reference[f"{name}.weight"].detach()
        # One scale per output channel: each row is held to within half its own step (max |row| / 127),
        # plus bfloat16's rounding of the weight before quantization and of the scale.
        row_max = weight.abs().amax(dim=1, keepdim=True)
        error = (layer.weight.dequantize().float() - weight).abs()
        assert (error <= row_max / 127 / 2 + (weight.abs() + row_max) * 2 ** -8).all(), name
    # The LM head tied to the word embeddings gets its own int8 copy; the table keeps its weight.
    assert model.text_decoder.word_embeddings.weight.dtype == torch.bfloat16
    expected, got = _logits(full), _logits(model)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize(("name", "rows"), [("intermediate", 1), ("intermediate", 3),
                                           ("intermediate", FUSED_MAX_ROWS + 1), ("output", 3)])
def test_an_int8_layer_computes_with_its_widened_weight_fused_or_not(caption_dir: Path, name: str, rows: int) -> None:
    model = load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant="int8")
    layer = getattr(model.text_decoder.layers[0], name)
    # 32 inputs run fused; 40 (not a multiple of 16) widen the weight, as inductor's kernel needs.
    assert layer.fused == (layer.in_features == 32)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.dequantize().float(), layer.bias.float())
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, layer.out_features)
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02)


def test_an_int8_layer_on_the_cpu_runs_its_kernel_without_compiling(caption_dir: Path, monkeypatch) -> None:
    model = load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant="int8")
    layer = model.text_decoder.layers[0].intermediate
    assert layer.fused and "scales" not in layer.state_dict()  # the model's keys are the checkpoint's
    monkeypatch.setattr(low_precision, "_fused_linear", lambda: pytest.fail("compiled on the CPU"))
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    expected = F.linear(x.float(), layer.weight.dequantize().float(), layer.bias.float())
    assert got.shape == (2, 3, layer.out_features)
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("quant", ["int8", "bf16"])
def test_low_precision_decoding_compiles_to_the_eager_step(caption_dir: Path, quant: str) -> None:
    """load_model(quant=..., compile=True): the compiled static step (its weights frozen into the graph,
    inductor's own matrix products where they time faster) holds the int8 layers too, and a second
    model in the same process decodes with its own weights, not the first one's frozen ones."""
    first = load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant=quant)
    second = load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant=quant)
    with torch.no_grad():
        for weight in (second.text_decoder.word_embeddings.weight, second.text_decoder.embed_norm.weight):
            weight.mul_(1 + 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)).to(weight.dtype))
    pixels, _ = images(1, seed=4)
    logits = {}
    with torch.no_grad():
        for which, model in (("first", first), ("second", second)):
            context = model.image_tokens(pixels)
            for compiled in (False, True):
                decoding = StaticDecoding(model.text_decoder, model.lm_head, context, 8, compiled=compiled)
                decoding(torch.tensor([[BOS, 6, 7]]), decoding)
                logits[which, compiled] = decoding(torch.tensor([[8]]), decoding).float()
    scale = logits["first", False].abs().max().item()
    assert (logits["second", False] - logits["first", False]).abs().max() > 0.2 * scale
    for which in ("first", "second"):
        torch.testing.assert_close(logits[which, True], logits[which, False], rtol=0.02, atol=0.02 * scale)


# In a process of its own, so that the C allocator starts from nothing: quantizes 36 blocks of a BERT-base
# layer's linear layers in bfloat16 (510 MiB, 255 MiB as int8), handing freed memory back every 32 MiB,
# and prints the resident MiB before and after and the peak.
_RESIDENT_PROBE = """
import torch
from torch import nn
import torchao.quantization  # imported before the first figure: its own memory is not measured
from vlforge.hub import low_precision

def mib(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024

low_precision.RETURN_FREED_EVERY = 32 * 2**20
block = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
model = nn.Sequential(*[nn.Linear(i, o, dtype=torch.bfloat16) for _ in range(36) for i, o in block])
before = mib("VmRSS")
low_precision.apply_low_precision(model, "int8")
print(before, mib("VmRSS"), mib("VmHWM"))
"""


@pytest.mark.skipif(not can_return_freed_memory() or not Path("/proc/self/status").is_file(),
                    reason="needs glibc's malloc_trim and /proc")
def test_int8_quantization_hands_freed_memory_back_as_it_goes() -> None:
    """Quantizing layer by layer frees each float weight and its float32 temporaries. Handed back every
    32 MiB and at the end, the process peaks less than 160 MiB above where it started and ends smaller
    by most of the 255 MiB the int8 weights save; kept by the C allocator (the periodic or the final
    hand-back removed), the peak grows with the model, or the process ends larger than it started."""
    probe = subprocess.run([sys.executable, "-c", _RESIDENT_PROBE], check=True, capture_output=True, text=True)
    before, after, peak = map(float, probe.stdout.split())
    assert peak - before < 160, (before, peak)
    assert after <= before - 0.75 * 255, (before, after)


def test_unknown_or_conflicting_quantization_is_refused(caption_dir: Path) -> None:
    with pytest.raises(ValueError, match="quant='int4': expected one of None, 'bf16', 'int8', 'nf4'"):
        load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant="int4")
    with pytest.raises(ValueError, match="quant='int8' with load_4bit / load_8bit"):
        load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant="int8", load_8bit=True)
    with pytest.raises(ValueError, match="quant=.nf4. / device_map apply to a model with a language model"):
        load_model("blip_caption", "base_coco", checkpoint=caption_dir, quant="nf4")
    with pytest.raises(ConfigError, match="serve.quantize='fp8' is not one of null, int8, bf16, 4bit, 8bit"):
        serve_config(OmegaConf.create({"quantize": "fp8"}))


def test_a_lora_model_is_merged_in_float32_then_held_in_bfloat16(tmp_path: Path) -> None:
    """A recipe with LoRA adapters is read in float32 (not bfloat16), so the adapters merge into the
    exact weights before the cast: the held weight is the float32 merge, rounded once."""
    lora = "+model.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"
    model, cfg = build_tiny("llava_finetune_demo", save_tokenizer(tmp_path / "tokenizer"), overrides=[lora])
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a merge would change nothing
                p.copy_(torch.randn_like(p) * 0.1)
    export_model(model, cfg, tmp_path / "export")
    merged = copy.deepcopy(model.language_model).merge_and_unload()
    expected = {name: p.to(torch.bfloat16) for name, p in merged.named_parameters() if name.endswith("q_proj.weight")}
    loaded = load_model("llava", "demo", checkpoint=tmp_path / "export", quant="bf16")
    got = {name: p for name, p in loaded.language_model.named_parameters() if name.endswith("q_proj.weight")}
    assert got.keys() == expected.keys() and expected
    for name, weight in expected.items():
        assert torch.equal(got[name], weight), name
