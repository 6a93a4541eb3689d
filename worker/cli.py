"""``bagel-jobs``: the command line of the job service (console script → ``main``).

Owns: argument parsing, logging set-up and settings construction for every entry point:
``config``, ``db upgrade|downgrade``, ``tenant create|limits|rotate-secret``, ``key create|revoke``,
``api``, ``worker --queues gpu|webhooks``, ``reconciler``, ``up``, ``demo`` and ``submit``. Each
command is a few lines calling the module that owns the work, imported when that command runs:
the worker package has no import-time dependency on ``api`` (``api.serve`` runs the API), and
only ``up`` and ``demo`` reach the development package ``worker.dev``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.errors import ServiceError, SettingsError
from worker.logs import configure_logging
from worker.settings import Settings, load_settings

log = logging.getLogger(__name__)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    _out(json.dumps(settings.masked_dump(), indent=2, sort_keys=True, default=str))
    return 0


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from worker import db

    if args.action == "upgrade":
        db.upgrade(settings, args.revision or "head")
    else:
        db.downgrade(settings, args.revision or "base")
    return 0


def _session(settings: Settings) -> Any:
    from worker.db import make_engine, session_factory

    return session_factory(make_engine(settings))()


def cmd_tenant(settings: Settings, args: argparse.Namespace) -> int:
    from worker import tenants

    with _session(settings) as session:
        tenant = tenants.create_tenant(session, args.name)
        _, api_key = tenants.create_api_key(session, tenant.id, name="default")
        out = {"tenant_id": tenant.id, "name": tenant.name, "api_key": api_key,
               "webhook_secret": tenant.webhook_secret}
    _out(json.dumps(out, indent=2))
    log.info("tenant %s created; its API key and webhook secret are shown only this once", out["tenant_id"])
    return 0


def _limit_arg(kind: type) -> Any:
    """argparse type of a limit option: a number of ``kind``, or the word ``none`` (unlimited)."""
    def parse(text: str) -> int | float | None:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun} or 'none'") from None
    return parse


def cmd_tenant_limits(settings: Settings, args: argparse.Namespace) -> int:
    from worker import tenants

    changes = {name: getattr(args, name) for name in ("weight", *tenants.LIMIT_FIELDS) if hasattr(args, name)}
    with _session(settings) as session:
        out = tenants.set_limits(session, args.name, changes) if changes else tenants.get_limits(session, args.name)
    _out(json.dumps(out, indent=2))
    return 0


def cmd_tenant_quality(settings: Settings, args: argparse.Namespace) -> int:
    from worker import tenants

    questions: Any = None
    if args.gate_questions is not None:
        if args.gate_questions == "builtin":
            questions = "builtin"
        else:
            try:
                questions = json.loads(Path(args.gate_questions).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise SettingsError(f"--gate-questions: {args.gate_questions} is not a readable JSON file ({exc})") \
                    from exc
    dedupe = None if args.dedupe is None else args.dedupe == "on"
    with _session(settings) as session:
        out = tenants.quality_settings(session, args.name, dedupe=dedupe, gate_questions=questions)
    _out(json.dumps(out, indent=2))
    return 0


def cmd_key(settings: Settings, args: argparse.Namespace) -> int:
    from worker import tenants

    with _session(settings) as session:
        tenant = tenants.find_tenant(session, args.tenant)
        row, api_key = tenants.create_api_key(session, tenant.id, name=args.name or "")
        out = {"tenant_id": tenant.id, "key_id": row.id, "api_key": api_key}
    _out(json.dumps(out, indent=2))
    return 0


def cmd_key_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from worker import tenants

    with _session(settings) as session:
        key = tenants.find_api_key(session, args.key)
        was_active = tenants.revoke_api_key(session, key.id)
        session.refresh(key)
        assert key.revoked_at is not None
        out = {"key_id": key.id, "tenant_id": key.tenant_id, "prefix": key.prefix,
               "revoked_at": key.revoked_at.isoformat()}
    _out(json.dumps(out, indent=2))
    log.info("api key %s (%s…) %s: the API refuses it from the next request on", out["key_id"], out["prefix"],
             "revoked" if was_active else "was revoked already")
    return 0


def cmd_tenant_rotate_secret(settings: Settings, args: argparse.Namespace) -> int:
    from worker import tenants

    with _session(settings) as session:
        tenant = tenants.find_tenant(session, args.name)
        out = {"tenant_id": tenant.id, "name": tenant.name}
        out["webhook_secret"] = tenants.rotate_webhook_secret(session, tenant.id)
    _out(json.dumps(out, indent=2))
    log.info("tenant %s: webhook secret rotated; the new one is shown only this once and signs every delivery "
             "attempt from now on, retries of earlier events included", out["tenant_id"])
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from api.serve import serve

    return serve(settings, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from celery import signals

    from worker.celery_app import make_celery
    from worker.queues import GPU_QUEUE, QUEUES, worker_queue
    from worker.tasks import WorkerRuntime

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        raise SettingsError(f"--queues: {unknown} not among {list(QUEUES)}")
    name = args.name or "-".join(queues)
    if "@" in name:
        raise SettingsError(f"--name: {name!r} contains '@'; give the prefix only (the node name is "
                            "<prefix>@<host>:<pid>)")
    # app.Worker takes the node name as it is (only the celery command expands %h): the host and
    # the pid, so that two workers on one host are two nodes to `celery inspect`.
    node = f"{name}@{socket.gethostname()}:{os.getpid()}"
    rt = WorkerRuntime(settings)
    registration = http = None
    if GPU_QUEUE in queues:
        from worker.gpu import EngineHolder
        from worker.registry import Registration
        from worker.worker_http import start_worker_http

        if settings.worker_http_port is not None:
            http = start_worker_http(settings, rt.stats)
        registration = Registration(settings, rt.session, rt.worker_id, rt.stats)
        registration.start()
        rt.registration = registration
        rt.engine_holder = EngineHolder(settings)
        started = time.monotonic()
        rt.engine_holder.load()  # before consuming: a bad checkpoint stops the worker here, not per task
        rt.stats.engine_loaded(time.monotonic() - started)
        facts = rt.engine_holder.provenance()
        registration.set_ready(facts["weights_sha256"], facts["quantization"])
    app = make_celery(settings)
    app.bagel_runtime = rt

    def on_shutdown(**_: Any) -> None:
        # Celery's warm shutdown waits for the running chunk. drain=finish: it runs to the end;
        # drain=release: it stops at its next denoising step and releases its jobs. Either way
        # the dispatcher stops counting this worker at once.
        rt.shutting_down.set()
        rt.stats.set_draining()
        if registration is not None:
            from worker.models import WorkerState

            try:
                registration.set_state(WorkerState.draining)
            except Exception:  # noqa: BLE001 - its heartbeat stops soon and it ages out anyway
                log.warning("worker %s: could not mark itself draining", rt.worker_id, exc_info=True)

    signals.worker_shutting_down.connect(on_shutdown, weak=False)
    if GPU_QUEUE in queues:  # its own queue too: the turns of sessions whose context it holds
        queues = [*queues, worker_queue(rt.worker_id)]
    worker = app.Worker(queues=queues, pool="solo", concurrency=1, hostname=node,
                        loglevel=args.log_level.upper(), without_heartbeat=True, without_mingle=True,
                        without_gossip=True, optimization="fair")
    log.info("worker %s (node %s) consuming %s (drain=%s)", rt.worker_id, node, queues, settings.drain)
    try:
        worker.start()
    finally:
        if registration is not None:
            registration.stop()
        if http is not None:
            http.shutdown()
    return int(worker.exitcode or 0)


def cmd_reconciler(settings: Settings, args: argparse.Namespace) -> int:
    """The reconciler loop and, beside it, the dispatcher (which dispatches only while it
    holds the cluster-wide lease, so any number of these processes is safe)."""
    from worker.reconciler import run_forever
    from worker.scheduler import Dispatcher
    from worker.tasks import WorkerRuntime

    rt = WorkerRuntime(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dispatcher = threading.Thread(target=Dispatcher(settings, rt.session, rt.worker_id).run_forever, args=(stop,),
                                  name="dispatcher", daemon=True)
    dispatcher.start()
    run_forever(settings, rt.session, rt.store, stop)
    dispatcher.join(timeout=30)
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.stack import run_stack

    return run_stack(settings, log_level=args.log_level)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.demo import run_demo

    return run_demo(settings, api_url=args.api_url, out_dir=args.out, wait_ready_s=args.wait_ready_s,
                    api_key=args.api_key, webhook_secret=args.webhook_secret, steps=args.steps,
                    receiver_host=args.receiver_host)


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    """``submit tryon …``: the Python SDK's command (``bagel_client.cli``); talks to the API only."""
    from bagel_client import cli as submit_cli

    return submit_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bagel-jobs", description="BAGEL inference as asynchronous jobs.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("config", help="print the settings (secrets masked)").set_defaults(func=cmd_config)

    p = sub.add_parser("db", help="run database migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("revision", nargs="?", help="target revision (upgrade: head, downgrade: base)")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("tenant", help="manage tenants")
    tsub = p.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create", help="create a tenant; prints its id, an API key and the webhook secret once")
    tc.add_argument("name")
    tc.set_defaults(func=cmd_tenant)
    tl = tsub.add_parser("limits", help="show or change a tenant's limits (the word none: unlimited); "
                         "prints them as JSON")
    tl.add_argument("name", help="tenant id or name")
    for flag, kind, what in (("--requests-per-minute", int, "submissions (jobs or batches) per minute"),
                             ("--max-waiting-jobs", int, "queued jobs at a time"),
                             ("--max-running-chunks", int, "chunks on GPUs at a time"),
                             ("--monthly-gpu-seconds", float, "GPU-seconds per UTC calendar month")):
        tl.add_argument(flag, type=_limit_arg(kind), default=argparse.SUPPRESS, metavar="N|none", help=what)
    tl.add_argument("--weight", type=_limit_arg(float), default=argparse.SUPPRESS, metavar="W",
                    help="fair-share weight (default 1.0)")
    tl.set_defaults(func=cmd_tenant_limits)
    tq = tsub.add_parser("quality", help="show or change a tenant's exact-request dedupe and quality-gate "
                         "questions; prints them as JSON")
    tq.add_argument("name", help="tenant id or name")
    tq.add_argument("--dedupe", choices=["on", "off"], help="answer identical seeded jobs from earlier results "
                    "(default on)")
    tq.add_argument("--gate-questions", metavar="FILE|builtin", help="a JSON file {task: [question, …]} for "
                    "generate, edit and/or tryon ({prompt} is the job's prompt), or builtin")
    tq.set_defaults(func=cmd_tenant_quality)
    tr = tsub.add_parser("rotate-secret", help="replace a tenant's webhook signing secret; prints the new one once")
    tr.add_argument("name", help="tenant id or name")
    tr.set_defaults(func=cmd_tenant_rotate_secret)

    p = sub.add_parser("key", help="manage API keys")
    ksub = p.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="create another API key for a tenant")
    kc.add_argument("tenant", help="tenant id or name")
    kc.add_argument("--name", default="")
    kc.set_defaults(func=cmd_key)
    kr = ksub.add_parser("revoke", help="revoke an API key: the API refuses it (401) from the next request on")
    kr.add_argument("key", help="key id, or the key's first 10 characters (bj_ and 7 more)")
    kr.set_defaults(func=cmd_key_revoke)

    p = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--access-log", action="store_true")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="run a Celery worker (one per GPU for the gpu queue)")
    p.add_argument("--queues", default="gpu", help="gpu, webhooks or both, comma-separated")
    p.add_argument("--name", help="Celery node name prefix: the node is <prefix>@<host>:<pid> (default "
                   "prefix: the queue names)")
    p.set_defaults(func=cmd_worker)

    sub.add_parser("reconciler", help="run the periodic reconciler").set_defaults(func=cmd_reconciler)
    sub.add_parser("up", help="run API + GPU worker + webhook worker + reconciler (embedded mode)"
                   ).set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="submit a try-on batch to a running stack and collect the results")
    p.add_argument("--api-url", help="default: BAGEL_JOBS_PUBLIC_BASE_URL")
    p.add_argument("--out", default="var/demo", help="output folder (default var/demo)")
    p.add_argument("--wait-ready-s", type=float, default=60.0)
    p.add_argument("--api-key", help="default: create a demo tenant in the configured database")
    p.add_argument("--webhook-secret", help="the tenant's secret (required with --api-key)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per image")
    p.add_argument("--receiver-host", default="127.0.0.1", help="address the webhook receiver binds")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="submit work to a running API with the Python SDK (BAGEL_API_URL, "
                       "BAGEL_API_KEY): tryon --product bag.png --prompts prompts.txt --out results/ --wait")
    # The SDK's package brings only httpx and standardwebhooks, both server dependencies as well.
    from bagel_client.cli import add_arguments as add_submit_arguments

    add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)  # text until the settings say otherwise
    try:
        settings = load_settings()
        configure_logging(args.log_level, settings.log_format)
        return int(args.func(settings, args) or 0)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    except ServiceError as exc:
        log.error("%s: %s", exc.code, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
