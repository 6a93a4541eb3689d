"""Prometheus metrics of the API process: request durations and ``GET /metrics``.

Owns: the per-app ``CollectorRegistry`` (never the global default one, so two apps in one
process do not collide), the request-duration histogram and the ASGI middleware that records
it, and the ``/metrics`` route that serves the registry — the HTTP histogram plus the cluster
collector (``worker.cluster_metrics``), which reads the database at scrape time.

``bagel_http_request_duration_seconds{route,method,status}``: seconds from the request's
arrival to the end of its response. ``route`` is the matched route template
(``/v1/jobs/{job_id}``), never the raw path, so ids never become label values; a request no
route matches is ``route="unmatched"``. An exception that escapes the app counts as status 500.

Several API processes (``bagel-jobs api`` with ``api_workers`` > 1) share one
``PROMETHEUS_MULTIPROC_DIR`` (set by the CLI): each process writes its histogram there, and a
scrape — whichever process answers it — sums them (``prometheus_client``'s multiprocess mode).

``/metrics`` takes no API key: it is meant for the cluster network (Prometheus scraping the
pods), and deploy exposes it on the API's own port; keep it off the public ingress.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.cluster_metrics import ClusterCollector

UNMATCHED_ROUTE = "unmatched"


class RequestMetricsMiddleware:
    """Pure ASGI middleware: one histogram observation per HTTP request, labelled with the
    route template the router matched (read from ``scope["route"]`` after the app ran)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            self.histogram.labels(route_template(scope), scope["method"], str(status)).observe(
                time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The path template of the route that handled the request, or ``"unmatched"``."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


def install(app: FastAPI) -> CollectorRegistry:
    """Add the middleware and ``GET /metrics`` to ``app``; call in the app factory after
    ``app.state.settings`` and ``app.state.sessions`` are set. Returns the app's registry
    (also at ``app.state.metrics_registry``)."""
    registry = CollectorRegistry()
    shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # values in files every process writes
    histogram = Histogram("bagel_http_request_duration_seconds", "API request duration by route template",
                          ["route", "method", "status"], registry=None if shared else registry)
    cluster = ClusterCollector(app.state.sessions, worker_dead_after_s=app.state.settings.worker_dead_after_s)
    registry.register(cluster)
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetricsMiddleware, histogram=histogram)

    def scrape_registry() -> CollectorRegistry:
        if not shared:
            return registry
        summed = CollectorRegistry()  # per scrape, as prometheus_client's multiprocess mode asks
        MultiProcessCollector(summed)
        summed.register(cluster)
        return summed

    def metrics() -> Response:
        """Request durations, jobs by status, queue depth, workers and GPU-seconds, summed
        over the API processes, in Prometheus' text format."""
        # A plain ``def``: the cluster collector's queries run in the threadpool, not the loop.
        return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["health"], response_class=Response,
                      summary="Prometheus metrics (no API key: for the cluster network only)",
                      responses=_METRICS_RESPONSES)
    return registry


_METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition format"},
}
