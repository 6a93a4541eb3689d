"""``make bench-api``: how fast the HTTP API accepts submissions on PostgreSQL.

Owns: a throwaway database on the local PostgreSQL server (created, migrated to head, dropped
at the end), ``bagel-jobs api`` run as a real process with production settings (PostgreSQL, a
Redis broker URL, a local storage folder; a submission touches neither broker nor storage) and
its worker processes (``--workers``, or the setting's default), a tenant with an API key and no
limits, the load (aiohttp; a shared httpx client saturates near 340 req/s here, see
DEPENDENCIES.md) and the report. Leaves the API to ``api/`` and the schema to ``migrations/``.
Linux only: the CPU figures come from ``/proc``.

What it runs, after a warm-up that reaches every API worker process and fills its pool:
  * ``--jobs`` single-job POSTs (``/v1/jobs``, a generate job) from ``--concurrency``
    connections: accepted/s and the p50/p95/p99 latency;
  * a ``--batch-items`` batch (``/v1/batches``) ``--batch-runs`` times in a row: best and median.
Around the single-job run it reads the CPU seconds spent by the API processes, by this
database's PostgreSQL backends, by this client and by the whole machine, so that a missed
target can be explained per request. It prints the load average before and after and the
worker count. Exit status: 0 when every request was accepted (targets missed or not), 1 when
one was refused or failed, 2 when the API or the database could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402 — after the repository root is importable

from worker import db, tenants  # noqa: E402

TARGET_JOBS_PER_S = 500.0
TARGET_P95_MS = 100.0
TARGET_BATCH_MS = 100.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc (Linux)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process we may read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), ppid, cmdline


def _api_pids(root_pid: int) -> set[int]:
    """The API process and its descendants (uvicorn's worker processes)."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in _processes():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _worker_count(api_pid: int) -> int:
    """uvicorn's worker processes (spawned children), or 1 when it serves in its own process."""
    pids = _api_pids(api_pid)
    return sum(1 for pid, _, cmdline in _processes() if pid in pids and "spawn_main" in cmdline) or 1


def _backend_pids(database: str) -> set[int]:
    """PostgreSQL backends connected to ``database`` (their title names it)."""
    return {pid for pid, _, cmdline in _processes() if cmdline.startswith("postgres:") and f" {database} " in cmdline}


def _machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def _self_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU seconds spent during a run by the API processes, this database's PostgreSQL backends,
    this client and the whole machine. Backends come and go (a pool closes an overflow
    connection when it is returned), so they are sampled every ``POLL_S`` while the run lasts:
    the last reading of each counts (a backend's final < ``POLL_S`` is missed)."""

    POLL_S = 0.2

    def __init__(self, api_pid: int, database: str) -> None:
        self.api_pid, self.database = api_pid, database
        self.before = self._read()
        self.last = dict(self.before)
        self.client_s, self.machine_s = _self_cpu_s(), _machine_busy_s()

    def _read(self) -> dict[tuple[str, int], float]:
        pids = [("api", p) for p in _api_pids(self.api_pid)] + [("postgres", p) for p in _backend_pids(self.database)]
        return {key: _proc_cpu_s(key[1]) for key in pids}

    async def watch(self) -> None:
        """Sample until cancelled."""
        while True:
            self.last.update({key: cpu for key, cpu in self._read().items() if cpu})
            await asyncio.sleep(self.POLL_S)

    def spent(self) -> tuple[dict[str, float], int]:
        """CPU seconds per part since the meter started, and the backends that started meanwhile."""
        self.last.update({key: cpu for key, cpu in self._read().items() if cpu})
        out = {"api": 0.0, "postgres": 0.0}
        for (part, pid), cpu in self.last.items():
            out[part] += cpu - self.before.get((part, pid), 0.0)
        out["client"] = _self_cpu_s() - self.client_s
        out["machine"] = _machine_busy_s() - self.machine_s
        return out, sum(1 for part, pid in self.last if part == "postgres" and (part, pid) not in self.before)


# ---------------------------------------------------------------------------------------------
# Set-up: database, tenant, API process


@contextlib.contextmanager
def throwaway_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """A new migrated database on the server of ``admin_url``: yields (URL, name); dropped after."""
    name = f"bagel_bench_{uuid.uuid4().hex[:10]}"
    admin = db.make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        db.upgrade(url)
        yield url, name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def create_api_key(url: str) -> str:
    engine = db.make_engine(url)
    try:
        with db.session_factory(engine)() as session:
            tenant = tenants.create_tenant(session, "bench")
            return tenants.create_api_key(session, tenant.id, "bench")[1]
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def api_process(env: dict[str, str], port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``bagel-jobs api`` on ``port``; SIGTERM (uvicorn stops its workers) and a wait at the end."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "api", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_ready(http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with status {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/healthz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the API did not answer /healthz within {READY_TIMEOUT_S:.0f} s")


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Outcome:
    latencies_s: list[float]
    failures: list[str]
    wall_s: float


def job_body(i: int) -> dict[str, object]:
    return {"task": "generate", "prompt": f"a red bicycle leaning on a wall, study {i}", "seed": i}


def batch_body(items: int) -> dict[str, object]:
    return {"task": "generate", "items": [{"prompt": f"a product on a table, scene {i}", "seed": i}
                                          for i in range(items)]}


async def post_many(http: aiohttp.ClientSession, url: str, bodies: list[dict[str, object]],
                    concurrency: int) -> Outcome:
    """POST every body, ``concurrency`` at a time; latency of each accepted (202) one."""
    latencies: list[float] = []
    failures: list[str] = []
    pending = iter(bodies)

    async def client() -> None:
        for body in pending:
            started = time.perf_counter()
            try:
                async with http.post(url, json=body) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as exc:
                failures.append(f"{exc.__class__.__name__}: {exc}")
                continue
            if status == 202:
                latencies.append(time.perf_counter() - started)
            else:
                failures.append(f"HTTP {status}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Outcome(latencies, failures, time.perf_counter() - started)


def percentile_ms(values_s: list[float], pct: float) -> float:
    """Nearest-rank percentile, in ms."""
    ranked = sorted(values_s)
    return 1000 * ranked[max(math.ceil(pct / 100 * len(ranked)) - 1, 0)]


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


async def run(args: argparse.Namespace, base: str, key: str, proc: subprocess.Popen[bytes], database: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        await wait_ready(http, base, proc)
        warm = await post_many(http, f"{base}/v1/jobs", [job_body(args.jobs + i) for i in range(args.warmup)],
                               args.concurrency)
        warm_batch = await post_many(http, f"{base}/v1/batches", [batch_body(args.batch_items)], 1)
        if warm.failures or warm_batch.failures:
            _out(f"warm-up failed: {(warm.failures + warm_batch.failures)[:3]}")
            return 1

        _out(f"API worker processes: {_worker_count(proc.pid)}; cores: {os.cpu_count()}; "
             f"load average before: {_load()}")
        meter = CpuMeter(proc.pid, database)
        watcher = asyncio.create_task(meter.watch())
        singles = await post_many(http, f"{base}/v1/jobs", [job_body(i) for i in range(args.jobs)],
                                  args.concurrency)
        watcher.cancel()
        cpu, new_backends = meter.spent()
        batches = [await post_many(http, f"{base}/v1/batches", [batch_body(args.batch_items)], 1)
                   for _ in range(args.batch_runs)]
        _out(f"load average after: {_load()}")

    accepted = len(singles.latencies_s)
    rate = accepted / singles.wall_s
    _out(f"\n{args.jobs} single-job POSTs at concurrency {args.concurrency}: {accepted} accepted in "
         f"{singles.wall_s:.2f} s")
    if accepted:
        p50, p95, p99 = (percentile_ms(singles.latencies_s, p) for p in (50, 95, 99))
        _out(f"  {rate:.0f} accepted/s (target >= {TARGET_JOBS_PER_S:.0f}: {_verdict(rate >= TARGET_JOBS_PER_S)})")
        _out(f"  p50 {p50:.1f} ms, p95 {p95:.1f} ms (target <= {TARGET_P95_MS:.0f}: "
             f"{_verdict(p95 <= TARGET_P95_MS)}), p99 {p99:.1f} ms")
        per_req = {name: 1000 * seconds / accepted for name, seconds in cpu.items()}
        stack_ms = per_req["api"] + per_req["postgres"] + per_req["client"]
        cores = os.cpu_count() or 1
        _out("  CPU ms per request: API processes {api:.2f} + PostgreSQL backends {postgres:.2f} + this client "
             "{client:.2f} = {stack:.2f}, so at most {cap:.0f} req/s on {cores} cores with the machine to "
             "itself; the whole machine spent {machine:.2f} (other processes included)".format(
                 **per_req, stack=stack_ms, cap=1000 * cores / stack_ms, cores=cores))
        _out(f"  PostgreSQL connections opened during the run: {new_backends}")
    batch_ms = [1000 * b.latencies_s[0] for b in batches if b.latencies_s]
    if batch_ms:
        best, median = min(batch_ms), statistics.median(batch_ms)
        _out(f"{args.batch_items}-item batch, {len(batch_ms)} runs: best {best:.1f} ms, median {median:.1f} ms "
             f"(target <= {TARGET_BATCH_MS:.0f}: {_verdict(median <= TARGET_BATCH_MS)})")
    failures = singles.failures + [f for b in batches for f in b.failures]
    if failures:
        _out(f"{len(failures)} request(s) failed, e.g. {failures[:3]}")
        return 1
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="single-job POSTs (default 1000)")
    parser.add_argument("--concurrency", type=int, default=50, help="connections at once (default 50)")
    parser.add_argument("--batch-items", type=int, default=256, help="items per batch (default 256)")
    parser.add_argument("--batch-runs", type=int, default=7, help="batches posted one after another (default 7)")
    parser.add_argument("--warmup", type=int, default=300, help="single-job POSTs before measuring (default 300)")
    parser.add_argument("--workers", type=int, help="BAGEL_JOBS_API_WORKERS (default: the setting's default)")
    parser.add_argument("--pg-admin-url", default=os.environ.get(
        "BAGEL_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="a database on the server where the throwaway database is created")
    parser.add_argument("--redis-url", default=os.environ.get("BAGEL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="the broker URL the API is given (a submission publishes nothing)")
    return parser.parse_args(argv)


def api_env(args: argparse.Namespace, url: str, storage_dir: Path) -> dict[str, str]:
    """This environment without its ``BAGEL_JOBS_*`` settings (the process and pool ones kept),
    plus the benchmark's database, broker and storage."""
    kept = ("BAGEL_JOBS_API_WORKERS", "BAGEL_JOBS_DB_POOL_SIZE", "BAGEL_JOBS_DB_MAX_OVERFLOW")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_JOBS_") or k in kept}
    env.update(BAGEL_JOBS_DATABASE_URL=url, BAGEL_JOBS_BROKER_URL=args.redis_url, BAGEL_JOBS_STORAGE_BACKEND="local",
               BAGEL_JOBS_STORAGE_DIR=str(storage_dir), BAGEL_JOBS_URL_SIGNING_KEY=uuid.uuid4().hex)
    if args.workers is not None:
        env["BAGEL_JOBS_API_WORKERS"] = str(args.workers)
    return env


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-api-")))
        try:
            url, database = stack.enter_context(throwaway_database(args.pg_admin_url))
            key = create_api_key(url)
        except Exception as exc:  # noqa: BLE001 — any failure here means "no database to measure on"
            _out(f"cannot set up a database via {args.pg_admin_url}: {exc.__class__.__name__}: {exc}")
            return 2
        port = _free_port()
        log_path = tmp / "api.log"
        proc = stack.enter_context(api_process(api_env(args, url, tmp / "storage"), port, log_path))
        try:
            return asyncio.run(run(args, f"http://127.0.0.1:{port}", key, proc, database))
        except RuntimeError as exc:
            _out(f"{exc}; the API's log:\n{log_path.read_text(errors='replace')[-4000:]}")
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
