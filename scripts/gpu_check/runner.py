"""Running the checks under a deadline and writing the report: the ``gpu-check`` entry point.

Owns: the command line (``--device``, ``--size``, ``--deadline-s``, ``--only``, ``--out``; a bad
value exits 2 naming the option), the deadline (a check whose planned cost does not fit in
the time left is not started: ``skipped: time budget``), one try/except per check (an
exception, an out-of-memory error included, fails that check and the next one runs; memory
is freed between checks), SIGTERM/SIGINT (the running check is recorded as interrupted and
the report still written), the report — ``<out>/<UTC timestamp>.json`` and the same table as
``.txt``, rewritten after every check so a run killed outright still leaves what it did — and
the exit status: 0 when nothing failed, 1 when a check failed or the run was interrupted.
Leaves the checks to ``suite.py``.

The deadline counts from the start of the process (the entry script passes its start time),
so importing torch and initialising CUDA are inside it. The default, 540 s, leaves a minute of
a 10-minute limit for a check that runs past its plan and for writing the report.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import torch

from gpu_check.plan import SIZES
from gpu_check.record import TIME_BUDGET, Record, Skip
from gpu_check.session import Session, free_memory
from gpu_check.suite import STEP_NAMES, build_steps

log = logging.getLogger("gpu_check")

DEFAULT_DEADLINE_S = 540.0
DEFAULT_OUT = Path("var/gpu-check")
SUMMARY_WIDTH = 150


class Interrupted(BaseException):
    """Raised by the SIGTERM/SIGINT handler; a BaseException so no check's handler keeps it."""


def _device(value: str) -> torch.device:
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device ({exc})") from exc
    if device.type not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"{value!r}: the device type must be cuda or cpu")
    return device


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from exc
    if not 0 <= seconds <= 86_400:
        raise argparse.ArgumentTypeError(f"{value} is outside the allowed range 0..86400 s")
    return seconds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-check", description="Check and time the engine on a GPU; "
                                "writes <out>/<UTC timestamp>.json and .txt.")
    p.add_argument("--device", type=_device, default=torch.device("cuda"), help="cuda (default) or cpu")
    p.add_argument("--size", choices=SIZES, default="full",
                   help="full: BAGEL-7B-MoT's real shapes (default); small/tiny: a dry run")
    p.add_argument("--deadline-s", type=_seconds, default=DEFAULT_DEADLINE_S,
                   help="seconds from the start; a check that cannot finish before it is skipped (default 540)")
    p.add_argument("--only", nargs="+", choices=STEP_NAMES, metavar="NAME",
                   help=f"run only these checks, of: {', '.join(STEP_NAMES)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (default var/gpu-check)")
    return p


