"""Dataclass schemas for the config nodes the trainer reads.

Hydra composes plain YAML; `validate_config` merges each node into its schema so that a misspelled key
or a value of the wrong type fails before any compute, with the full key path in the message.
Component nodes (`model`, `task`) are not here: they are `_target_` calls whose signatures check them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlforge.config.data import DemoConfig, ImageTransformConfig, TextProcessorConfig
from vlforge.core.errors import ConfigError


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    # When set, grad_accum is derived from it: global = micro batch x grad_accum x world size.
    global_batch_size: Optional[int] = None
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model's forward (the first steps pay for the compilation)
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_at_end: bool = True
    save_every: int = 0  # 0: save only at the end
    save_at_end: bool = True
    keep_last: int = 2
    # A step with a non-finite loss or gradients on any rank is skipped (parameters and optimizer state
    # untouched) and counted (train/bad_steps); this many in a row stop the run.
    max_bad_steps: int = 5
    resume: Optional[str] = None  # null | auto | path to a checkpoint tag directory
    # A run_dir that already holds a run is refused unless resumed, or deleted first with overwrite.
    overwrite: bool = False
    # Weights to start from (a finetune): a vlforge run or checkpoint directory, or a state-dict file
    # (.pth/.pt/.bin/.safetensors, e.g. a LAVIS or HF checkpoint). `init_converter` ("module:function",
    # e.g. vlforge.models.blip.convert:blip_caption_from_lavis) maps its keys to the model's first.
    # Every model weight must be found; checkpoint keys the model lacks are listed and left out.
    # `init_partial`: model weights the checkpoint lacks or holds in another shape keep their fresh
    # initialisation instead (listed), e.g. a task model started from another model's tower.
    init_from: Optional[str] = None
    init_converter: Optional[str] = None
    init_partial: bool = False
    record_sample_keys: bool = False  # write the keys of every batch to samples_rank{r}.jsonl
    seed: int = 42


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    # Parameter-name prefix -> lr multiplier, e.g. {vision: 0.1} for a smaller lr on the image tower.
    lr_multipliers: Dict[str, float] = field(default_factory=dict)


@dataclass
class DeepSpeedConfig:
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    fp16_initial_scale_power: int = 16
    # Anything else, merged last into the generated DeepSpeed JSON (e.g. {"wall_clock_breakdown": true}).
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "vlforge"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online when an API key is configured, else offline) | online | offline
    tags: List[str] = field(default_factory=list)
    num_table_rows: int = 16  # sample predictions logged as a wandb.Table at each evaluation


@dataclass
class SplitConfig:
    shards: str = "???"  # brace or glob pattern; several patterns separated by '::'
    split_by: str = "shard"  # shard | sample (every rank reads every shard, keeps every world-th sample)
    shuffle_buffer: int = 0
    resampled: bool = False  # draw shards with replacement forever (pretraining on large corpora)


@dataclass
class DataConfig:
    batch_size: int = 32  # per rank, per micro step
    eval_batch_size: int = 64
    num_workers: int = 2
    # Training stops with the data report when more than this fraction of the samples a rank has read
    # could not be used (judged from 100 samples on, or at the end of an epoch); 1.0 never stops.
    max_bad_fraction: float = 0.1
    tokenizer: str = "???"  # hub id or local directory
    max_text_len: int = 32
    # Text key -> prompt prefix the collator puts before that key's texts (e.g. {text: "a picture of "}):
    # never truncated, and its length is in the batch as `{key}_prompt_length`. Add one with
    # `+data.prompts.text="a picture of "`.
    prompts: Dict[str, str] = field(default_factory=dict)
    train_image: ImageTransformConfig = field(default_factory=lambda: ImageTransformConfig(train=True))
    eval_image: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    text: TextProcessorConfig = field(default_factory=TextProcessorConfig)
    train: SplitConfig = field(default_factory=SplitConfig)
    val: Optional[SplitConfig] = None
    test: Optional[SplitConfig] = None
    demo: Optional[DemoConfig] = None  # when set, the built-in demo dataset is built at demo.root first


@dataclass
class RunConfig:
    name: str
    run_dir: str
    trainer: TrainerConfig
    optim: OptimConfig
    deepspeed: DeepSpeedConfig
    logger: LoggerConfig
    data: DataConfig


_NODES = {
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "deepspeed": DeepSpeedConfig,
    "logger": LoggerConfig,
    "data": DataConfig,
}

_CHOICES = {
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "logger.mode": ("auto", "online", "offline"),
    "data.train.split_by": ("shard", "sample"),
}


def register_schemas() -> None:
    """Make the schemas Hydra config groups (`schema/<node>`), the base that train.yaml starts each node
    from: every field is then overridable from the command line and typed at composition."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for key, schema in _NODES.items():
        store.store(group="schema", name=key, node=schema)


