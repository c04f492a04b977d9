"""Training-step throughput, fp32, AdamW, each against what users would pick instead, same machine,
same run (issue 7, benchmark 1):

- BLIP-base captioning, batch 4, 384 px, 30 caption tokens: vlforge's BlipCaptioner vs transformers'
  BlipForConditionalGeneration (default BlipConfig: the BLIP-base dimensions). Target >= 1.3x.
- CLIP ViT-B/16, batch 8, 224 px, 77 tokens: vlforge's CLIP vs open_clip ViT-B-16 and transformers'
  CLIPModel. Target >= 1.1x the faster peer.
- The image tower alone, fwd + bwd, batch 8, 224 px: vlforge's TimmVisionTower vs timm's
  vit_base_patch16_224. Target >= 0.95x.

    python benchmarks/train_step.py [--only blip|clip|tower] [--repeats 5] [--warmup 2] [--blip-variants bf16 compile]

Prints markdown tables (results go to docs/benchmarks.md). One step = forward, backward, AdamW step.
The models of a table are built together and their timed steps alternate (`time_interleaved`), so
that the machine's drift during a run (10-15% here) does not favour whichever model runs first.
On a GPU (the variant of benchmark 6) every model runs under bf16 autocast unless `--precision fp32`,
and the MFU is against a bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timing, autocast, environment, matmul_peak_flops, setup, table, time_interleaved  # noqa: E402

from vlforge.trainer.engine import adamw  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "model"


def vlforge_model(name: str, **overrides) -> torch.nn.Module:
    """A recipes/model node built as a recipe builds it (OmegaConf's YAML: 1e-5 is a float)."""
    node = OmegaConf.load(RECIPES / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(node, key, value, force_add=True)
    return instantiate(node, _convert_="all")


# The compute dtype of every step (main() sets it): fp32, or bf16 autocast for the GPU variant.
PRECISION: dict[str, object] = {"device": "cpu", "dtype": torch.float32}


def train_step(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor],
               fused: bool = False, dtype: torch.dtype | None = None) -> tuple[Callable[[], None], float]:
    """(one AdamW training step, its FLOPs counted once by torch's flop counter). The forward runs under
    the benchmark's autocast (bf16 on a GPU), the same for every model of a table.

    Each run steps with the AdamW its framework's trainer builds: fused for vlforge (`engine.adamw`)
    and for transformers (the Trainer's default `adamw_torch_fused` on torch >= 2.8); foreach for
    open_clip, whose training script leaves torch's default (foreach on CUDA, a loop over the tensors
    on CPU, which would be slower still). `dtype`: this step's autocast instead of the benchmark's."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-5) if fused else torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def loss() -> torch.Tensor:
        with autocast(str(PRECISION["device"]), dtype or PRECISION["dtype"]):  # type: ignore[arg-type]
            return loss_of()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    counter = FlopCounterMode(display=False)
    with counter:
        loss().backward()
    optimizer.zero_grad(set_to_none=True)
    return step, float(counter.get_total_flops())


def images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def bench_blip(device: str, warmup: int, repeats: int, variants: tuple[str, ...] = ()) -> list[Timing]:
    """vlforge's BLIP step against transformers'; `variants` adds vlforge rows: "bf16" (bf16 autocast,
    transformers staying in the benchmark's precision) and "compile" (`torch.compile` of the model, as
    `trainer.compile` does; the warm-up pays for the compilation)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    batch, size, length = 4, 384, 30
    gen = torch.Generator().manual_seed(0)
    pixels = images(batch, size, gen).to(device)
    ids = torch.randint(1000, 30000, (batch, length), generator=gen).to(device)
    ids[:, 0] = 30522
    mask = torch.ones_like(ids)
    normalised = pixels.float() / 255  # the peer takes normalised floats; the scale is irrelevant to speed

    ours = vlforge_model("blip_caption_base", tokenizer=None, bos_token_id=30522, eos_token_id=102).to(device).train()
    batch_dict = {"image": pixels, "text_input_ids": ids, "text_attention_mask": mask,
                  "text_prompt_length": torch.full((batch,), 4, device=device)}
    ours_step, ours_flops = train_step(ours, lambda: ours(batch_dict).loss, fused=True)
    peer = BlipForConditionalGeneration(BlipConfig()).to(device).train()
    peer_step, peer_flops = train_step(peer, lambda: peer(pixel_values=normalised, input_ids=ids, attention_mask=mask,
                                                          labels=ids).loss, fused=True)
    runs = [("vlforge BlipCaptioner", ours_step, batch, ours_flops),
            ("transformers BlipForConditionalGeneration", peer_step, batch, peer_flops)]
    if "bf16" in variants:
        step, _ = train_step(ours, lambda: ours(batch_dict).loss, fused=True, dtype=torch.bfloat16)
        runs.append(("vlforge BlipCaptioner, bf16 autocast", step, batch, ours_flops))
    if "compile" in variants:
        compiled = torch.compile(ours)
        step, _ = train_step(ours, lambda: compiled(batch_dict).loss, fused=True)
        runs.append(("vlforge BlipCaptioner, compiled", step, batch, ours_flops))
    return time_interleaved(runs, device, warmup, repeats)


def bench_clip(device: str, warmup: int, repeats: int) -> list[Timing]:
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    batch, size, length = 8, 224, 77
    gen = torch.Generator().manual_seed(0)
    pixels = images(batch, size, gen).to(device)
    ids = torch.randint(1, 49406, (batch, length), generator=gen).to(device)
    ids[:, -1] = 49407  # the end token, where both pool
    mask = torch.ones_like(ids)
    normalised = pixels.float() / 255

    # open_clip's ViT-B-16 has GELU; the clip_vit_b16 recipe sets OpenAI's QuickGELU (slower: three
    # elementwise passes where GELU takes one), so the vlforge row builds the same architecture as the peer.
    ours = vlforge_model("clip_vit_b16", tokenizer=None, **{"vision.act_layer": "gelu", "text.act": "gelu"}).to(device).train()
    batch_dict = {"image": pixels, "text_input_ids": ids, "text_attention_mask": mask}
    ours_step, ours_flops = train_step(ours, lambda: ours(batch_dict).loss, fused=True)

    peer = open_clip.create_model("ViT-B-16", pretrained=None).to(device).train()
    loss_fn = open_clip.ClipLoss()

    def open_clip_loss() -> torch.Tensor:
        image_features, text_features, scale = peer(normalised, ids)
        return loss_fn(image_features, text_features, scale)

    peer_step, peer_flops = train_step(peer, open_clip_loss)
    # GELU in both towers too (transformers' CLIPConfig defaults to QuickGELU): the same architecture.
    config = CLIPConfig(vision_config={"patch_size": 16, "hidden_act": "gelu"}, text_config={"hidden_act": "gelu"})
    hf = CLIPModel(config).to(device).train()
    hf_step, hf_flops = train_step(hf, lambda: hf(input_ids=ids, pixel_values=normalised, attention_mask=mask,
                                                  return_loss=True).loss, fused=True)
    return time_interleaved([("vlforge CLIP", ours_step, batch, ours_flops),
                             ("open_clip ViT-B-16", peer_step, batch, peer_flops),
                             ("transformers CLIPModel", hf_step, batch, hf_flops)], device, warmup, repeats)


def bench_tower(device: str, warmup: int, repeats: int) -> list[Timing]:
    import timm

    from vlforge.models.towers.timm_tower import TimmVisionTower

    batch, size = 8, 224
    pixels = images(batch, size, torch.Generator().manual_seed(0)).to(device)
    normalised = pixels.float() / 255
    ours = TimmVisionTower("vit_base_patch16_224").to(device).train()
    ours_step, ours_flops = train_step(ours, lambda: ours(pixels)[1].float().pow(2).mean())
    peer = timm.create_model("vit_base_patch16_224", num_classes=0).to(device).train()
    peer_step, peer_flops = train_step(peer, lambda: peer.forward_features(normalised).pow(2).mean())
    return time_interleaved([("vlforge TimmVisionTower", ours_step, batch, ours_flops),
                             ("timm vit_base_patch16_224", peer_step, batch, peer_flops)], device, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("blip", "clip", "tower"), action="append")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--blip-variants", nargs="*", choices=("bf16", "compile"), default=[],
                        help="extra vlforge rows in the BLIP table (bf16 autocast; torch.compile)")
    args = parser.parse_args()
    device, dtype = setup(args.precision)
    PRECISION.update(device=device, dtype=dtype)
    peak = matmul_peak_flops(device, dtype)
    print(f"# Training step, {str(dtype).removeprefix('torch.')}, AdamW ({environment()})\n")
    chosen = args.only or ["tower", "clip", "blip"]
    if "tower" in chosen:
        print(table("Vision tower alone, ViT-B/16, batch 8, 224 px (target >= 0.95x)",
                    bench_tower(device, args.warmup, args.repeats), peak, "timm vit_base_patch16_224") + "\n")
    if "clip" in chosen:
        rows = bench_clip(device, args.warmup, args.repeats)
        faster = max(rows[1:], key=lambda r: r.throughput).name
        print(table(f"CLIP ViT-B/16, batch 8, 224 px, 77 tokens (target >= 1.1x the faster peer: {faster})",
                    rows, peak, faster) + "\n")
    if "blip" in chosen:
        print(table("BLIP-base captioning, batch 4, 384 px, 30 tokens (target >= 1.3x)",
                    bench_blip(device, args.warmup, args.repeats, tuple(args.blip_variants)), peak,
                    "transformers BlipForConditionalGeneration") + "\n")


if __name__ == "__main__":
    main()
