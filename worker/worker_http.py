"""The GPU worker's own small HTTP server: ``/livez``, ``/readyz`` and ``/metrics``.

Owns: ``WorkerStats``, the thread-safe state the worker code reports into (engine loaded,
current chunk, denoise steps, chunk outcomes, draining, heartbeat), its Prometheus collector on
a per-process ``CollectorRegistry``, and ``start_worker_http``, a stdlib ``ThreadingHTTPServer``
in a daemon thread on ``settings.worker_http_port``. Leaves the cluster-wide metrics (read from
the database) to ``worker.cluster_metrics`` and the calls into ``WorkerStats`` to the worker.

Endpoints (anything else is 404):
- ``GET /livez`` — 200 while the process's heartbeat thread is alive, else 503.
- ``GET /readyz`` — 200 once the engine is loaded and the worker is neither draining nor blocked
  (its storage unreachable), else 503; the body is one line saying why.
- ``GET /metrics`` — this process's metrics:

  - ``bagel_worker_engine_loaded`` — 1 once the engine is loaded, else 0.
  - ``bagel_worker_engine_load_seconds`` — how long loading the engine took.
  - ``bagel_worker_gpu_memory_peak_bytes`` — ``torch.cuda.max_memory_allocated()`` when this
    process uses CUDA; 0 on CPU. torch is read from ``sys.modules`` only (never imported here),
    so this module stays importable without torch and a scrape never initialises CUDA.
  - ``bagel_worker_denoise_steps_total`` — counter of denoising steps run.
  - ``bagel_worker_steps_per_second`` — steps per second of the last finished chunk.
  - ``bagel_worker_blocked`` — 1 while the worker cannot reach its storage (taking no chunk).
  - ``bagel_worker_current_chunk_info{chunk_id}`` — 1 while that chunk runs (absent when idle).
  - ``bagel_worker_chunks_total{outcome}`` — counter of finished chunks by outcome (the
    worker's words, e.g. succeeded, failed, released, oom_split).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.settings import Settings

log = logging.getLogger(__name__)


class WorkerStats(Collector):
    """What the GPU worker reports about itself; every method is safe from any thread.

    Owns its registry (``stats.registry``): one per process, so tests and embedded workers
    never share a global one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engine_loaded = False
        self._engine_load_s = 0.0
        self._draining = False
        self._blocked: str | None = None
        self._heartbeat_alive = False
        self._current_chunk: str | None = None
        self._steps = 0
        self._steps_per_s = 0.0
        self._chunks: dict[str, int] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # -- reported by the worker -------------------------------------------------------------

    def engine_loaded(self, seconds: float) -> None:
        with self._lock:
            self._engine_loaded, self._engine_load_s = True, float(seconds)

    def chunk_started(self, chunk_id: str) -> None:
        with self._lock:
            self._current_chunk = chunk_id

    def steps(self, n: int) -> None:
        with self._lock:
            self._steps += int(n)

    def chunk_finished(self, outcome: str, steps_per_s: float) -> None:
        with self._lock:
            self._current_chunk = None
            self._steps_per_s = float(steps_per_s)
            self._chunks[outcome] = self._chunks.get(outcome, 0) + 1

    @property
    def total_steps(self) -> int:
        with self._lock:
            return self._steps

    def set_draining(self) -> None:
        with self._lock:
            self._draining = True

    def set_blocked(self, reason: str | None) -> None:
        """Why the worker takes no chunk although loaded (a dependency is down); None: it can."""
        with self._lock:
            self._blocked = reason

    def heartbeat_alive(self, alive: bool) -> None:
        with self._lock:
            self._heartbeat_alive = bool(alive)

    # -- read by the HTTP server --------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        with self._lock:
            alive = self._heartbeat_alive
        return (True, "ok") if alive else (False, "heartbeat thread is not running")

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            loaded, draining, blocked = self._engine_loaded, self._draining, self._blocked
        if not loaded:
            return False, "engine not loaded yet"
        if draining:
            return False, "draining: finishing the current chunk, taking no new one"
        if blocked is not None:
            return False, f"blocked: {blocked}"
        return True, "ok"

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            loaded, load_s, chunk = self._engine_loaded, self._engine_load_s, self._current_chunk
            blocked = self._blocked is not None
            steps, steps_per_s, chunks = self._steps, self._steps_per_s, dict(self._chunks)
        yield GaugeMetricFamily("bagel_worker_engine_loaded", "1 once the engine is loaded", value=int(loaded))
        yield GaugeMetricFamily("bagel_worker_engine_load_seconds", "Seconds the engine took to load",
                                value=load_s)
        yield GaugeMetricFamily("bagel_worker_gpu_memory_peak_bytes", "Peak CUDA memory allocated by this "
                                "process (0 on CPU)", value=gpu_memory_peak_bytes())
        yield CounterMetricFamily("bagel_worker_denoise_steps", "Denoising steps run", value=steps)
        yield GaugeMetricFamily("bagel_worker_steps_per_second", "Denoising steps per second of the last chunk",
                                value=steps_per_s)
        yield GaugeMetricFamily("bagel_worker_blocked", "1 while the worker cannot reach its storage",
                                value=int(blocked))
        info = GaugeMetricFamily("bagel_worker_current_chunk_info", "1 while the labelled chunk runs",
                                 labels=["chunk_id"])
        if chunk is not None:
            info.add_metric([chunk], 1)
        yield info
        finished = CounterMetricFamily("bagel_worker_chunks", "Finished chunks by outcome", labels=["outcome"])
        for outcome, count in sorted(chunks.items()):
            finished.add_metric([outcome], count)
        yield finished


