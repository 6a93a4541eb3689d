"""``scripts/gpu-check`` run for real, in a subprocess, as a session on a GPU machine runs it:
the CPU dry run at tiny scale (every check, CUDA-only assertions marked ``needs CUDA``), the
deadline (``--deadline-s 0`` skips everything and still writes the report) and a bad option
(exit 2, naming it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check"
CHECKS = ("versions", "attention", "load_bf16", "load_nf4", "load_int8", "outputs", "loop_syncs",
          "batched_vs_naive", "tryon_memory", "oom_bisection", "offload")
TIMINGS = ("time_t2i", "time_edit", "time_tryon8_batched", "time_tryon8_naive", "time_tryon8_taylorseer",
           "time_think")
ALL = (*CHECKS, *TIMINGS, *(f"{name}_nf4" for name in TIMINGS))
ALLOWED_SKIPS = ("needs CUDA", "bitsandbytes not importable")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _report(out: Path) -> tuple[dict, str]:
    (json_path,) = out.glob("*.json")
    (txt_path,) = out.glob("*.txt")
    assert txt_path.stem == json_path.stem
    return json.loads(json_path.read_text()), txt_path.read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _run("--device", "cpu", "--size", "tiny", "--out", str(out))
    return (proc, *_report(out))


def test_the_cpu_dry_run_passes_every_check(dry_run):
    proc, report, _ = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    names = [c["name"] for c in report["checks"]]
    assert sorted(names) == sorted(ALL) and len(names) == len(ALL)
    for check in report["checks"]:
        assert set(check) >= {"name", "status", "reason", "seconds", "figures"}
        assert check["status"] in ("pass", "skipped"), check
        if check["status"] == "skipped":
            assert check["reason"] in ALLOWED_SKIPS, check
        assert check["seconds"] >= 0 and isinstance(check["figures"], dict)
    assert report["counts"]["fail"] == 0 and report["size"] == "tiny"


def test_the_dry_run_marks_cuda_only_assertions_and_measures(dry_run):
    _, report, _ = dry_run
    checks = {c["name"]: c for c in report["checks"]}
    unchecked = {c["name"]: [a["what"] for a in c["assertions"] if a["ok"] is None] for c in report["checks"]}
    assert any("math kernel excluded" in what for what in unchecked["attention"])
    assert any("sync_debug_mode" in what for what in unchecked["loop_syncs"])
    assert any("memory_estimate" in what for what in unchecked["tryon_memory"])
    assert any("within 5% of weight_bytes" in what for what in unchecked["load_bf16"])
    if checks["load_nf4"]["status"] == "pass":  # bitsandbytes is installed here
        assert checks["load_nf4"]["figures"]["weight_bytes"] < checks["load_bf16"]["figures"]["weight_bytes"]
    assert checks["oom_bisection"]["figures"]["injected_ooms"] > 0
    assert checks["time_tryon8_batched"]["figures"]["images"] == 8
    assert checks["time_think"]["figures"]["think_tokens"] >= 1


def test_the_table_lists_every_check_with_its_status(dry_run):
    proc, report, table = dry_run
    assert table.strip() == proc.stdout.strip()
    lines = table.splitlines()
    assert lines[0].startswith("gpu-check --size tiny on cpu:")
    for check in report["checks"]:
        (row,) = [line for line in lines if line.split("  ")[0].strip() == check["name"]]
        assert ("pass" if check["status"] == "pass" else "skipped: ") in row


def test_a_zero_deadline_skips_everything_and_still_writes_the_report(tmp_path):
    proc = _run("--device", "cpu", "--size", "tiny", "--deadline-s", "0", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, table = _report(tmp_path)
    assert [c["name"] for c in report["checks"]] and len(report["checks"]) == len(ALL)
    assert all(c["status"] == "skipped" and c["reason"] == "time budget" and c["planned_s"] > 0
               for c in report["checks"])
    assert table.count("skipped: time budget") == len(ALL)


def test_a_bad_size_exits_2_naming_the_option(tmp_path):
    proc = _run("--device", "cpu", "--size", "huge", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "argument --size: invalid choice: 'huge'" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_offload_overlap_is_read_from_a_profiler_trace(monkeypatch):
    """``copy_overlap`` on a hand-made chrome trace (the CUDA profile is not available on CPU):
    two-tensor layer copies on stream 9, compute kernels on stream 7; the second layer's copy
    runs while nothing computes."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from gpu_check.offload_check import copy_overlap

    def memcpy(ts, dur, stream=9, nbytes=1000):
        return {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": ts, "dur": dur,
                "args": {"stream": stream, "bytes": nbytes}}

    def kernel(ts, dur, stream=7):
        return {"ph": "X", "cat": "kernel", "name": "gemm", "ts": ts, "dur": dur, "args": {"stream": stream}}

    events = [memcpy(0, 10), memcpy(10, 10), kernel(5, 10), memcpy(30, 10), memcpy(40, 10), kernel(60, 5),
              memcpy(100, 1, stream=7, nbytes=8), kernel(45, 1, stream=9),
              {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0, "dur": 100, "args": {}}]
    got = copy_overlap(events, tensors_per_layer=2)
    assert (got["layer_copies"], got["overlapping_layer_copies"], got["memcpys"]) == (2, 1, 4)
    assert got["overlapping_share"] == 0.5 and got["hidden_copy_time_share"] == 10 / 40
    assert got["copied_bytes"] == 4000 and got["copy_gb_per_s"] == 4000 / 40 / 1e3
    assert copy_overlap([kernel(0, 1)], tensors_per_layer=2) == {"layer_copies": 0}
