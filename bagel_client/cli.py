"""``bagel-jobs submit``: submit work to a running API from the command line, with the SDK.

    bagel-jobs submit tryon --product bag.png --prompts prompts.txt --out results/ --wait

Owns: the ``submit`` command's arguments (``add_arguments``, which ``worker.cli`` registers)
and what it does (``run``): read the prompts (one per line; blank lines and ``#`` comments
skipped), upload the product once and submit one try-on batch (``Client.tryon``), print the
batch id and job ids as one JSON line on stdout and, with ``--wait``, draw a progress bar over
the batch on stderr, then write each result to ``--out`` named by its position (``000.png``,
``001.png``, …) with ``manifest.json`` (every job's prompt, status, file or error, its dedupe
state and, with ``--quality-threshold`` or ``--max-regenerations``, the quality gate's verdict,
score and attempts). Exit 0 when every job succeeded, 1 when any did not or the API refused, 2
for bad arguments.

It imports only the SDK (httpx, standardwebhooks), so it also runs where only the client is
installed: ``python -m bagel_client.cli tryon …`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import httpx

from bagel_client.client import Client
from bagel_client.errors import ApiError, WaitTimeout
from bagel_client.models import Batch, GenerationParams, Job, QualityGateParams
from bagel_client.progress_bar import ProgressBar

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``submit`` command's arguments: one sub-command per kind of submission."""
    kinds = parser.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("tryon", help="one product picture in many scenes: a try-on batch, one job per prompt")
    p.add_argument("--product", required=True, type=Path, help="the product picture (PNG, JPEG or WebP)")
    p.add_argument("--prompts", required=True, help="text file with one scene prompt per line (- reads stdin)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the images and manifest.json "
                   "(with --wait; default results)")
    p.add_argument("--wait", action="store_true", help="wait for the batch, showing progress, then download")
    p.add_argument("--api", help="the API's base URL (default: $BAGEL_API_URL)")
    p.add_argument("--key", help="API key (default: $BAGEL_API_KEY, which keeps it out of the process list)")
    p.add_argument("--steps", type=int, help="denoising steps (params.num_timesteps)")
    p.add_argument("--seed", type=int, help="item i gets seed + i (default: random seeds)")
    p.add_argument("--think", action="store_true", help="think before drawing (every item)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="another BAGEL hyper-parameter, the value as JSON (e.g. cfg_img_scale=2.0); repeatable")
    p.add_argument("--adapter", metavar="ID", help="a LoRA adapter of yours to run every item with "
                   "(upload it with the SDK's upload_adapter or POST /v1/adapters)")
    p.add_argument("--adapter-scale", type=float, metavar="X", help="how strongly the adapter applies (default 1.0)")
    p.add_argument("--quality-threshold", type=float, metavar="T", help="turn the quality gate on: BAGEL scores "
                   "each picture (0..1) and makes it again with the next seed below T (default 0.5 when only "
                   "--max-regenerations is given)")
    p.add_argument("--max-regenerations", type=int, metavar="N", help="turn the quality gate on: at most N more "
                   "attempts per item, 0..4 (default 2 when only --quality-threshold is given)")
    p.add_argument("--webhook-url", help="where batch.completed is POSTed")
    p.add_argument("--priority", choices=["interactive", "batch"])
    p.add_argument("--deadline-s", type=int, help="jobs not finished this many seconds after submission expire")
    p.add_argument("--timeout-s", type=float, help="stop waiting after this many seconds (exit 1)")
    p.add_argument("--idempotency-key", help="the same key resubmits nothing: the first batch is returned")


def read_prompts(source: str) -> list[str]:
    """Prompts of a file (or stdin for ``-``): one per line, blank lines and ``#`` lines skipped."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse_params(args: argparse.Namespace) -> GenerationParams:
    params: dict[str, Any] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--param: {item!r} is not NAME=VALUE")
        try:
            params[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[name.strip()] = value  # a bare word: a string (cfg_renorm_type=channel)
    if args.steps is not None:
        params["num_timesteps"] = args.steps
    return cast(GenerationParams, params)  # the API checks the names and ranges


def quality_gate(args: argparse.Namespace) -> QualityGateParams | None:
    """The gate ``--quality-threshold`` and ``--max-regenerations`` ask for: either turns it on,
    and the one left out is not sent, so the service's default applies; None when neither is
    given."""
    gate = QualityGateParams()
    if args.quality_threshold is not None:
        gate["threshold"] = args.quality_threshold
    if args.max_regenerations is not None:
        gate["max_regenerations"] = args.max_regenerations
    return gate or None


def result_name(position: int, count: int) -> str:
    """``000.png`` …: zero-padded to three digits, more for batches of over 1,000 items."""
    return f"{position:0{max(3, len(str(count - 1)))}d}.png"


def write_results(client: Client, batch: Batch, jobs: Sequence[Job], out: Path) -> dict[str, Any]:
    """Download every succeeded job's image into ``out`` and write ``manifest.json``; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for job in jobs:
        entry: dict[str, Any] = {"position": job.position, "job_id": job.id, "prompt": job.prompt,
                                 "status": job.status, "seed": job.params.get("seed"), "file": None,
                                 "error": None if job.error is None else {"code": job.error.code,
                                                                         "message": job.error.message},
                                 "dedupe": job.dedupe, "dedupe_of": job.dedupe_of, "quality": None}
        if job.quality is not None:
            entry["quality"] = {"gate": job.quality.gate, "score": job.quality.score,
                                "threshold": job.quality.threshold, "attempts": len(job.quality.attempts),
                                "result_seed": job.quality.attempts[job.quality.chosen].seed}
        if job.status == "succeeded":
            name = result_name(job.position, len(jobs))
            client.download(job, out / name)
            entry["file"] = name
            entry["think_text"] = job.result.think_text if job.result else None
        entries.append(entry)
    manifest = {"batch_id": batch.id, "api_url": client.base_url,
                "product_file_id": jobs[0].input_file_ids[0] if jobs and jobs[0].input_file_ids else None,
                "counts": batch.counts, "completed_at": None if batch.completed_at is None
                else batch.completed_at.isoformat(), "jobs": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def run_tryon(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args.prompts)
        params = parse_params(args)
        if not args.product.is_file():
            raise ValueError(f"--product: {args.product} is not a file")
        client = Client(args.api, args.key)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    if not prompts:
        log.error("--prompts: %s has no prompts (one per line)", args.prompts)
        return EXIT_USAGE
    with client:
        try:
            batch = client.tryon(args.product, prompts, seed=args.seed, think=args.think or None,
                                 params=params or None, adapter=args.adapter, adapter_scale=args.adapter_scale,
                                 quality_gate=quality_gate(args), webhook_url=args.webhook_url,
                                 priority=args.priority, deadline_s=args.deadline_s,
                                 idempotency_key=args.idempotency_key)
            sys.stdout.write(json.dumps({"batch_id": batch.id, "job_ids": batch.job_ids}) + "\n")
            sys.stdout.flush()
            if not args.wait:
                return EXIT_OK
            bar = ProgressBar(f"batch {batch.id[:8]}")
            try:
                batch = client.wait(batch, progress=bar, timeout_s=args.timeout_s)
            finally:
                bar.close()
            manifest = write_results(client, batch, client.batch_jobs(batch), args.out)
        except httpx.HTTPError as exc:
            log.error("%s: %s: %s", client.base_url, type(exc).__name__, exc)
            return EXIT_FAILED
        except (ApiError, WaitTimeout, OSError) as exc:
            log.error("%s", exc)
            return EXIT_FAILED
    succeeded = sum(1 for j in manifest["jobs"] if j["status"] == "succeeded")
    log.info("batch %s: %d of %d succeeded%s; results and %s in %s", batch.id, succeeded, len(manifest["jobs"]),
             outcome_note(manifest["jobs"]), MANIFEST, args.out)
    return EXIT_OK if succeeded == len(manifest["jobs"]) else EXIT_FAILED


def outcome_note(entries: Sequence[dict[str, Any]]) -> str:
    """What the summary line adds about the quality gate and dedupe: `` (quality gate: 2 passed,
    1 best effort; 1 answered from an identical job)``, or nothing when neither applied."""
    verdicts = [e["quality"]["gate"] for e in entries if e["quality"] is not None]
    hits = sum(1 for e in entries if e["dedupe"] == "hit")
    parts = []
    if verdicts:
        parts.append(f"quality gate: {verdicts.count('passed')} passed, {verdicts.count('best_effort')} best effort")
    if hits:
        parts.append(f"{hits} answered from {'an identical job' if hits == 1 else 'identical jobs'}")
    return f" ({'; '.join(parts)})" if parts else ""


COMMANDS = {"tryon": run_tryon}


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``submit`` command; returns the exit code."""
    return COMMANDS[args.kind](args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bagel_client.cli tryon …``: the ``submit`` command without the server's CLI."""
    parser = argparse.ArgumentParser(prog="python -m bagel_client.cli", description="Submit work to bagel-jobs.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
