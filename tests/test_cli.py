"""The ``bagel`` command line, run as a real subprocess (``python -m bagel.cli``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bagel.cli import PARAM_FLAGS, build_parser, main
from bagel.config import GenerationParams

ROOT = Path(__file__).resolve().parent.parent


def bagel(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bagel.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    done = bagel("make-tiny", folder, "--seed", "5")
    assert done.returncode == 0, done.stderr
    assert f"to {folder}" in done.stdout
    return folder


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pictures") / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def test_make_tiny_writes_a_loadable_checkpoint(ckpt):
    assert (ckpt / "ema.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()


def test_generate_writes_a_png_of_the_requested_size(ckpt, tmp_path):
    out = tmp_path / "sub" / "gen.png"
    done = bagel("generate", "--model", ckpt, "--prompt", "a red circle", "--width", "64", "--height", "48",
                 "--steps", "8", "--seed", "1", "--cfg-renorm-type", "channel", "--taylorseer", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "denoising" in done.stderr  # the progress bar
    assert f"wrote {out} (64x48)" in done.stderr
    assert Image.open(out).size == (64, 48)


def test_edit_with_think_writes_a_png_and_the_think_text(ckpt, picture, tmp_path):
    out = tmp_path / "edit.png"
    done = bagel("edit", "--model", ckpt, "--image", picture, "--prompt", "make it blue", "--steps", "2",
                 "--think", "--max-think-tokens", "4", "--seed", "3", "--no-progress", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "think: " in done.stderr and "denoising" not in done.stderr
    assert Image.open(out).size[0] % 16 == 0


def test_understand_writes_the_answer_to_stdout(ckpt, picture):
    done = bagel("understand", "--model", ckpt, "--image", picture, "--prompt", "What is it?",
                 "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert len(done.stdout.splitlines()) == 1


def test_user_errors_exit_2_with_one_line_and_no_traceback(ckpt, tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a picture")
    cases = [
        (("edit", "--model", ckpt, "--image", junk, "--prompt", "x"), f"image ({junk}): not a PNG"),
        (("understand", "--model", ckpt, "--image", tmp_path / "absent.png", "--prompt", "x"),
         "image[0]: cannot read"),
        (("generate", "--model", tmp_path / "nowhere", "--prompt", "x"), "checkpoint folder does not exist"),
        (("generate", "--model", ckpt, "--prompt", "x", "--steps", "1"),
         "num_timesteps: 1 is outside the allowed range 2..1000"),
        (("generate", "--model", ckpt, "--prompt", "x", "--width", "4096", "--height", "64"),
         "width: 4096 px exceeds the 1024 px maximum"),
        (("generate", "--model", ckpt, "--prompt", "   "), "prompt: must be a non-empty string"),
        (("make-tiny", ckpt), "already exists and is not an empty directory"),
    ]
    for args, needle in cases:
        assert main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("bagel: error [") and needle in err, err
        assert len(err.splitlines()) == 1


def test_a_bad_picture_is_refused_in_a_real_process_without_traceback(ckpt, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    done = bagel("edit", "--model", ckpt, "--image", junk, "--prompt", "x")
    assert done.returncode == 2
    assert done.stderr.startswith(f"bagel: error [invalid_input]: image ({junk}):")
    assert "Traceback" not in done.stderr


def test_verify_passes_on_the_golden_fixture(golden_dir):
    done = bagel("verify", golden_dir, "--case", "tokenize", "--case", "understand")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("tokenize") and lines[0].split()[2] == "ok"
    assert lines[1].startswith("understand") and "max_abs_diff=" in lines[1]
    assert lines[-1] == "2/2 cases ok"


def test_verify_fails_when_a_golden_value_is_off(golden_dir, tmp_path, capsys):
    folder = tmp_path / "golden-copy"
    shutil.copytree(golden_dir, folder)
    cases_path = folder / "golden" / "cases.json"
    raw = json.loads(cases_path.read_text())
    case = next(c for c in raw["cases"] if c["id"] == "tokenize")
    case["expected"]["items"][1]["decoded"] += "!"
    cases_path.write_text(json.dumps(raw))
    done = bagel("verify", folder, "--case", "tokenize")
    assert done.returncode == 1
    assert "FAIL" in done.stdout.splitlines()[0]
    assert "failed: tokenize" in done.stdout
    assert main(["verify", str(folder), "--case", "no_such_case"]) == 2
    assert "--case: no_such_case not found in" in capsys.readouterr().err


def test_every_generation_knob_has_a_flag():
    assert set(PARAM_FLAGS.values()) == {f.name for f in dataclasses.fields(GenerationParams)}
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--cfg-interval", "0.1",
                                      "0.9", "--do-sample", "--temperature", "0.7", "--taylorseer"])
    assert args.cfg_interval == [0.1, 0.9] and args.do_sample is True and args.temperature == 0.7
    assert args.taylorseer is True


def test_bench_writes_the_json_report_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "reports" / "bench.json"
    code = main(["bench", "--size", "tiny", "--scenario", "t2i1", "--steps", "2", "--no-warm-up",
                 "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and [r["scenario"] for r in report["results"]] == ["t2i1"]
    assert "t2i1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# ``bagel-jobs tenant limits``: the job service's command line, run as a real process on both databases


def bagel_jobs(db_url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_JOBS_")}
    env.update(PYTHONPATH=str(ROOT), BAGEL_JOBS_DATABASE_URL=db_url)
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_tenant_limits_are_printed_set_and_cleared(db_url, db_session, tmp_path):
    from worker import tenants
    from worker.models import Tenant

    tenant = tenants.create_tenant(db_session, "acme")
    shown = bagel_jobs(db_url, "tenant", "limits", "acme", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"tenant_id": tenant.id, "name": "acme", "weight": 1.0,
                                        "requests_per_minute": None, "max_waiting_jobs": None,
                                        "max_running_chunks": None, "monthly_gpu_seconds": None}
    changed = bagel_jobs(db_url, "tenant", "limits", tenant.id, "--requests-per-minute", "10", "--max-waiting-jobs",
                         "0", "--max-running-chunks", "2", "--monthly-gpu-seconds", "3600.5", "--weight", "2.5",
                         cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) | {"tenant_id": None} == {
        "tenant_id": None, "name": "acme", "weight": 2.5, "requests_per_minute": 10, "max_waiting_jobs": 0,
        "max_running_chunks": 2, "monthly_gpu_seconds": 3600.5}
    cleared = bagel_jobs(db_url, "tenant", "limits", "acme", "--requests-per-minute", "none",
                         "--monthly-gpu-seconds", "NONE", cwd=tmp_path)
    assert cleared.returncode == 0, cleared.stderr
    after = json.loads(cleared.stdout)
    assert after["requests_per_minute"] is None and after["monthly_gpu_seconds"] is None
    assert (after["max_waiting_jobs"], after["max_running_chunks"], after["weight"]) == (0, 2, 2.5)  # kept
    db_session.expire_all()
    row = db_session.get(Tenant, tenant.id)
    assert (row.requests_per_minute, row.max_waiting_jobs, row.max_running_chunks, row.monthly_gpu_seconds,
            row.weight) == (None, 0, 2, None, 2.5)


def test_tenant_limits_refuse_bad_values_and_change_nothing(db_url, db_session, tmp_path):
    from worker import tenants

    tenants.create_tenant(db_session, "acme")
    tenants.set_limits(db_session, "acme", {"max_waiting_jobs": 7})
    cases = [
        (["--max-waiting-jobs", "-1"], 1, "max_waiting_jobs: -1 must be an integer in 0..10,000,000, or none"),
        (["--weight", "0"], 1, "weight: 0.0 must be a number > 0 and <= 1000"),
        (["--weight", "none"], 1, "weight: None must be a number > 0"),
        (["--monthly-gpu-seconds", "nan"], 1, "monthly_gpu_seconds: nan must be a number in 0.."),
        (["--requests-per-minute", "lots"], 2, "argument --requests-per-minute: 'lots' is not an integer or 'none'"),
        (["--max-running-chunks", "1.5"], 2, "'1.5' is not an integer or 'none'"),
    ]
    for extra, code, needle in cases:
        done = bagel_jobs(db_url, "tenant", "limits", "acme", "--requests-per-minute", "5", *extra, cwd=tmp_path)
        assert done.returncode == code, (extra, done.stderr)
        assert needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    missing = bagel_jobs(db_url, "tenant", "limits", "nobody", cwd=tmp_path)
    assert missing.returncode == 1 and "no tenant with id or name 'nobody'" in missing.stderr
    assert tenants.get_limits(db_session, "acme")["requests_per_minute"] is None  # no partial change
    assert tenants.get_limits(db_session, "acme")["max_waiting_jobs"] == 7
