"""The package's layers import one way (pyproject.toml's import-linter contract), with no import of
vlforge hidden inside a function to get around it."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vlforge"


def test_the_layers_contract_holds() -> None:
    lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint_imports, "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_no_cycle_between_subpackages() -> None:
    graph = grimp.build_graph("vlforge")
    packages = sorted(m for m in graph.find_children("vlforge") if graph.find_children(m))
    packages += sorted(m for m in graph.find_children("vlforge.models") if graph.find_children(m))
    cycles = [(a, b) for i, a in enumerate(packages) for b in packages[i + 1:]
              if not (a.startswith(b + ".") or b.startswith(a + "."))
              and graph.chain_exists(importer=a, imported=b, as_packages=True)
              and graph.chain_exists(importer=b, imported=a, as_packages=True)]
    assert cycles == []


def _function_level_vlforge_imports(path: Path) -> list[int]:
    """Line numbers of vlforge imports inside functions of `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                names = ([inner.module or ""] if isinstance(inner, ast.ImportFrom)
                         else [a.name for a in inner.names] if isinstance(inner, ast.Import) else [])
                if any(n == "vlforge" or n.startswith("vlforge.") for n in names):
                    found.append(inner.lineno)
    return found


# The package root's public names (load_model, model_zoo) load on first use, so that importing a light
# submodule (the serving middleware Ray's proxy loads within its readiness timeout) does not import
# torch. The root sits above every layer: this is laziness, not a way around the contract.
LAZY_ROOT = PACKAGE / "__init__.py"


def test_no_vlforge_import_inside_a_function() -> None:
    found = {str(path.relative_to(REPO)): lines for path in sorted(PACKAGE.rglob("*.py"))
             if path != LAZY_ROOT and (lines := _function_level_vlforge_imports(path))}
    assert found == {}


def test_importing_a_light_submodule_does_not_import_torch() -> None:
    probe = "import sys, vlforge.serve.replica_loss; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_the_checker_finds_a_function_level_import(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text("import vlforge.core\n\n\ndef f():\n    from vlforge.core.errors import ConfigError\n"
                      "    return ConfigError\n")
    assert _function_level_vlforge_imports(module) == [5]