def validate_config(cfg: DictConfig) -> RunConfig:
    """Check every schema'd node of a composed recipe; raise ConfigError naming the offending key."""
    nodes: dict[str, Any] = {}
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve the recipe: {_describe(err, '')}") from None
    for key, schema in _NODES.items():
        if key not in cfg:
            raise ConfigError(f"the recipe has no '{key}' node")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), cfg[key])
            nodes[key] = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config node '{key}': {_describe(err, key)}") from None
    for dotted, allowed in _CHOICES.items():
        node, _, attr = dotted.rpartition(".")
        value = _get(nodes, node, attr)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    if nodes["deepspeed"].stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage={nodes['deepspeed'].stage} is not one of 0, 1, 2, 3")
    for key in ("max_steps", "grad_accum", "log_every", "keep_last", "max_bad_steps"):
        if getattr(nodes["trainer"], key) < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(nodes['trainer'], key)}")
    if nodes["data"].batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {nodes['data'].batch_size}")
    if not 0.0 <= nodes["data"].max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction must be within [0, 1], got {nodes['data'].max_bad_fraction}")
    _check_targets(cfg, "")
    return RunConfig(name=str(cfg.name), run_dir=str(cfg.run_dir), **nodes)


def _check_targets(node: Any, where: str) -> None:
    """Every `_target_` of the recipe names a class or function that imports, before anything is built."""
    items = node.items() if isinstance(node, DictConfig) else enumerate(node) if isinstance(node, ListConfig) else ()
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if key == "_target_" and isinstance(value, str):
            _importable(value, path)
        else:
            _check_targets(value, path)


def _importable(dotted: str, key: str, shown: str | None = None) -> None:
    try:
        get_object(dotted)
    except Exception as err:  # whatever the import raised, inside the target's module too
        root: BaseException = err
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        raise ConfigError(f"{key}={shown or dotted}: cannot be imported ({root})") from None


def check_start_paths(trainer: TrainerConfig) -> None:
    """The paths a run starts from (`init_from`, `resume`) exist and its `init_converter` imports:
    checked when the run starts, before any data is prepared or model built (a recipe names paths that
    an earlier run will write)."""
    if trainer.init_from and not Path(trainer.init_from).exists():
        raise ConfigError(f"trainer.init_from={trainer.init_from}: no weights at {trainer.init_from}")
    if trainer.resume not in (None, "auto") and not Path(trainer.resume).is_dir():
        raise ConfigError(f"trainer.resume={trainer.resume}: no such checkpoint directory (auto finds the newest)")
    if trainer.init_converter:
        module, _, name = trainer.init_converter.partition(":")
        _importable(f"{module}.{name}" if name else module, "trainer.init_converter", trainer.init_converter)


def _get(nodes: dict[str, Any], node: str, attr: str) -> Any:
    obj: Any = nodes
    for part in node.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return getattr(obj, attr)


def _describe(err: OmegaConfBaseException, node: str) -> str:
    full_key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    if full_key:
        return f"key '{node + '.' if node else ''}{full_key}': {message}"
    return message
