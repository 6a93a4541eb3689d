"""``bagel-jobs`` as a user runs it: real subprocesses on a fresh embedded folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from tests.fixtures.worker import ROOT, wait_until
from worker import db, tenants
from worker.models import ApiKey
from worker.settings import Settings


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_JOBS_")}
    full["PYTHONPATH"] = str(ROOT)
    full.update(env)
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=120)


def test_config_prints_every_setting_with_secrets_masked(tmp_path: Path) -> None:
    r = _cli(["config"], tmp_path, BAGEL_JOBS_S3_SECRET_ACCESS_KEY="hunter2",
             BAGEL_JOBS_DATABASE_URL="postgresql+psycopg://bagel:pw123@db:5432/bagel")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["s3_secret_access_key"] == "***"
    assert shown["database_url"] == "postgresql+psycopg://bagel:***@db:5432/bagel"
    assert shown["broker_url"] == "sqla+sqlite:///var/broker.db" and shown["chunk_size"] == 8
    assert "hunter2" not in r.stdout + r.stderr and "pw123" not in r.stdout + r.stderr


def test_bad_setting_is_refused_naming_the_variable(tmp_path: Path) -> None:
    r = _cli(["config"], tmp_path, BAGEL_JOBS_CHUNK_SIZE="0")
    assert r.returncode == 2
    assert "BAGEL_JOBS_CHUNK_SIZE" in r.stderr


def test_db_upgrade_tenant_and_key_create_on_a_fresh_folder(tmp_path: Path) -> None:
    assert _cli(["db", "upgrade"], tmp_path).returncode == 0
    assert (tmp_path / "var" / "bagel-jobs.db").exists()
    r = _cli(["tenant", "create", "acme"], tmp_path)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["api_key"].startswith("bj_") and made["webhook_secret"].startswith("whsec_")
    r2 = _cli(["key", "create", "acme", "--name", "ci"], tmp_path)
    assert r2.returncode == 0, r2.stderr
    second = json.loads(r2.stdout)["api_key"]
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'var' / 'bagel-jobs.db'}")
    engine = db.make_engine(settings)
    with db.session_factory(engine)() as s:
        for key in (made["api_key"], second):
            tenant = tenants.authenticate(s, key)
            assert tenant is not None and tenant.id == made["tenant_id"]
        hashes = s.scalars(select(ApiKey.key_hash)).all()
    engine.dispose()
    assert made["api_key"] not in hashes and len(hashes) == 2  # stored hashed only
    dup = _cli(["tenant", "create", "acme"], tmp_path)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert _cli(["db", "downgrade", "base"], tmp_path).returncode == 0


def test_worker_refuses_unknown_queues(tmp_path: Path) -> None:
    r = _cli(["worker", "--queues", "gpu,cpu"], tmp_path)
    assert r.returncode == 2 and "--queues: ['cpu']" in r.stderr


def test_worker_node_names_carry_the_real_host_and_pid(tmp_path: Path) -> None:
    """``app.Worker`` does not expand Celery's ``%h``: the node name is built with the host name and
    the pid, as the worker's start-up banner and its ready line show."""
    assert _cli(["db", "upgrade"], tmp_path).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_JOBS_")}
    env["PYTHONPATH"] = str(ROOT)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--queues", "webhooks", "--name",
                                 "hooks-a"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        node = f"hooks-a@{socket.gethostname()}:{proc.pid}"

        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return f"{node} ready." in log_path.read_text()

        wait_until(ready, 60, 0.1, f"{node} to be ready")
        started = log_path.read_text()
        assert f"-------------- {node} v" in started  # Celery's banner
        assert f"(node {node}) consuming ['webhooks']" in started and "%h" not in started
    finally:
        proc.terminate()
        proc.wait(30)
    refused = _cli(["worker", "--queues", "webhooks", "--name", "hooks@%h"], tmp_path)
    assert refused.returncode == 2
    assert ("--name: 'hooks@%h' contains '@'; give the prefix only (the node name is <prefix>@<host>:<pid>)"
            in refused.stderr)
