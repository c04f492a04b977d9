"""Evaluation only: a recipe's model with a checkpoint's weights, scored on the recipe's splits by its
task, on any number of ranks (the weights are consolidated, so the world size need not match).
`checkpoint=null` scores the recipe's own starting weights (`trainer.init_from`) instead: a published
model evaluated as it is, e.g. CLIP zero-shot."""
from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlforge.core.checkpoints import consolidated_state_dict, resolve_checkpoint
from vlforge.core.errors import ConfigError
from vlforge.core.state_dict import load_into_model
from vlforge.trainer.run import start_session
from vlforge.trainer.tracking import Tracker


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.checkpoint is None:
        if not cfg.trainer.get("init_from"):
            raise ConfigError("checkpoint=null evaluates the recipe's trainer.init_from weights, and this recipe "
                              "sets none: pass checkpoint=<run dir or checkpoints/step_N> or trainer.init_from=<weights>")
        session = start_session(cfg, load_init_weights=True)
        source, step = str(cfg.trainer.init_from), 0
    else:
        checkpoint = resolve_checkpoint(cfg.checkpoint)  # before any compute: a wrong path fails at once
        session = start_session(cfg, load_init_weights=False)  # the checkpoint's weights replace them
        source = str(checkpoint.resolve())
        step = int(json.loads((checkpoint / "complete.json").read_text())["step"])
        load_into_model(session.engine.module, consolidated_state_dict(checkpoint))  # strict: every key both ways
    run, dist_env, engine = session.run, session.dist_env, session.engine
    engine.eval()
    tracker = Tracker(run.logger, session.run_dir, f"{run.name}-eval", OmegaConf.to_container(cfg, resolve=True),
                      dist_env.is_main)
    metrics: dict[str, float] = {}
    splits = cfg.splits if cfg.splits is not None else [s for s in ("val", "test") if getattr(run.data, s, None)]
    for split in splits:
        if getattr(run.data, split, None) is None:
            raise ValueError(f"splits: data.{split} is not configured in recipe {run.name}")
        result = session.task.evaluate(engine.module, split, run.data, dist_env, run.trainer.seed)
        metrics.update({f"{split}/{k}": v for k, v in result.metrics.items()})
        tracker.log_table(f"{split}/predictions", result.table_columns, result.table_rows, step)
        tracker.save_results(split, step, result.results)
    tracker.log(metrics, step)
    tracker.finish()
    if dist_env.is_main:
        summary: dict[str, Any] = {"checkpoint": source, "step": step,
                                   "world_size": dist_env.world_size, "metrics": metrics}
        (session.run_dir / "eval.json").write_text(json.dumps(summary, indent=1))
        lines = [f"vlforge: evaluated {source} (step {step}) on {dist_env.world_size} rank(s) | "
                 f"results in {session.run_dir.resolve()}"]
        print("\n".join(lines + [f"  {k} = {v:.4f}" for k, v in sorted(metrics.items())]), flush=True)
    return metrics
