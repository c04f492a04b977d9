"""The code names only what it defines or imports, imports what it uses, in sorted blocks (ruff's
pyflakes and isort rules, configured in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_undefined_or_unused_names_and_sorted_imports() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,I", "--output-format", "concise",
                             "vlforge", "tests", "benchmarks", "launch"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
