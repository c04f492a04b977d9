"""The `serve` node: how `vlforge serve` exposes a model (recipes/serve/default.yaml holds the defaults;
every key is overridable, e.g. `serve.port=9000 serve.batching.max_running=64`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlforge.core.errors import ConfigError


@dataclass
class BatchingConfig:
    # continuous: requests join the running batch at the next decode step; request: a batch decodes to
    # its end before the next is admitted (request-level batching, kept for comparison)
    policy: str = "continuous"
    max_running: int = 32  # decode rows in the running batch (KV-cache slots)
    max_queue: int = 256  # requests waiting to be admitted; beyond: 503 with Retry-After
    max_batch_size: int = 32  # images encoded together; embedding / classify / match requests per batch
    max_wait_ms: float = 5.0  # how long a partial feature batch waits for more requests
    request_timeout_s: float = 120.0  # from arrival to the last token; then 504 (or a final error event)
    retry_after_s: int = 1  # the Retry-After header of a 503


@dataclass
class LimitsConfig:
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20  # one image's encoded bytes
    max_image_pixels: int = 40_000_000  # width x height, checked from the header before decoding
    max_aspect_ratio: float = 20.0  # long side / short side: a resize to the short side cannot blow up
    max_images: int = 16  # per request (embeddings inputs, classify images)
    max_prompt_tokens: int = 256
    max_tokens: int = 256  # the most a request may ask for (max_tokens)
    default_max_tokens: int = 30
    max_n: int = 8
    max_texts: int = 256  # texts per embeddings request, labels per classify request, answers per vqa rank


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: Optional[str] = None  # the id in /v1/models and responses; default: the recipe or zoo name
    device: str = "auto"  # auto: cuda if available, else cpu
    quantize: Optional[str] = None  # null | int8 | bf16 (load_model quant=) | 4bit | 8bit (bitsandbytes, the LM)
    # null | auto | {module: device}: the language model spread over the devices of one replica (accelerate)
    device_map: Any = None
    replicas: int = 1  # > 1: a Ray Serve deployment of this many replicas behind Ray's proxy
    # a Ray cluster to deploy on ("auto", "HOST:PORT", "ray://HOST:PORT"), or "local": a Ray of its own (the
    # default when replicas > 1); null with one replica: no Ray, one uvicorn process
    address: Optional[str] = None
    cpus_per_replica: float = 1.0  # Ray resources each replica reserves
    gpus_per_replica: Optional[float] = None  # null: one device per replica where the cluster has GPUs, else none
    allow_remote_images: bool = False  # http(s) image URLs are fetched by the server only when true
    api_keys_env: str = "VLFORGE_API_KEYS"  # comma-separated keys; when set (or api_keys_file), keys are required
    api_keys_file: Optional[str] = None  # one key per line
    graceful_shutdown_s: float = 30.0  # in-flight requests get this long to finish on Ctrl-C / SIGTERM
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


_POSITIVE = ("batching.max_running", "batching.max_queue", "batching.max_batch_size", "limits.max_body_bytes",
             "limits.max_image_bytes", "limits.max_image_pixels", "limits.max_images", "limits.max_prompt_tokens",
             "limits.max_tokens", "limits.default_max_tokens", "limits.max_n", "limits.max_texts", "replicas")


def serve_config(node: DictConfig | dict | None) -> ServeConfig:
    """The `serve` node merged into its schema; ConfigError naming the key otherwise."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ServeConfig), node or {})
        cfg: ServeConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"serve{'.' + key if key else ''}: {str(err).splitlines()[0]}") from None
    for dotted in _POSITIVE:
        obj = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj < 1:
            raise ConfigError(f"serve.{dotted} must be >= 1, got {obj}")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"serve.port must be in 1..65535, got {cfg.port}")
    if cfg.batching.policy not in ("continuous", "request"):
        raise ConfigError(f"serve.batching.policy={cfg.batching.policy!r} is not one of continuous, request")
    if cfg.quantize not in (None, "4bit", "8bit", "int8", "bf16"):
        raise ConfigError(f"serve.quantize={cfg.quantize!r} is not one of null, int8, bf16, 4bit, 8bit")
    if cfg.limits.default_max_tokens > cfg.limits.max_tokens:
        raise ConfigError("serve.limits.default_max_tokens exceeds serve.limits.max_tokens")
    if cfg.device_map is not None and cfg.device_map != "auto" and not isinstance(cfg.device_map, dict):
        raise ConfigError(f"serve.device_map={cfg.device_map!r}: expected auto or a {{module: device}} map")
    if cfg.device_map is not None and cfg.quantize is not None:
        raise ConfigError("serve.device_map with serve.quantize: a quantized model is held on one device")
    if cfg.cpus_per_replica < 0 or (cfg.gpus_per_replica is not None and cfg.gpus_per_replica < 0):
        raise ConfigError("serve.cpus_per_replica and serve.gpus_per_replica must be >= 0")
    return cfg
