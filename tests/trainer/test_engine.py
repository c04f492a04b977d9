"""Recipe -> batch arithmetic, DeepSpeed JSON (as DeepSpeed's own parser reads it), precision, and the
model built from its recipe node."""
from __future__ import annotations

import contextlib

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from tests.trainer.runs import make_run
from vlforge.core.errors import ConfigError
from vlforge.trainer.engine import (
    batch_arithmetic,
    build_model,
    deepspeed_config,
    model_init_context,
    resolve_precision,
)

pytestmark = pytest.mark.usefixtures("cpu_recipe_env")


# --- batch_arithmetic -------------------------------------------------------------------------------


def test_batch_is_micro_times_accum_times_world():
    run = make_run("data.batch_size=8", "trainer.grad_accum=3")
    assert batch_arithmetic(run, world_size=1) == (8, 3, 24)
    assert batch_arithmetic(run, world_size=4) == (8, 3, 96)


def test_global_batch_size_derives_accumulation():
    run = make_run("data.batch_size=8", "trainer.global_batch_size=64")
    assert batch_arithmetic(run, world_size=2) == (8, 4, 64)
    assert batch_arithmetic(run, world_size=8) == (8, 1, 64)
    assert all(type(value) is int for value in batch_arithmetic(run, world_size=2))  # DeepSpeed's JSON wants ints


def test_global_batch_size_agreeing_with_grad_accum_is_fine():
    run = make_run("data.batch_size=8", "trainer.global_batch_size=64", "trainer.grad_accum=4")
    assert batch_arithmetic(run, world_size=2) == (8, 4, 64)


def test_global_batch_size_not_divisible():
    run = make_run("data.batch_size=8", "trainer.global_batch_size=100")
    with pytest.raises(ConfigError, match=r"trainer\.global_batch_size=100") as info:
        batch_arithmetic(run, world_size=2)
    assert "16" in str(info.value)  # 8 x 2 ranks


def test_global_batch_size_contradicting_grad_accum():
    run = make_run("data.batch_size=8", "trainer.global_batch_size=64", "trainer.grad_accum=3")
    with pytest.raises(ConfigError, match=r"trainer\.grad_accum=3 contradicts trainer\.global_batch_size=64"):
        batch_arithmetic(run, world_size=2)