def emit(text: str) -> None:
    """The script's report on stdout (its only use of stdout)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Report:
    """The report of one run, rewritten after every check."""

    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args = args
        self.started = started
        self.started_utc = datetime.now(UTC)
        stamp = self.started_utc.strftime("%Y%m%dT%H%M%SZ")
        args.out.mkdir(parents=True, exist_ok=True)
        self.json_path = args.out / f"{stamp}.json"
        self.txt_path = args.out / f"{stamp}.txt"
        self.records: list[Record] = []
        self.interrupted: str | None = None
        self.device_name = str(args.device)
        if args.device.type == "cuda" and torch.cuda.is_available():
            try:
                self.device_name = f"{args.device} ({torch.cuda.get_device_name(args.device)})"
            except RuntimeError as exc:  # a broken device: the versions check reports it
                self.device_name = f"{args.device} (name unavailable: {exc})"

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.records) for s in ("pass", "fail", "skipped")}

    def as_dict(self) -> dict:
        return {"tool": "scripts/gpu-check", "started_utc": self.started_utc.isoformat(timespec="seconds"),
                "written_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "elapsed_s": round(time.monotonic() - self.started, 1), "argv": sys.argv[1:],
                "device": self.device_name, "size": self.args.size, "deadline_s": self.args.deadline_s,
                "interrupted": self.interrupted, "counts": self.counts(),
                "checks": [r.as_dict() for r in self.records]}

    def table(self) -> str:
        data = self.as_dict()
        c = data["counts"]
        head = (f"gpu-check --size {self.args.size} on {self.device_name}: {c['pass']} passed, {c['fail']} failed, "
                f"{c['skipped']} skipped in {data['elapsed_s']:.0f} s (deadline {self.args.deadline_s:.0f} s); "
                f"started {data['started_utc']}")
        rows = [["check", "status", "s", "plan s", "result"]]
        for r in self.records:
            text = r.summary if r.status != "fail" else f"{r.reason} {('| ' + r.summary) if r.summary else ''}"
            text = " ".join(text.split())
            rows.append([r.name, r.label, f"{r.seconds:.1f}", f"{r.planned_s:.1f}",
                         text if len(text) <= SUMMARY_WIDTH else text[:SUMMARY_WIDTH - 3] + "..."])
        widths = [max(len(row[k]) for row in rows) for k in range(4)]
        lines = [head, ""]
        for n, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                     row[3].rjust(widths[3]), row[4]]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in [*widths, 6]))
        if self.interrupted:
            lines += ["", f"interrupted: {self.interrupted}"]
        lines += ["", f"report: {self.json_path}"]
        return "\n".join(lines)

    def write(self) -> None:
        for path, text in ((self.json_path, json.dumps(self.as_dict(), indent=2, default=str) + "\n"),
                           (self.txt_path, self.table() + "\n")):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            os.replace(partial, path)


def _plan(step, rec: Record) -> bool:
    """Set ``rec.planned_s``; False (the check failed) when planning itself raised."""
    try:
        rec.planned_s = step.planned_s()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        rec.fail(f"planning its cost raised {type(exc).__name__}: {first}", traceback.format_exc(limit=-12))
        return False
    return True


def _run_step(step, rec: Record, session: Session) -> None:
    started = time.monotonic()
    try:
        step.run(rec)
    except Skip as exc:
        rec.skip(str(exc))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        rec.fail(f"{type(exc).__name__}: {first}", "".join(traceback.format_exc(limit=-12)))
        log.error("check %s raised %s", rec.name, rec.reason)
    finally:
        rec.seconds = time.monotonic() - started
        try:
            if session.is_cuda:
                rec.figures.setdefault("cuda_peak_allocated_bytes", torch.cuda.max_memory_allocated(session.device))
            free_memory(session.device)
        except Exception as exc:  # a device that failed may refuse this too: record, go on
            rec.figures["free_memory_error"] = f"{type(exc).__name__}: {exc}"
    rec.settle()


def run(args: argparse.Namespace, started: float) -> Report:
    report = Report(args, started)
    session = Session.create(args.device, args.size)
    unavailable = args.device.type == "cuda" and not torch.cuda.is_available()
    steps = [s for s in build_steps(session) if not args.only or s.name in args.only]
    pending = list(steps)
    current: Record | None = None
    step_started = time.monotonic()
    try:
        while pending:
            step = pending.pop(0)
            current = rec = Record(step.name)
            step_started = time.monotonic()
            report.records.append(rec)
            if unavailable and step.name != "versions":
                rec.skip(f"{args.device} not available")
            elif not _plan(step, rec):
                log.error("check %s: planning raised %s", rec.name, rec.reason)
            else:
                left = args.deadline_s - (time.monotonic() - started)
                if rec.planned_s > left:
                    rec.skip(TIME_BUDGET)
                    rec.summary = f"planned {rec.planned_s:.1f} s, {max(left, 0):.1f} s left before the deadline"
                else:
                    log.info("check %s: starting (planned %.1f s, %.0f s left)", step.name, rec.planned_s, left)
                    _run_step(step, rec, session)
            log.info("check %s: %s in %.1f s %s", rec.name, rec.label, rec.seconds, rec.summary)
            current = None
            report.write()
    except Interrupted as exc:
        report.interrupted = str(exc)
        if current is not None:
            current.seconds = time.monotonic() - step_started
            current.fail(f"interrupted ({exc}) while running", "".join(traceback.format_exc(limit=-8)))
        for step in pending:
            report.records.append(Record(step.name, status="skipped", reason="interrupted"))
    report.write()
    return report


def main(argv: list[str], started: float) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.enable()
    if args.device.type == "cpu" and args.size == "tiny":
        # tiny ops gain nothing from threads, and OpenMP threads that wait on a busy machine
        # make a 2-core dry run many times slower
        torch.set_num_threads(1)

    def interrupt(signum, frame) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    report = run(args, started)
    emit(report.table())
    return 1 if report.counts()["fail"] or report.interrupted else 0
