"""Experiment tracking on rank 0: a metrics.jsonl always, wandb when enabled (offline without a key)."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from vlforge.config.schema import LoggerConfig
from vlforge.trainer.report import write_report

log = logging.getLogger(__name__)


def wandb_mode(cfg: LoggerConfig) -> str:
    """'auto' means online only when an API key is configured, so a run never waits on a login."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Tracker:
    """Does nothing on ranks other than 0, so callers need not check."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any], enabled: bool) -> None:
        self.enabled, self.cfg, self.run_dir = enabled, cfg, run_dir
        self._wandb: Any = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.wandb:
            self._start_wandb(run_name, config)

    def _start_wandb(self, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        # One wandb run per run directory: a resumed job continues the same wandb run.
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = wandb_mode(self.cfg)
        self._wandb = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, name=run_name, id=run_id, resume="allow",
            dir=str(self.run_dir), config=config, mode=mode, tags=list(self.cfg.tags),
            # Console capture patches stdout, which breaks in forked loader workers; metrics need no capture.
            settings=wandb.Settings(init_timeout=60, silent=True, console="off"),
        )
        log.info("wandb: %s run %s in %s", mode, run_id, self.run_dir / "wandb")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if not self.enabled or not rows:
            return
        rows = rows[: self.cfg.num_table_rows]
        plain = [{c: v for c, v in zip(columns, row) if not isinstance(v, torch.Tensor)} for row in rows]
        with open(self.run_dir / "predictions.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "table": name, "rows": plain}) + "\n")
        report = self.run_dir / "reports" / f"{name.replace('/', '_')}_step_{step:08d}"
        write_report(report, f"{name} at step {step}", columns, rows)
        if self._wandb is None:
            return
        import wandb

        def cell(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim == 3:
                return wandb.Image(value.permute(1, 2, 0).cpu().numpy())
            return value

        self._wandb.log({name: wandb.Table(columns=columns, data=[[cell(v) for v in row] for row in rows])}, step=step)

    def save_results(self, split: str, step: int, results: list[dict[str, Any]]) -> Path | None:
        """Every prediction of an evaluation (e.g. [{image_id, caption}]) as `results/{split}_step_N.json`."""
        if not self.enabled or not results:
            return None
        path = self.run_dir / "results" / f"{split}_step_{step:08d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results), encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a file
        return path

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
