"""Recipe -> DeepSpeed config, optimizer, schedule and engine."""
from __future__ import annotations

import contextlib
import importlib
import math
from typing import Any, Callable, ContextManager, Mapping, Protocol

import torch
from hydra.utils import instantiate
from torch import nn

from vlforge.config.schema import RunConfig
from vlforge.core.errors import ConfigError


class TrainingEngine(Protocol):
    """What the loop, checkpoints and evaluation use of the engine `build_engine` returns (DeepSpeed's
    DeepSpeedEngine): the wrapped model, one micro-batch forward / backward / step, and its state."""

    module: nn.Module
    device: torch.device
    optimizer: Any  # DeepSpeed's wrapper: param_groups, and cur_scale under fp16
    skipped_steps: int

    def __call__(self, batch: dict[str, Any]) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def fp16_enabled(self) -> bool: ...

    def get_global_grad_norm(self) -> float | None: ...

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str, **options: Any) -> tuple[Any, dict | None]: ...


def resolve_precision(precision: str) -> str:
    """'auto' is bf16 on a GPU that supports it, fp32 otherwise (bf16 matmul is slow on most CPUs)."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and not torch.cuda.is_available():
            # DeepSpeed's CPU accelerator runs bf16 but not fp16's loss scaling kernels.
            if precision == "fp16":
                raise ConfigError("trainer.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def batch_arithmetic(run: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, accumulation steps, global batch), checked to multiply out."""
    micro = run.data.batch_size
    accum = run.trainer.grad_accum
    wanted = run.trainer.global_batch_size
    if wanted is not None:
        per_step = micro * world_size
        if wanted % per_step:
            raise ConfigError(
                f"trainer.global_batch_size={wanted} is not a multiple of data.batch_size ({micro}) x "
                f"world size ({world_size}) = {per_step}"
            )
        derived = wanted // per_step
        if accum not in (1, derived):
            raise ConfigError(
                f"trainer.grad_accum={accum} contradicts trainer.global_batch_size={wanted} "
                f"(= {micro} x {world_size} ranks x {derived}); set only one of them"
            )
        accum = derived
    return micro, accum, micro * accum * world_size


def deepspeed_config(run: RunConfig, world_size: int) -> dict[str, Any]:
    micro, accum, global_batch = batch_arithmetic(run, world_size)
    ds = run.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        # Training never needs the 16-bit consolidated weights; export gathers them from the partitions.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.offload_optimizer:
        if ds.stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        if ds.stage != 3:
            raise ConfigError("deepspeed.offload_param needs deepspeed.stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    precision = resolve_precision(run.trainer.precision)
    config: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": run.optim.grad_clip,
        "zero_optimization": zero,
        # A step whose gradients are not finite is skipped (ZeRO-1/2 skip bf16 ones only when asked).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": ds.fp16_initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # The loop logs; DeepSpeed's own prints would interleave with the progress bar.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _deep_merge(config, ds.extra)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def model_init_context(config: dict[str, Any]) -> ContextManager:
    """Under ZeRO-3 each rank materialises only its partition while the model is built."""
    if config["zero_optimization"]["stage"] != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=config)


def build_model(model_cfg: Mapping[str, Any], config: dict[str, Any]) -> nn.Module:
    """The recipe's model node (`_target_` and its arguments) built, each rank holding only its
    partition under ZeRO-3. The model's module is imported before zero.Init begins: zero.Init patches
    torch.Tensor.__new__, and a library imported for the first time under the patch (torch._dynamo,
    which timm's import of torchvision pulls in) refuses to load."""
    importlib.import_module(str(model_cfg["_target_"]).rpartition(".")[0])
    with model_init_context(config):
        return instantiate(model_cfg, _convert_="all")


def _full_ndim(param: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a parameter is an empty placeholder; its real shape is ds_shape.
    return len(getattr(param, "ds_shape", param.shape))


def param_groups(model: nn.Module, run: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases and scalars (ndim < 2); per-prefix lr multipliers."""
    optim = run.optim
    prefixes = sorted(optim.lr_multipliers, key=len, reverse=True)
    names = {name for name, _ in model.named_parameters()}
    for prefix in prefixes:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ConfigError(f"optim.lr_multipliers: no parameter name starts with '{prefix}'")
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        multiplier = next((optim.lr_multipliers[p] for p in prefixes if name == p or name.startswith(p + ".")), 1.0)
        decay = _full_ndim(param) >= 2
        group = groups.setdefault(
            (decay, multiplier),
            {"params": [], "weight_decay": optim.weight_decay if decay else 0.0, "lr": optim.lr * multiplier,
             "lr_multiplier": multiplier},
        )
        group["params"].append(param)
    if not groups:
        raise ConfigError("the model has no trainable parameter")
    return list(groups.values())


def lr_lambda(run: RunConfig) -> Callable[[int], float]:
    """Multiplier of each group's lr at optimizer step `step`: linear warmup, then the schedule."""
    optim, total = run.optim, run.trainer.max_steps
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape

    return factor


def build_optimizer(groups: list[dict[str, Any]], run: RunConfig) -> torch.optim.Optimizer:
    betas = tuple(run.optim.betas)
    if run.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=run.optim.lr, betas=betas, eps=run.optim.eps, adamw_mode=True)
    # DeepSpeed's ZeRO and 16-bit optimizers wrap this one and skip a step with non-finite gradients
    # themselves; without them (ZeRO-0 in fp32) the optimizer is this one alone.
    finite_only = run.deepspeed.stage == 0 and resolve_precision(run.trainer.precision) == "fp32"
    return adamw(groups, finite_only=finite_only, lr=run.optim.lr, betas=betas, eps=run.optim.eps)


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite and says so in `overflow`, as
    DeepSpeed's own optimizers do: the engine then counts the step as skipped and holds the schedule."""

    overflow = False

    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())
        return None if self.overflow else super().step(closure)


def adamw(params: Any, finite_only: bool = False, **options: Any) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (one pass over each tensor for all of Adam's updates): on
    CPU since torch 2.4, 3.5x faster than the foreach one (165M parameters: 0.09 s against 0.32 s a
    step here) with the same results to 2e-8; older torch gets foreach off CUDA. `finite_only`:
    `FiniteStepAdamW`."""
    fused = torch.cuda.is_available() or torch.torch_version.TorchVersion(torch.__version__) >= (2, 4)
    kind = FiniteStepAdamW if finite_only else torch.optim.AdamW
    return kind(params, **({"fused": True} if fused else {"foreach": True}), **options)


def build_engine(model: nn.Module, run: RunConfig, config: dict[str, Any]) -> TrainingEngine:
    """The DeepSpeed engine that owns the model, the optimizer and the schedule."""
    import deepspeed

    optimizer = build_optimizer(param_groups(model, run), run)
    schedule = lr_lambda(run)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=config,
    )
    if run.trainer.compile:
        # The model's forward (the loss included) compiled by torch.compile through DeepSpeed, which
        # keeps its ZeRO hooks out of the graph; the backward follows the compiled graph.
        engine.compile()
    return engine
