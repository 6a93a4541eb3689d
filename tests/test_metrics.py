"""Prometheus metrics on real PostgreSQL and SQLite: the API's ``/metrics`` (request durations
by route template, the cluster collector's backlog, GPU-second pricing, worker/chunk/failure/
webhook gauges, the latency histogram), a scrape with the database down, and the GPU worker's
own HTTP server (probes and metrics) on a real port."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from tests.fixtures.worker import free_port
from worker import jobs, params, tenants
from worker.cluster_metrics import DEFAULT_JOB_GPU_SECONDS, estimated_gpu_seconds
from worker.db import session_factory
from worker.jobs import JobSpec
from worker.models import (
    Chunk,
    DeliveryStatus,
    Job,
    JobCost,
    JobStatus,
    Priority,
    WebhookDelivery,
    Worker,
    WorkerState,
    utcnow,
)
from worker.worker_http import WorkerStats, start_worker_http


@dataclass
class Metrics:
    """One scrape: every sample, looked up by sample name and a subset of its labels."""

    families: dict[str, Any]

    def samples(self, name: str, **labels: str) -> list[Any]:
        return [s for f in self.families.values() for s in f.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = self.samples(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples: {found}"
        return found[0].value


@dataclass
class App:
    client: TestClient
    sessions: sessionmaker[Session]
    tenant_id: str
    key: str

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def scrape(self) -> Metrics:
        response = self.client.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=")
        return Metrics({f.name: f for f in text_string_to_metric_families(response.text)})

    def submit(self, n: int, priority: Priority = Priority.batch, steps: int = 5) -> list[str]:
        specs = [JobSpec(task="generate", prompt=f"a mug {i}", width=64, height=64,
                         params=params.resolve("generate", {"num_timesteps": steps, "seed": i}, False))
                 for i in range(n)]
        with self.sessions() as s:
            _, rows = jobs.submit(s, self.tenant_id, specs, batch=n > 1, webhook_url=None, metadata={},
                                  priority=priority)
            return [r.id for r in rows]

    def update_jobs(self, job_ids: list[str], **values: Any) -> None:
        with self.sessions() as s:
            s.execute(update(Job).where(Job.id.in_(job_ids)).values(**values))
            s.commit()

    def add(self, *rows: Any) -> None:
        with self.sessions() as s:
            s.add_all(rows)
            s.commit()


@pytest.fixture
def app(db_url: str, db_kind: str, make_settings: Any, db_engines: Any) -> Iterator[App]:
    """The API on a clean ``db_kind`` database (local storage, embedded broker), one tenant."""
    settings = make_settings(db=db_kind)
    sessions = session_factory(db_engines.get(db_url))
    with sessions() as s:
        tenant = tenants.create_tenant(s, "acme")
        _, key = tenants.create_api_key(s, tenant.id, "tests")
    with TestClient(create_app(settings)) as client:
        yield App(client, sessions, tenant.id, key)


# ---------------------------------------------------------------------------------------------
# API request durations


def test_request_histogram_is_labelled_with_route_templates(app):
    job_id = str(uuid.uuid4())
    assert app.client.get("/healthz").status_code == 200
    assert app.client.get(f"/v1/jobs/{job_id}", headers=app.auth()).status_code == 404
    assert app.client.get("/no/such/path").status_code == 404
    first = app.scrape()
    count = "bagel_http_request_duration_seconds_count"
    assert first.value(count, route="/healthz", method="GET", status="200") == 1
    assert first.value(count, route="/v1/jobs/{job_id}", method="GET", status="404") == 1
    assert first.value(count, route="unmatched", method="GET", status="404") == 1
    assert first.value("bagel_http_request_duration_seconds_bucket", route="/healthz", le="+Inf") == 1
    routes = {s.labels["route"] for s in first.samples(count)}
    assert not any(job_id in r or "/no/such" in r for r in routes), routes
    assert first.samples(count, route="/metrics") == []  # a scrape is recorded once it has answered
    assert app.scrape().value(count, route="/metrics", method="GET", status="200") == 1


def test_two_apps_in_one_process_keep_separate_registries(app, make_settings, db_kind):
    with TestClient(create_app(make_settings(db=db_kind))) as other:
        assert other.get("/healthz").status_code == 200
        assert app.scrape().samples("bagel_http_request_duration_seconds_count", route="/healthz") == []


# ---------------------------------------------------------------------------------------------
# Cluster collector


def test_backlog_rises_with_submissions_and_falls_when_jobs_finish(app):
    tenant = app.tenant_id
    empty = app.scrape()
    assert empty.value("bagel_metrics_database_up") == 1
    assert empty.value("bagel_backlog_jobs", tenant=tenant, priority="batch", state="waiting") == 0
    assert empty.value("bagel_oldest_waiting_seconds") == 0

    batch_ids = app.submit(3)
    [interactive] = app.submit(1, priority=Priority.interactive)
    m = app.scrape()
    assert m.value("bagel_backlog_jobs", tenant=tenant, priority="batch", state="waiting") == 3
    assert m.value("bagel_backlog_jobs", tenant=tenant, priority="interactive", state="waiting") == 1
    assert m.value("bagel_backlog_gpu_seconds", tenant=tenant, priority="batch", state="waiting") == pytest.approx(
        3 * DEFAULT_JOB_GPU_SECONDS)

    # One job a quarter through its 4 Euler steps: running, priced at the remaining 3/4.
    app.update_jobs(batch_ids[:1], status=JobStatus.running, attempts=1, progress_step=1, progress_total=4)
    app.update_jobs(batch_ids[1:], queued_at=utcnow() - timedelta(seconds=300))
    m = app.scrape()
    assert m.value("bagel_backlog_jobs", tenant=tenant, priority="batch", state="running") == 1
    assert m.value("bagel_backlog_jobs", tenant=tenant, priority="batch", state="waiting") == 2
    assert m.value("bagel_backlog_gpu_seconds", tenant=tenant, priority="batch", state="running") == pytest.approx(
        0.75 * DEFAULT_JOB_GPU_SECONDS)
    assert 300 <= m.value("bagel_oldest_waiting_seconds") < 360

    now = utcnow()
    app.update_jobs([*batch_ids, interactive], status=JobStatus.succeeded, queued_at=now - timedelta(seconds=30),
                    finished_at=now)
    m = app.scrape()
    for priority in ("batch", "interactive"):
        for state in ("waiting", "running"):
            assert m.value("bagel_backlog_jobs", tenant=tenant, priority=priority, state=state) == 0
            assert m.value("bagel_backlog_gpu_seconds", tenant=tenant, priority=priority, state=state) == 0
    assert m.value("bagel_oldest_waiting_seconds") == 0
    assert m.value("bagel_jobs_finished", task="generate", status="succeeded") == 4
    assert m.value("bagel_job_latency_seconds_count", task="generate") == 4
    assert m.value("bagel_job_latency_seconds_bucket", task="generate", le="15.0") == 0
    assert m.value("bagel_job_latency_seconds_bucket", task="generate", le="60.0") == 4
    assert m.value("bagel_job_latency_seconds_sum", task="generate") == pytest.approx(120, abs=1)
    assert m.value("bagel_job_latency_seconds_count", task="edit") == 0


def test_gpu_seconds_use_the_measured_job_cost(app):
    ids = app.submit(2)
    with app.sessions() as s:
        cost_key = s.get(Job, ids[0]).cost_key
    key = (app.tenant_id, "batch", "waiting")
    assert app.scrape().value("bagel_backlog_gpu_seconds", tenant=key[0], priority=key[1],
                              state=key[2]) == pytest.approx(2 * DEFAULT_JOB_GPU_SECONDS)
    app.add(JobCost(cost_key=cost_key, avg_gpu_seconds=3.5, samples=4))
    assert app.scrape().value("bagel_backlog_gpu_seconds", tenant=key[0], priority=key[1],
                              state=key[2]) == pytest.approx(7.0)
    app.update_jobs(ids[:1], status=JobStatus.running, progress_step=2, progress_total=4)
    with app.sessions() as s:
        priced = estimated_gpu_seconds(s)
    assert priced == {(app.tenant_id, "batch", "waiting"): (1, pytest.approx(3.5)),
                      (app.tenant_id, "batch", "running"): (1, pytest.approx(1.75))}


def test_cluster_gauges_count_workers_chunks_failures_and_webhooks(app):
    now = utcnow()
    app.add(Worker(id="gpu-ready", state=WorkerState.ready, last_seen=now),
            Worker(id="gpu-silent", state=WorkerState.ready, last_seen=now - timedelta(seconds=120)),
            Worker(id="gpu-loading", state=WorkerState.loading, last_seen=now),
            Chunk(claimed_at=now, claimed_by="gpu-ready"), Chunk(claimed_at=now, claimed_by="gpu-loading"),
            Chunk(claimed_at=now - timedelta(seconds=60), finished_at=now), Chunk())
    oom, expired_out, expired_again, done = app.submit(4)
    app.update_jobs([oom], status=JobStatus.failed, attempts=3, error_code="gpu_out_of_memory", finished_at=now)
    app.update_jobs([expired_out], status=JobStatus.failed, attempts=2, error_code="lease_expired", finished_at=now)
    app.update_jobs([expired_again], attempts=2, error_code="lease_expired")
    app.update_jobs([done], status=JobStatus.succeeded, attempts=1, finished_at=now)

    def delivery(status: DeliveryStatus, age_s: float, due_in_s: float) -> WebhookDelivery:
        return WebhookDelivery(id=f"msg_{uuid.uuid4().hex}", tenant_id=app.tenant_id, event="job.succeeded",
                               url="http://127.0.0.1:9/hook", payload={}, status=status,
                               created_at=now - timedelta(seconds=age_s),
                               next_attempt_at=now + timedelta(seconds=due_in_s))

    app.add(delivery(DeliveryStatus.pending, 90, -10), delivery(DeliveryStatus.pending, 500, 600),
            delivery(DeliveryStatus.failed, 900, -800), delivery(DeliveryStatus.delivered, 50, -50))

    m = app.scrape()
    assert m.value("bagel_gpu_workers", state="ready") == 1
    assert m.value("bagel_gpu_workers", state="loading") == 1
    assert m.value("bagel_gpu_workers", state="draining") == 0
    assert m.value("bagel_running_chunks") == 2
    assert m.value("bagel_job_retries") == 2 + 1 + 1
    assert m.value("bagel_lease_expiries") == 2
    assert m.value("bagel_jobs_failed", code="gpu_out_of_memory") == 1
    assert m.value("bagel_jobs_failed", code="lease_expired") == 1
    assert m.value("bagel_jobs_finished", task="generate", status="failed") == 2
    assert m.value("bagel_jobs_finished", task="generate", status="succeeded") == 1
    assert m.value("bagel_backlog_jobs", tenant=app.tenant_id, priority="batch", state="waiting") == 1
    assert m.value("bagel_webhook_pending") == 2
    assert 90 <= m.value("bagel_webhook_lag_seconds") < 150  # the due one, not the older one backing off
    assert m.value("bagel_webhook_failed") == 1


def test_scrape_with_the_database_down_answers_200_and_says_so(make_settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens once the socket is closed
    settings = make_settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/nowhere")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert Metrics(families).value("bagel_metrics_database_up") == 0
    assert "bagel_backlog_jobs" not in families and "bagel_gpu_workers" not in families
    assert Metrics(families).value("bagel_http_request_duration_seconds_count", route="/healthz") == 1


# ---------------------------------------------------------------------------------------------
# The GPU worker's HTTP server


def test_worker_http_probes_follow_the_worker_and_metrics_parse(make_settings):
    port = free_port()
    stats = WorkerStats()
    server = start_worker_http(make_settings(worker_http_port=port), stats, host="127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, trust_env=False, timeout=5) as http:
            def worker_metrics() -> Metrics:
                response = http.get("/metrics")
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain; version=")
                return Metrics({f.name: f for f in text_string_to_metric_families(response.text)})

            assert http.get("/livez").status_code == 503
            stats.heartbeat_alive(True)
            assert http.get("/livez").status_code == 200
            loading = http.get("/readyz")
            assert (loading.status_code, loading.text) == (503, "engine not loaded yet\n")
            m = worker_metrics()
            assert m.value("bagel_worker_engine_loaded") == 0
            assert m.samples("bagel_worker_current_chunk_info") == []

            stats.engine_loaded(2.5)
            assert http.get("/readyz").status_code == 200
            stats.chunk_started("chunk-1")
            stats.steps(3)
            stats.steps(4)
            m = worker_metrics()
            assert m.value("bagel_worker_engine_loaded") == 1
            assert m.value("bagel_worker_engine_load_seconds") == 2.5
            assert m.value("bagel_worker_gpu_memory_peak_bytes") == 0  # CPU: torch never touched CUDA here
            assert m.value("bagel_worker_current_chunk_info", chunk_id="chunk-1") == 1
            assert m.value("bagel_worker_denoise_steps_total") == 7

            stats.chunk_finished("succeeded", steps_per_s=12.5)
            m = worker_metrics()
            assert m.samples("bagel_worker_current_chunk_info") == []
            assert m.value("bagel_worker_steps_per_second") == 12.5
            assert m.value("bagel_worker_chunks_total", outcome="succeeded") == 1

            stats.set_draining()
            draining = http.get("/readyz")
            assert draining.status_code == 503 and draining.text.startswith("draining")
            stats.heartbeat_alive(False)
            assert http.get("/livez").status_code == 503
            assert http.get("/nope").status_code == 404
    finally:
        server.shutdown()
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/livez", trust_env=False, timeout=2)