def gpu_memory_peak_bytes() -> int:
    """``torch.cuda.max_memory_allocated()`` if this process already imported torch and
    initialised CUDA; 0 otherwise (never imports torch, never initialises CUDA)."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return 0
    try:
        if not torch.cuda.is_initialized():
            return 0
        return int(torch.cuda.max_memory_allocated())
    except Exception as exc:  # noqa: BLE001 — a broken device must not break the scrape
        log.debug("gpu memory peak unavailable: %s", exc)
        return 0


class WorkerHTTPServer(ThreadingHTTPServer):
    """The server plus the daemon thread serving it; ``shutdown()`` stops both and frees the port."""

    daemon_threads = True
    stats: WorkerStats
    thread: threading.Thread

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: WorkerHTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection: probes and scrapes are short

    def do_GET(self) -> None:  # noqa: N802 — the stdlib's name
        path = self.path.split("?", 1)[0]
        stats = self.server.stats
        if path == "/livez":
            self._probe(*stats.liveness())
        elif path == "/readyz":
            self._probe(*stats.readiness())
        elif path == "/metrics":
            self._send(200, generate_latest(stats.registry), CONTENT_TYPE_LATEST)
        else:
            self._send(404, f"not found: {path} (try /livez, /readyz, /metrics)\n".encode(),
                       "text/plain; charset=utf-8")

    def _probe(self, ok: bool, reason: str) -> None:
        self._send(200 if ok else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — the stdlib's signature
        log.debug("worker http %s: " + format, self.client_address[0], *args)


def start_worker_http(settings: Settings, stats: WorkerStats, host: str = "0.0.0.0") -> WorkerHTTPServer:  # noqa: S104
    """Serve ``stats`` on ``host:settings.worker_http_port`` from a daemon thread; returns the
    server (``server.shutdown()`` stops it). All interfaces by default: the kubelet's probes and
    Prometheus reach the pod by its address. Raises ``ValueError`` when no port is set."""
    if settings.worker_http_port is None:
        raise ValueError("BAGEL_JOBS_WORKER_HTTP_PORT is not set: the worker's HTTP server has no port")
    server = WorkerHTTPServer((host, settings.worker_http_port), _Handler)
    server.stats = stats
    server.thread = threading.Thread(target=server.serve_forever, name="worker-http", daemon=True)
    server.thread.start()
    log.info("worker http serving /livez /readyz /metrics on %s:%d", host, server.server_address[1])
    return server
