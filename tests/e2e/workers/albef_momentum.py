"""Run under `deepspeed --num_gpus 2`: ALBEF under ZeRO-3 for a few steps; check that the momentum
encoder is the exponential moving average of the model and that the queues agree across ranks.

Prints `ALBEF-MOMENTUM-OK <max error>` on rank 0 when every check passes; raises otherwise.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from vlforge.core.distributed import prepare_launch_env  # noqa: E402

sys.argv = prepare_launch_env(sys.argv)

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from vlforge.config.recipes import compose_recipe  # noqa: E402
from vlforge.config.schema import validate_config  # noqa: E402
from vlforge.core.distributed import init_distributed, read_dist_env  # noqa: E402
from vlforge.trainer.engine import build_engine, build_model, deepspeed_config  # noqa: E402

STEPS, MOMENTUM = 4, 0.9


def gathered(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone().float() for p in params]


def main() -> None:
    env = read_dist_env()
    init_distributed(env)
    cfg = compose_recipe("albef_pretrain", ["deepspeed=zero3", "data.batch_size=4", "model.queue_size=64",
                                            f"model.momentum={MOMENTUM}", "data.tokenizer=unused",
                                            "optim.lr=1e-2", "optim.warmup_steps=0"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["vision"] = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    model_cfg["text"].update(width=32, heads=4, intermediate=64, vocab_size=64)
    run = validate_config(cfg)
    ds_config = deepspeed_config(run, env.world_size)
    torch.manual_seed(0)
    model = build_model(model_cfg, ds_config)
    engine = build_engine(model, run, ds_config)
    module = engine.module
    params = list(module.model.parameters())
    shadows = list(module.momentum_model.parameters())
    torch.manual_seed(100 + env.rank)  # each rank its own data
    expected: list[torch.Tensor] | None = None
    for _ in range(STEPS):
        current = gathered(params)  # the weights the momentum update of this step reads
        expected = current if expected is None else [MOMENTUM * e + (1 - MOMENTUM) * c for e, c in zip(expected, current)]
        ids = torch.randint(5, 64, (4, 8))
        ids[:, 0] = 2
        batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "text_input_ids": ids,
                 "text_attention_mask": torch.ones_like(ids)}
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
    error = max((s - e).abs().max().item() for s, e in zip(gathered(shadows), expected))
    assert error < 1e-5, f"momentum encoder is not the EMA of the model: max error {error}"
    moved = max((c - e).abs().max().item() for c, e in zip(gathered(params), expected))
    assert moved > 1e-4, "the model did not train, so the check proves nothing"
    queue = torch.cat([module.image_queue.flatten(), module.text_queue.flatten(), module.queue_ptr.float()])
    queues = [torch.empty_like(queue) for _ in range(env.world_size)]
    dist.all_gather(queues, queue)
    assert all(torch.equal(q, queues[0]) for q in queues), "queues differ across ranks"
    assert int(module.queue_ptr) == (STEPS * 4 * env.world_size) % 64
    if env.is_main:
        print(f"ALBEF-MOMENTUM-OK {error:.2e} world={env.world_size}", flush=True)


if __name__ == "__main__":
    main()
