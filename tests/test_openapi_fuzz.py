"""The OpenAPI document against the live API (issue 11): schemathesis with every check finds
nothing, and a client generated from the document by openapi-python-client runs the try-on
happy path.

Both run against a real API process of the embedded stack (SQLite, local storage, server-less
broker), as the issue asks; the generated client also needs the reconciler (its dispatcher) and a real GPU worker (tiny checkpoint).
schemathesis runs every phase (examples, coverage, fuzzing, stateful) with a bounded example
count and a fixed seed; ``tests/data/schemathesis.toml`` lists the few operations where a
schema-valid request may still be refused because the rule depends on state (with the reasons).
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from tests.fixtures.worker import ROOT, Stack, wait_until
from worker import tenants
from worker.dev.demo import product_image

SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
BIN = Path(sys.executable).parent
CONFIG = ROOT / "tests" / "data" / "schemathesis.toml"
MAX_EXAMPLES = 25
SEED = 20261128
PACKAGE = "bagel_jobs_generated"
GENERATOR_CONFIG = ROOT / "docs" / "openapi-python-client.yaml"  # the README's command uses it too


def _key(stack: Stack) -> str:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "fuzz")
        return tenants.create_api_key(s, tenant.id)[1]


@SQLITE_ONLY
def test_schemathesis_with_every_check_finds_nothing(stack: Stack, tmp_path: Path) -> None:
    stack.start("api")
    key = _key(stack)
    run = subprocess.run(
        [str(BIN / "st"), "--config-file", str(CONFIG), "run", f"{stack.api_url()}/openapi.json",
         "-H", f"Authorization: Bearer {key}", "--checks", "all", "--max-examples", str(MAX_EXAMPLES),
         "--seed", str(SEED), "--no-color", "--report", "junit", "--report-dir", str(tmp_path / "report")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    summary = run.stdout[run.stdout.find("SUMMARY"):]
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    paths = httpx.get(f"{stack.api_url()}/openapi.json", timeout=60).json()["paths"]
    operations = sum(len(item) for item in paths.values())
    assert f"Tested: {operations}" in summary and "unique failures" not in summary, summary


@pytest.fixture
def generated(stack: Stack, tmp_path: Path) -> Iterator[object]:
    """The client openapi-python-client generates from the live API's document, imported."""
    stack.start("api")
    run = subprocess.run([str(BIN / "openapi-python-client"), "generate", "--url", f"{stack.api_url()}/openapi.json",
                          "--meta", "none", "--config", str(GENERATOR_CONFIG), "--output-path", PACKAGE,
                          "--fail-on-warning"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


@SQLITE_ONLY
def test_a_generated_client_runs_the_tryon_happy_path(stack: Stack, generated: object) -> None:
    def load(name: str):  # noqa: ANN202 - a generated module
        return importlib.import_module(f"{PACKAGE}.{name}")

    for role in ("reconciler", "gpu"):  # the reconciler's dispatcher hands chunks to the GPU worker
        stack.start(role)
    client = load("client").AuthenticatedClient(base_url=stack.api_url(), token=_key(stack), timeout=60.0)
    models, types = load("models"), load("types")

    body = models.BodyUploadFile(file=types.File(payload=io.BytesIO(product_image(64)), file_name="mug.png",
                                                 mime_type="image/png"))
    uploaded = load("api.files.upload_file").sync(client=client, body=body)
    assert isinstance(uploaded, models.FileOut) and uploaded.width == 64

    scenes = ["on a marble counter", "on a beach at sunset"]
    batch_in = models.BatchIn.from_dict({"task": "tryon", "product_file": uploaded.id,
                                         "params": {"num_timesteps": 2},
                                         "items": [{"prompt": scene, "seed": i} for i, scene in enumerate(scenes)]})
    batch = load("api.batches.create_batch").sync(client=client, body=batch_in, idempotency_key="generated-1")
    assert isinstance(batch, models.BatchOut) and len(batch.job_ids) == 2

    get_batch = load("api.batches.get_batch")
    wait_until(lambda: get_batch.sync(batch.id, client=client).status == models.BatchOutStatus.COMPLETED, 240, 0.5)
    done = get_batch.sync(batch.id, client=client)
    assert done.counts.succeeded == 2

    page = load("api.batches.list_batch_jobs").sync(batch.id, client=client)
    assert [job.prompt for job in page.items] == scenes
    for job in page.items:
        assert job.status == models.JobStatus.SUCCEEDED
        url = urlsplit(job.result.url)
        query = parse_qs(url.query)
        downloaded = load("api.results.download_object").sync(
            url.path.removeprefix("/v1/objects/"), client=client, expires=int(query["expires"][0]),
            sig=query["sig"][0])
        picture = Image.open(io.BytesIO(downloaded.payload.read()))
        assert picture.format == "PNG" and picture.size == (job.width, job.height)

    missing = load("api.jobs.get_job").sync_detailed("no-such-job", client=client)
    assert missing.status_code == 404 and missing.parsed.error.code == "not_found"
