"""The README's demo command, end to end through the `vlforge` command: builds the demo data, trains on
two ranks, evaluates, checkpoints, and keeps third-party chatter in the run's log."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, REPO, check, free_port, launch, read_metrics

README_DEMO = "vlforge train --nproc 2 recipe=clip_demo"


@pytest.mark.slow
def test_readme_demo_command(e2e_env: dict[str, str], tmp_path: Path) -> None:
    assert README_DEMO in (REPO / "README.md").read_text(), "the README's demo command changed"
    cmd = shlex.split(README_DEMO)
    cmd[0] = str(BIN / "vlforge")  # the console script the set-up installed
    cmd[4:4] = ["--master-port", str(free_port())]
    # Only the run directory moves, so the test leaves the checkout's runs/ alone.
    result = check(launch([*cmd, f"run_dir={tmp_path / 'run'}"], e2e_env, timeout=900))
    print(result.output[-2500:])
    assert result.seconds < 600, f"the demo took {result.seconds:.0f} s"

    rows = read_metrics(tmp_path / "run")
    final = {k: v for row in rows if row["step"] == 300 for k, v in row.items()}
    assert final["test/zeroshot_top1"] >= 0.9, final
    assert final["test/num_images"] == 600
    first_eval = next(row for row in rows if "val/zeroshot_top1" in row)
    assert first_eval["val/zeroshot_top1"] < final["val/zeroshot_top1"]
    assert final["data/skipped_samples"] == 0 and final["data/unreadable_shards"] == 0

    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000200", "step_00000300"]  # keep_last=2
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_00000300" / "complete.json").read_text())["world_size"] == 2
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "wandb should run offline without an API key"
    assert "vlforge: done at step 300" in result.output and "test/zeroshot_top1" in result.output
    # The console is quiet: DeepSpeed's op build and third-party warnings went to the ranks' logs.
    assert "FutureWarning" not in result.output and "gcc " not in result.output
    assert (tmp_path / "run" / "logs" / "rank0.log").is_file() and (tmp_path / "run" / "logs" / "rank1.log").is_file()
