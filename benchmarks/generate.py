"""Caption generation, BLIP-base at 384 px, vlforge vs transformers' generate, same machine, same run
(issue 7, benchmark 2): 20 new tokens after the 4-token prompt "[DEC] a picture of", the image
encoding included, greedy and beam 3, batch 1 and 8. Both decoders are forced to produce all 20
tokens (end-of-text suppressed until then) so that both do the same work.

- per-image latency (median step / batch) and tokens/s (batch * 20 / median step);
- vlforge's decode alone at batch 1 (the image encoded once beforehand), tokens/s.

Targets: <= 0.5x transformers' latency at batch 1, >= 2x its throughput at batch 8 and with beam 3,
decode alone >= 45 tokens/s at batch 1.

    python benchmarks/generate.py [--repeats 5] [--warmup 1] [--only greedy_1 beam3_8 ...] [--precision bf16]
                                  [--quant none|int8|bf16] [--compile]

`--quant` holds vlforge's model as `load_model(quant=...)` does (transformers' stays as `--precision`
says: fp32 on CPU), so the ratios compare low-precision vlforge with transformers' fp32 `generate`;
`--compile` decodes through vlforge's compiled static-shape step (`load_model(compile=True)`), the
compilation done in the warm-up.
On a GPU (the variant of benchmark 6) both run under bf16 autocast unless `--precision fp32`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timing, autocast, environment, setup, time_interleaved, time_steps  # noqa: E402
from train_step import images, vlforge_model  # noqa: E402

BOS, SEP, SIZE, NEW_TOKENS = 30522, 102, 384, 20
PROMPT = [BOS, 1037, 3861, 1997]  # [DEC] a picture of (bert-base-uncased ids)
CONFIGS = {"greedy_1": (1, 1), "greedy_8": (1, 8), "beam3_1": (3, 1), "beam3_8": (3, 8)}


def build(device: str, quant: str, compile: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import BlipConfig, BlipForConditionalGeneration

    from vlforge.hub.low_precision import apply_low_precision

    torch.manual_seed(0)
    ours = vlforge_model("blip_caption_base", tokenizer=None, bos_token_id=BOS, eos_token_id=SEP).eval().to(device)
    if quant != "none":
        apply_low_precision(ours, quant)
    ours.compile_decoding = compile
    peer = BlipForConditionalGeneration(BlipConfig()).eval().to(device)
    return ours, peer


def run_config(ours: torch.nn.Module, peer: torch.nn.Module, beams: int, batch: int, device: str, dtype: torch.dtype,
               warmup: int, repeats: int) -> list[Timing]:
    from vlforge.models.layers.generation import GenerationConfig

    pixels = images(batch, SIZE, torch.Generator().manual_seed(batch)).to(device)
    normalised = pixels.float() / 255
    prompt = torch.tensor([PROMPT] * batch, device=device)
    total = len(PROMPT) + NEW_TOKENS
    cfg = GenerationConfig(max_length=total, min_length=total, num_beams=beams)

    @torch.no_grad()
    def vlforge_step() -> None:
        with autocast(device, dtype):
            out = ours.generate_ids(pixels, prompt, cfg)
        assert out.shape[1] == total, out.shape

    @torch.no_grad()
    def transformers_step() -> None:
        with autocast(device, dtype):
            out = peer.generate(pixel_values=normalised, input_ids=prompt, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False)
        # transformers' BLIP drops the prompt's last token ([SEP] in its processor's output) before decoding.
        assert out.shape[1] == len(PROMPT) - 1 + NEW_TOKENS, out.shape

    samples = batch  # per image; tokens/s = samples * NEW_TOKENS / median
    return time_interleaved([("vlforge", vlforge_step, samples, 0.0), ("transformers", transformers_step, samples, 0.0)],
                            device, warmup, repeats)


def decode_alone(ours: torch.nn.Module, device: str, dtype: torch.dtype, warmup: int, repeats: int) -> Timing:
    """vlforge's decoding loop at batch 1, greedy, on an image encoded beforehand."""
    from vlforge.models.blip.decoder import decode
    from vlforge.models.layers.generation import GenerationConfig

    pixels = images(1, SIZE, torch.Generator().manual_seed(1)).to(device)
    prompt = torch.tensor([PROMPT], device=device)
    total = len(PROMPT) + NEW_TOKENS
    cfg = GenerationConfig(max_length=total, min_length=total)
    with torch.no_grad(), autocast(device, dtype):
        context = ours.image_tokens(pixels)

    @torch.no_grad()
    def step() -> None:
        with autocast(device, dtype):
            decode(ours.text_decoder, ours.lm_head, context, None, prompt, cfg, SEP, 0, ours.compile_decoding)

    return time_steps("vlforge decode alone", step, device, NEW_TOKENS, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=tuple(CONFIGS), action="append")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--quant", choices=("none", "int8", "bf16"), default="none",
                        help="vlforge's model held as load_model(quant=...) holds it")
    parser.add_argument("--compile", action="store_true", help="vlforge decodes through its compiled static step")
    args = parser.parse_args()
    device, dtype = setup(args.precision)
    ours, peer = build(device, args.quant, args.compile)
    print(f"# Caption generation, BLIP-base, 384 px, {NEW_TOKENS} new tokens, {str(dtype).removeprefix('torch.')}, "
          f"vlforge quant {args.quant}{', compiled decoding' if args.compile else ''} ({environment()})\n")
    print("| decoding | batch | vlforge s/image | transformers s/image | latency ratio | vlforge tokens/s | "
          "transformers tokens/s | throughput ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only or list(CONFIGS):
        beams, batch = CONFIGS[name]
        ours_t, peer_t = run_config(ours, peer, beams, batch, device, dtype, args.warmup, args.repeats)
        decoding = "greedy" if beams == 1 else f"beam {beams}"
        print(f"| {decoding} | {batch} | {ours_t.median / batch:.3f} | {peer_t.median / batch:.3f} | "
              f"**{ours_t.median / peer_t.median:.2f}x** | {ours_t.throughput * NEW_TOKENS:.1f} | "
              f"{peer_t.throughput * NEW_TOKENS:.1f} | **{ours_t.throughput / peer_t.throughput:.2f}x** |", flush=True)
    alone = decode_alone(ours, device, dtype, args.warmup, args.repeats)
    print(f"\nvlforge decode alone, greedy, batch 1: **{alone.throughput:.1f} tokens/s** "
          f"({alone.median * 1000 / NEW_TOKENS:.1f} ms/token; target >= 45)")


if __name__ == "__main__":
    main()
