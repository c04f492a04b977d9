"""The quiet console: third-party warnings, log records and build output go to the run's log, and
VLFORGE_VERBOSE=1 leaves them on the terminal. Each case runs in a fresh interpreter, since
installing it changes process-wide state (warnings.showwarning, loggers, file descriptors)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, subprocess, sys, warnings
from pathlib import Path
from vlforge.core import console

console.install()
warnings.warn("before the log is known", FutureWarning)
print("vlforge: a phase line", flush=True)
log = console.attach_log(Path(sys.argv[1]))
logging.getLogger("DeepSpeed").addHandler(logging.StreamHandler(sys.stdout))  # as DeepSpeed's import does
with console.output_to_log():
    subprocess.run(["echo", "gcc -O3 -c test.c"], check=True)
    logging.getLogger("DeepSpeed").warning("a record from a library")
warnings.warn("after", UserWarning)
print("vlforge: log at", log, flush=True)
"""


def _run(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "logs" / "rank0.log"
    env = {**os.environ, "VLFORGE_VERBOSE": "1" if verbose else "0"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result, log


def test_warnings_records_and_build_output_go_to_the_log_and_phase_lines_stay(tmp_path: Path) -> None:
    result, log = _run(tmp_path, verbose=False)
    assert result.stdout.splitlines() == ["vlforge: a phase line", f"vlforge: log at {log}"]
    assert result.stderr == ""
    written = log.read_text()
    for text in ("FutureWarning: before the log is known", "gcc -O3 -c test.c", "[DeepSpeed] a record from a library",
                 "UserWarning: after"):
        assert text in written
    assert written.index("before the log is known") < written.index("gcc -O3") < written.index("after")


def test_verbose_leaves_everything_on_the_terminal(tmp_path: Path) -> None:
    result, log = _run(tmp_path, verbose=True)
    assert "gcc -O3 -c test.c" in result.stdout
    assert "FutureWarning: before the log is known" in result.stderr and "UserWarning: after" in result.stderr
    assert "vlforge: log at None" in result.stdout
    assert not log.exists()