# --- deepspeed_config -------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_config_stages(stage):
    run = make_run(f"deepspeed=zero{stage}", "data.batch_size=4", "trainer.grad_accum=2", "optim.grad_clip=0.5")
    config = deepspeed_config(run, world_size=2)
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("stage3_prefetch_bucket_size" in zero) == (stage == 3)
    assert ("stage3_param_persistence_threshold" in zero) == (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    # JSON-serialisable, as DeepSpeed wants.
    import json

    json.dumps(config)


@pytest.mark.parametrize("preset", ["zero0", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_reads_the_config_as_meant(preset):
    from deepspeed.runtime.config import DeepSpeedConfig

    run = make_run(f"deepspeed={preset}", "data.batch_size=4", "trainer.grad_accum=2")
    # DeepSpeed's own parser: its ZeRO and fp16 sections refuse a key they do not know.
    parsed = DeepSpeedConfig(deepspeed_config(run, world_size=1))
    ds, zero = run.deepspeed, parsed.zero_config
    assert (parsed.zero_optimization_stage, zero.overlap_comm, zero.contiguous_gradients, zero.reduce_bucket_size,
            zero.allgather_bucket_size) == (ds.stage, ds.overlap_comm, ds.contiguous_gradients, ds.reduce_bucket_size,
                                            ds.allgather_bucket_size)
    if ds.stage == 3:
        assert (zero.prefetch_bucket_size, zero.param_persistence_threshold, zero.gather_16bit_weights_on_model_save) == (
            ds.stage3_prefetch_bucket_size, ds.stage3_param_persistence_threshold, False)
    assert (zero.offload_optimizer is not None, zero.offload_param is not None) == (ds.offload_optimizer, ds.offload_param)
    fp16 = parsed.float16_config
    assert (fp16.enabled, fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis,
            fp16.min_loss_scale) == (False, 0, ds.fp16_initial_scale_power, 1000, 2, 1)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (8, 4, 2)
    assert parsed.steps_per_print == 2**31 - 1 and parsed.wall_clock_breakdown is False
    assert parsed.zero_allow_untested_optimizer is True


def test_deepspeed_config_zero3_offload():
    config = deepspeed_config(make_run("deepspeed=zero3_offload"), world_size=1)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_offload_optimizer_at_stage_2():
    zero = deepspeed_config(make_run("deepspeed=zero2", "deepspeed.offload_optimizer=true"), 1)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero


def test_offload_param_needs_stage_3():
    run = make_run("deepspeed=zero2", "deepspeed.offload_param=true")
    with pytest.raises(ConfigError) as info:
        deepspeed_config(run, 1)
    assert str(info.value) == "deepspeed.offload_param needs deepspeed.stage=3"


def test_offload_optimizer_needs_a_zero_stage():
    run = make_run("deepspeed=zero0", "deepspeed.offload_optimizer=true")
    with pytest.raises(ConfigError) as info:
        deepspeed_config(run, 1)
    assert str(info.value) == "deepspeed.offload_optimizer needs deepspeed.stage >= 1"


def test_precision_auto_is_fp32_on_cpu():
    assert resolve_precision("auto") == "fp32"
    config = deepspeed_config(make_run("trainer.precision=auto"), 1)
    assert config["bf16"] == {"enabled": False, "check_grad_overflow": True}
    assert config["fp16"]["enabled"] is False


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_precision_on_a_gpu(monkeypatch, bf16_supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_precision("auto") == ("bf16" if bf16_supported else "fp32")
    assert [resolve_precision(p) for p in ("fp16", "bf16", "fp32")] == ["fp16", "bf16", "fp32"]
    config = deepspeed_config(make_run("trainer.precision=fp16"), 1)
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False


def test_precision_bf16_on_cpu():
    config = deepspeed_config(make_run("trainer.precision=bf16"), 1)
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert config["fp16"]["enabled"] is False


def test_precision_fp16_needs_cuda():
    with pytest.raises(ConfigError) as info:
        deepspeed_config(make_run("trainer.precision=fp16"), 1)
    assert str(info.value) == "trainer.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU"


def test_deepspeed_extra_is_deep_merged():
    run = make_run(
        "+deepspeed.extra={zero_optimization:{reduce_bucket_size:7},wall_clock_breakdown:true,bf16:{enabled:true},"
        "comms_logger:{enabled:true}}"
    )
    config = deepspeed_config(run, 1)
    assert config["comms_logger"] == {"enabled": True}  # a section vlforge does not write is added whole
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 7
    # Siblings of merged keys survive.
    assert zero["stage"] == 3 and zero["allgather_bucket_size"] == 50_000_000
    assert config["wall_clock_breakdown"] is True
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert config["train_batch_size"] == 64


class KeepsSizes(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes


def test_build_model_hands_the_model_plain_lists_and_builds_it_whole_below_zero_3():
    node = OmegaConf.create({"_target_": f"{__name__}.KeepsSizes", "sizes": [2, 3]})
    model = build_model(node, {"zero_optimization": {"stage": 2}})
    assert type(model.sizes) is list and model.sizes == [2, 3]  # not an OmegaConf ListConfig
    assert all(isinstance(model_init_context({"zero_optimization": {"stage": s}}), contextlib.nullcontext)
               for s in (0, 1, 2))


def test_build_model_instantiates_the_recipe_node_outside_zero_3():
    model = build_model({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3, "bias": False},
                        {"zero_optimization": {"stage": 2}})
    assert isinstance(model, nn.Linear) and model.weight.shape == (3, 2) and model.bias is None
