"""``bagel-jobs api`` as processes: the worker count, each process's database pool, the warning when
they could exceed PostgreSQL's ``max_connections``, workers that end with their supervisor, and
download URLs on the port actually served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio import to_thread
from sqlalchemy import text

from tests.fixtures.worker import ROOT, free_port, wait_until
from worker import chunks, db, jobs, tenants
from api.serve import MAX_DEFAULT_API_WORKERS, api_app, api_worker_count
from worker.models import utcnow
from worker.settings import Settings
from worker.storage import make_store, output_key

POOL_SIZE, MAX_OVERFLOW = 100, 100  # the settings' largest values: 2 processes x 200 connections


def _children(pid: int) -> list[int]:
    """uvicorn's worker processes of the supervisor ``pid`` (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the supervisor-death signal is Linux's")
def test_two_api_workers_serve_jobs_warn_about_max_connections_and_end_with_their_supervisor(
        pg_url: str, tmp_path: Path) -> None:
    engine = db.make_engine(pg_url)
    with db.session_factory(engine)() as session:
        tenant = tenants.create_tenant(session, f"procs-{uuid.uuid4().hex[:8]}")
        _, key = tenants.create_api_key(session, tenant.id)
    with engine.connect() as conn:
        max_connections = int(conn.execute(text("SHOW max_connections")).scalar_one())
    engine.dispose()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_JOBS_")}
    env.update(PYTHONPATH=str(ROOT), BAGEL_JOBS_DATABASE_URL=pg_url, BAGEL_JOBS_STORAGE_DIR=str(tmp_path / "storage"),
               BAGEL_JOBS_URL_SIGNING_KEY="test", BAGEL_JOBS_API_WORKERS="2",
               BAGEL_JOBS_DB_POOL_SIZE=str(POOL_SIZE), BAGEL_JOBS_DB_MAX_OVERFLOW=str(MAX_OVERFLOW))
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "api", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 90, 0.1, "the API to answer /healthz")
        workers = wait_until(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), 30, 0.1, "2 workers")
        for i in range(6):  # a new connection each: the kernel hands them to either process
            r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                           json={"task": "generate", "prompt": f"job {i}", "width": 32, "height": 32}, timeout=30)
            assert r.status_code == 202, r.text
        # Whichever process answers a scrape, it counts every process's requests.
        for _ in range(4):
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            [count] = [float(line.rsplit(" ", 1)[1]) for line in scraped.splitlines()
                       if line.startswith("bagel_http_request_duration_seconds_count{")
                       and 'route="/v1/jobs"' in line and 'method="POST"' in line and 'status="202"' in line]
            assert count == 6, scraped
        served = log_path.read_text()
        assert ("2 worker process(es), each with 100 threads and a pool of 100 database connections "
                "(at most 200 with its overflow)") in served
        assert ("exceeds PostgreSQL's max_connections" in served) == (2 * (POOL_SIZE + MAX_OVERFLOW) > max_connections)
        # The workers log through the service's formatter: "… INFO worker.jobs [pid] submitted …".
        assert any(f"INFO worker.jobs [{pid}] submitted 1 job(s)" in served for pid in workers), served

        proc.kill()  # no SIGTERM for uvicorn to pass on: the workers learn it from the kernel
        proc.wait()
        wait_until(lambda: not any(_alive(pid) for pid in workers), 30, 0.1, "the workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_pool_settings_reach_postgres_engines_and_sqlite_keeps_its_own(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url="postgresql+psycopg://bagel@127.0.0.1:9/bagel",
                        db_pool_size=7, db_max_overflow=3)
    engine = db.make_engine(settings)  # connects lazily: nothing listens on port 9
    assert (engine.pool.size(), engine.pool._max_overflow) == (7, 3)
    assert db.connections_per_process(settings) == 10
    engine.dispose()
    sqlite = db.make_engine(settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'x.db'}"}))
    with sqlite.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    sqlite.dispose()


def test_api_workers_default_to_one_per_core_at_most_eight() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert api_worker_count(Settings(_env_file=None)) == min(cores, MAX_DEFAULT_API_WORKERS)
    assert api_worker_count(Settings(_env_file=None, api_workers=3)) == 3


def test_the_served_app_runs_sync_routes_on_one_thread_per_pooled_connection(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [k for k in os.environ if k.startswith("BAGEL_JOBS_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("BAGEL_JOBS_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("BAGEL_JOBS_STORAGE_DIR", str(tmp_path / "storage"))
    monkeypatch.setenv("BAGEL_JOBS_DB_POOL_SIZE", "3")
    monkeypatch.setenv("BAGEL_JOBS_DB_MAX_OVERFLOW", "2")

    async def serve() -> tuple[Any, float]:  # uvicorn calls the factory inside its event loop
        return api_app(), to_thread.current_default_thread_limiter().total_tokens

    app, threads = asyncio.run(serve())
    assert threads == 3
    app.state.engine.dispose()


@pytest.mark.parametrize("how", ["env", "flag"])
def test_download_urls_follow_the_port_the_api_serves_when_only_the_port_is_set(
        how: str, pg_url: str, tmp_path: Path) -> None:
    """``BAGEL_JOBS_API_PORT`` alone, or ``bagel-jobs api --port`` (two worker processes, which read
    the environment again): no ``PUBLIC_BASE_URL``, and a local-storage result URL points at the
    port served and downloads."""
    port = free_port()
    engine = db.make_engine(pg_url)
    with db.session_factory(engine)() as session:
        tenant = tenants.create_tenant(session, f"port-{uuid.uuid4().hex[:8]}")
        _, key = tenants.create_api_key(session, tenant.id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_JOBS_")}
    env.update(PYTHONPATH=str(ROOT), BAGEL_JOBS_DATABASE_URL=pg_url, BAGEL_JOBS_STORAGE_DIR=str(tmp_path / "storage"),
               BAGEL_JOBS_URL_SIGNING_KEY="test", BAGEL_JOBS_API_WORKERS="1" if how == "env" else "2")
    args = ["api"]
    if how == "env":
        env["BAGEL_JOBS_API_PORT"] = str(port)
    else:
        args += ["--port", str(port)]
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return api.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 90, 0.1, "the API to answer /healthz")
        assert f"download URLs at http://127.0.0.1:{port}:" in log_path.read_text()
        job = api.post("/v1/jobs", json={"task": "generate", "prompt": "a mug", "width": 32, "height": 32}).json()
        # What a GPU worker does: write the result to the same local storage, then complete the job.
        stored = Settings(_env_file=None, database_url=pg_url, storage_dir=tmp_path / "storage",
                          url_signing_key="test")
        make_store(stored).put(output_key(tenant.id, job["id"]), b"\x89PNG result bytes", "image/png")
        with db.session_factory(engine)() as session:
            chunk_id = chunks.form_chunk(session, [job["id"]], utcnow())
            session.commit()
            chunks.claim_chunk(session, chunk_id, "worker-1", lease_s=60)
            assert jobs.complete_job(session, job["id"], "worker-1", output_key=output_key(tenant.id, job["id"]),
                                     model_seconds=0.1)
        url = api.get(f"/v1/jobs/{job['id']}").json()["result"]["url"]
        assert url.startswith(f"http://127.0.0.1:{port}/v1/objects/"), url
        assert httpx.get(url, timeout=30).content == b"\x89PNG result bytes"
    finally:
        api.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and its worker processes
        proc.wait()
        engine.dispose()
