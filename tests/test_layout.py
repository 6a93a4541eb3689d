"""The package rules in README "Development", checked on the import statements of every module.

Covered: ``bagel`` imports nothing from the service; ``api`` never imports torch or the model;
only ``worker/gpu.py`` imports the engine at load time (other worker modules take torch-free
constants from ``bagel``; importing all of ``api`` and ``worker`` but ``gpu`` loads no torch,
checked in a fresh interpreter); no production module
imports ``worker.dev`` (the CLI only inside its ``up`` and ``demo`` commands); ``worker`` has no
module-level import of ``api``; no module is over 600 lines. The checks read the source, so they
fail on the commit that breaks a rule, whatever the test run happened to import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bagel", "worker", "api", "bagel_client")
MAX_LINES = 600


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, dotted
    top_level: bool  # runs at load time: at module level, not inside a function or TYPE_CHECKING
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    nested: set[int] = set()
    for node in ast.walk(tree):
        deferred = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
            isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"))
        if deferred:
            nested.update(id(inner) for inner in ast.walk(node) if inner is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [Import(module, target, id(node) not in nested, node.lineno) for target in targets]
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


ALL = [imp for package in PACKAGES for path in _sources(package) for imp in _imports(path)]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _offenders(importer: str, target: str, *, allowed: tuple[str, ...] = (), top_level_only: bool = False) -> list:
    return [f"{imp.module}:{imp.line} imports {imp.target}" for imp in ALL
            if _under(imp.module, importer) and _under(imp.target, target)
            and not any(_under(imp.module, ok) for ok in allowed) and (imp.top_level or not top_level_only)]


def test_the_scan_sees_the_imports_it_judges() -> None:
    """Guards the checks below against passing on an empty scan."""
    assert any(imp.module == "worker.gpu" and _under(imp.target, "bagel") for imp in ALL)
    assert any(imp.module == "worker.cli" and _under(imp.target, "worker.dev") and not imp.top_level for imp in ALL)
    assert any(imp.module == "worker.cli" and imp.target == "api.serve" and not imp.top_level for imp in ALL)


@pytest.mark.parametrize("service", ["worker", "api", "bagel_client"])
def test_the_model_imports_nothing_from_the_service(service: str) -> None:
    assert _offenders("bagel", service) == []


def test_the_api_never_imports_torch_or_the_model() -> None:
    assert _offenders("api", "torch") == [] and _offenders("api", "bagel") == []


TORCH_FREE_MODEL_MODULES = ("bagel.config", "bagel.sizes", "bagel.errors", "bagel.adapter_format")


def test_only_the_gpu_module_imports_the_engine() -> None:
    loaded = [imp for imp in ALL if _under(imp.module, "worker") and imp.top_level
              and not _under(imp.module, "worker.gpu") and not _under(imp.module, "worker.dev")
              and (_under(imp.target, "torch") or _under(imp.target, "bagel"))
              and not any(_under(imp.target, ok) for ok in TORCH_FREE_MODEL_MODULES)]
    assert loaded == []


def test_the_api_and_the_worker_but_its_gpu_module_load_without_torch() -> None:
    modules = sorted(_module_name(path) for package in ("api", "worker") for path in _sources(package)
                     if not _under(_module_name(path), "worker.gpu"))
    script = ("import importlib, sys\n"
              f"for name in {modules!r}: importlib.import_module(name)\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('bagel.engine')))")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_production_code_never_imports_the_development_package() -> None:
    assert _offenders("worker", "worker.dev", allowed=("worker.dev", "worker.cli")) == []
    assert _offenders("worker.cli", "worker.dev", top_level_only=True) == []
    for package in ("api", "bagel", "bagel_client"):
        assert _offenders(package, "worker.dev") == []


def test_the_worker_package_has_no_module_level_import_of_the_api() -> None:
    assert _offenders("worker", "api", top_level_only=True) == []


def test_the_sdk_imports_nothing_from_the_server_packages() -> None:
    for package in ("api", "worker", "bagel"):
        assert _offenders("bagel_client", package) == []


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for package in PACKAGES for path in _sources(package)}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}
