"""A small local HTTP webhook receiver: what ``bagel-jobs demo`` (and the tests) listen with.

Owns: a threaded HTTP server on a loopback port that records every POST (path, headers, body,
arrival time), answers with a programmable status (e.g. 500 for the next n requests, to
exercise retries), and lets a caller wait for an event with a deadline. Leaves signature
checks to the caller (the demo uses the independent ``standardwebhooks`` verifier).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass
class Received:
    """One request as it arrived."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event(self) -> str | None:
        try:
            return self.json().get("type")
        except (ValueError, AttributeError):
            return None


class WebhookReceiver:
    """``with WebhookReceiver() as rx: ... rx.url ... rx.wait_for("batch.completed")``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.received: list[Received] = []
        self._cond = threading.Condition()
        self._fail_next = 0
        self._fail_status = 500
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = min(int(self.headers.get("content-length") or 0), MAX_BODY_BYTES)
                body = self.rfile.read(length)
                status = receiver._next_status()
                # Record before answering: once the sender has its status the delivery counts as
                # done, so a check right after it must already see the request.
                receiver._record(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body, status, time.time()))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/hooks"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` (the request is still recorded)."""
        with self._cond:
            self._fail_next, self._fail_status = n, status

    def _next_status(self) -> int:
        with self._cond:
            if self._fail_next > 0:
                self._fail_next -= 1
                return self._fail_status
            return 200

    def _record(self, item: Received) -> None:
        with self._cond:
            self.received.append(item)
            self._cond.notify_all()

    def accepted(self, event: str | None = None) -> list[Received]:
        """Requests answered 2xx, optionally only those of one event type."""
        with self._cond:
            return [r for r in self.received if 200 <= r.status < 300 and (event is None or r.event == event)]

    def wait_for(self, event: str, *, count: int = 1, timeout_s: float = 30.0) -> list[Received]:
        """Block until ``count`` accepted requests of ``event`` arrived; raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = [r for r in self.received if 200 <= r.status < 300 and r.event == event]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{event}: {len(got)} of {count} webhook(s) within {timeout_s} s")
                self._cond.wait(left)
