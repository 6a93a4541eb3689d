"""Settings: embedded defaults, env variables, start-up validation naming the variable, masking, empty
values of optional settings meaning unset; and the per-task parameter rules (worker.params)."""

from __future__ import annotations

import json
import typing
from dataclasses import replace

import pytest

from bagel.config import BagelConstants
from worker import params, webhook_targets
from worker.errors import InvalidParameter, InvalidWebhookUrl, SettingsError
from worker.settings import Settings, load_settings, mask_url
from worker.storage import S3Store, make_store


@pytest.fixture(autouse=True)
def no_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith("BAGEL_JOBS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_are_the_embedded_stack():
    s = load_settings()
    assert s.database_url == "sqlite:///var/bagel-jobs.db" and s.is_sqlite
    assert s.broker_url == "sqla+sqlite:///var/broker.db"
    assert s.storage_backend == "local" and str(s.storage_dir) == "var/storage"
    assert s.model_path is None and s.quantization == "none" and s.device == "auto"
    assert (s.chunk_size, s.max_batch_items, s.max_upload_bytes) == (8, 256, 20 * 1024 * 1024)
    assert (s.lease_s, s.max_attempts, s.webhook_allow_private) == (600, 3, False)


def test_env_variables_and_dotenv_are_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("BAGEL_JOBS_CHUNK_SIZE=4\nBAGEL_JOBS_QUANTIZATION=nf4\n")
    monkeypatch.setenv("BAGEL_JOBS_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("BAGEL_JOBS_S3_BUCKET", "results")
    monkeypatch.setenv("BAGEL_JOBS_S3_SECRET_ACCESS_KEY", "hunter2")
    s = load_settings()
    assert s.chunk_size == 4 and s.quantization == "nf4" and s.storage_backend == "s3"
    assert "hunter2" not in repr(s)


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("BAGEL_JOBS_CHUNK_SIZE", "0")
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_CHUNK_SIZE='0': Input should be greater than or equal to 1"):
        load_settings()
    monkeypatch.delenv("BAGEL_JOBS_CHUNK_SIZE")
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_QUANTIZATION='fp8'"):
        load_settings(quantization="fp8")
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_S3_BUCKET: required when BAGEL_JOBS_STORAGE_BACKEND=s3"):
        load_settings(storage_backend="s3")
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_DATABASE_URL: scheme 'mysql' is not supported"):
        load_settings(database_url="mysql://x/y")


def test_public_base_url_defaults_to_the_api_address_and_an_explicit_one_wins(monkeypatch):
    assert load_settings().public_base_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("BAGEL_JOBS_API_PORT", "9100")
    assert load_settings().public_base_url == "http://127.0.0.1:9100"
    monkeypatch.setenv("BAGEL_JOBS_API_HOST", "0.0.0.0")  # a wildcard bind: reached on the loopback
    assert load_settings().public_base_url == "http://127.0.0.1:9100"
    assert load_settings(api_host="::").public_base_url == "http://127.0.0.1:9100"
    assert load_settings(api_host="10.0.0.5").public_base_url == "http://10.0.0.5:9100"
    assert load_settings(api_host="fd00::5").public_base_url == "http://[fd00::5]:9100"
    monkeypatch.setenv("BAGEL_JOBS_PUBLIC_BASE_URL", " ")  # blank: unset
    assert load_settings().public_base_url == "http://127.0.0.1:9100"
    monkeypatch.setenv("BAGEL_JOBS_PUBLIC_BASE_URL", "https://bagel.example.com")
    assert load_settings().public_base_url == "https://bagel.example.com"
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_PUBLIC_BASE_URL: 'bagel.example.com' is not an http\(s\) URL"):
        load_settings(public_base_url="bagel.example.com")


def test_gpu_memory_budget_and_margin_are_checked_at_start_up(monkeypatch):
    s = load_settings()
    assert s.gpu_memory_budget_bytes is None and s.gpu_memory_margin_bytes == 2 * 1024**3
    monkeypatch.setenv("BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES", "8000000000")
    monkeypatch.setenv("BAGEL_JOBS_GPU_MEMORY_MARGIN_BYTES", "0")
    s = load_settings()
    assert (s.gpu_memory_budget_bytes, s.gpu_memory_margin_bytes) == (8_000_000_000, 0)
    monkeypatch.setenv("BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES", "0")
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES='0': Input should be greater than 0"):
        load_settings()
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_GPU_MEMORY_MARGIN_BYTES=-1: Input should be greater than or "
                                            r"equal to 0"):
        load_settings(gpu_memory_budget_bytes=None, gpu_memory_margin_bytes=-1)


def test_fault_injection_accepts_its_forms_and_refuses_anything_else(monkeypatch):
    assert load_settings().fault_injection is None
    monkeypatch.setenv("BAGEL_JOBS_FAULT_INJECTION", "oom_above_rows:64")
    assert load_settings().fault_injection == "oom_above_rows:64"
    assert load_settings(fault_injection="device_error").fault_injection == "device_error"
    assert load_settings(fault_injection="pause_after_object_write:2.5").fault_injection == "pause_after_object_write:2.5"
    assert load_settings(fault_injection=" ").fault_injection is None
    refused = {
        "oom_everywhere": r"unknown fault 'oom_everywhere'; use one of \['oom_above_rows:N \(N >= 0 packed rows\)', "
                          r"'device_error', 'pause_after_object_write:S \(S > 0 seconds\)'\]",
        "oom_above_rows": r"oom_above_rows needs a row limit, e.g. 'oom_above_rows:64'",
        "oom_above_rows:-3": r"oom_above_rows: the row limit '-3' is not a whole number >= 0",
        "device_error:now": r"device_error takes no argument, got 'now'",
    }
    for value, message in refused.items():
        with pytest.raises(SettingsError, match=rf"^BAGEL_JOBS_FAULT_INJECTION='{value}': {message}$"):
            load_settings(fault_injection=value)


def test_masked_dump_hides_secrets_and_url_passwords():
    s = Settings(_env_file=None, database_url="postgresql+psycopg://app:pw123@db:5432/jobs",
                 broker_url="redis://:redispw@redis:6379/0", s3_secret_access_key="topsecret",
                 url_signing_key="signme")
    dump = s.masked_dump()
    text = json.dumps(dump)
    for secret in ("pw123", "redispw", "topsecret", "signme"):
        assert secret not in text
    assert dump["database_url"] == "postgresql+psycopg://app:***@db:5432/jobs"
    assert dump["broker_url"] == "redis://:***@redis:6379/0"
    assert dump["s3_secret_access_key"] == "***" and dump["storage_dir"] == "var/storage"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


# --- worker.params -----------------------------------------------------------------------------


def test_resolve_fills_task_defaults_and_always_sets_a_seed():
    gen = params.resolve("generate", {}, think=False)
    assert gen["cfg_img_scale"] == 1.0 and gen["cfg_interval"] == [0.4, 1.0] and gen["cfg_renorm_type"] == "global"
    assert isinstance(gen["seed"], int) and gen["think"] is False
    edit = params.resolve("edit", {"seed": 7}, think=True)
    assert edit["cfg_img_scale"] == 2.0 and edit["cfg_interval"] == [0.0, 1.0] and edit["seed"] == 7
    assert edit["cfg_renorm_type"] == "text_channel" and edit["think"] is True
    tryon = params.resolve("tryon", {"num_timesteps": 4}, think=False)
    assert tryon["cfg_img_scale"] > edit["cfg_img_scale"] and tryon["num_timesteps"] == 4


@pytest.mark.parametrize(("user", "message"), [
    ({"num_timesteps": 1}, r"params.num_timesteps: 1 is outside the allowed range 2 <= value <= 200"),
    ({"num_timesteps": 2.5}, r"params.num_timesteps: 2.5 must be a whole number"),
    ({"cfg_text_scale": 31}, r"params.cfg_text_scale: 31.0 is outside the allowed range 0.0 <= value <= 30.0"),
    ({"timestep_shift": 0}, r"params.timestep_shift: 0.0 is outside the allowed range 0.0 < value <= 20.0"),
    ({"cfg_interval": [0.8, 0.2]}, r"params.cfg_interval: start 0.8 is after end 0.2"),
    ({"cfg_interval": [0.1]}, r"params.cfg_interval: \[0.1\] must be a pair"),
    ({"cfg_renorm_type": "local"}, r"params.cfg_renorm_type: 'local' is not one of"),
    ({"do_sample": "yes"}, r"params.do_sample: 'yes' must be true or false"),
    ({"seed": -1}, r"params.seed: -1 is outside the allowed range"),
    ({"guidance": 3}, r"params.guidance: unknown parameter"),
])
def test_resolve_refuses_out_of_range_values(user, message):
    with pytest.raises(InvalidParameter, match=message):
        params.resolve("generate", user, think=False)


def test_tryon_prompt_keeps_the_product_and_runs_as_edit():
    assert params.engine_task("tryon") == "edit" and params.engine_task("understand") == "understand"
    prompt = params.engine_prompt("tryon", "  on a marble kitchen counter ")
    assert prompt.endswith("Scene: on a marble kitchen counter") and "unchanged" in prompt
    assert params.engine_prompt("generate", " a cat ") == "a cat"


def test_sizes_and_input_counts():
    real = BagelConstants()

    def size(task, width=None, height=None, input_size=None, constants=real):
        return params.resolve_size(task, width, height, max_side_px=1024, input_size=input_size, constants=constants)

    assert size("generate") == (1024, 1024) and size("generate", 64, 32) == (64, 32)
    # Edit and try-on: the input's size as the engine resizes it (short side raised to the minimum,
    # long side capped, sides rounded to 16), the tiny demo checkpoint's minimum without a model path.
    assert size("tryon", input_size=(64, 64)) == (512, 512)
    assert size("edit", input_size=(40, 24), constants=replace(real, vae_min_px=64)) == (112, 64)
    assert size("tryon", input_size=(64, 64), constants=params.picture_constants(None)) == (256, 256)
    assert size("edit", input_size=(3000, 2000)) == (1024, 688)
    assert size("understand", input_size=(64, 64)) == (None, None)
    with pytest.raises(InvalidParameter, match=r"width: 2048 px is outside 16..1024 px"):
        size("generate", 2048, 64)
    with pytest.raises(InvalidParameter, match=r"height: 100 px is not a multiple of 16"):
        size("generate", 64, 100)
    with pytest.raises(InvalidParameter) as refused:
        size("edit", 64, None, input_size=(64, 64))
    assert str(refused.value) == ("width: not accepted for task 'edit' (the output has the input picture's size, "
                                  "scaled so that its short side is at least 512 px and its long side at most 1024 px "
                                  "(the long side wins), sides rounded to multiples of 16 px; the job's width and "
                                  "height show it from submission on)")
    with pytest.raises(InvalidParameter, match=r"^height: not accepted for task 'understand' \(it answers in text\)$"):
        size("understand", None, 64)
    params.check_input_count("understand", 3)
    with pytest.raises(InvalidParameter, match=r"input_file_ids: task 'tryon' takes 1 input image\(s\), got 0"):
        params.check_input_count("tryon", 0)


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://example.com/hook", "scheme 'ftp' is not allowed"),
    ("https://user:pw@example.com/hook", "credentials in the URL are not allowed"),
    ("http://127.0.0.1:8080/hook", "non-public address 127.0.0.1"),
    ("http://10.1.2.3/hook", "non-public address 10.1.2.3"),
    ("http://169.254.169.254/latest", "non-public address 169.254.169.254"),
    ("http://[::1]/hook", "non-public address ::1"),
    ("http://[::ffff:192.168.0.1]/hook", "non-public address"),
    ("http://localhost/hook", "loopback name"),
    ("https:///nohost", "has no host"),
])
def test_webhook_urls_are_checked(url, message):
    with pytest.raises(InvalidWebhookUrl, match=message):
        webhook_targets.check_webhook_url(url, allow_private=False)


def test_webhook_private_targets_allowed_when_configured():
    assert webhook_targets.check_webhook_url("http://127.0.0.1:8080/hook", allow_private=True)
    assert webhook_targets.check_webhook_url("https://93.184.216.34/hook", allow_private=False)
    with pytest.raises(InvalidWebhookUrl, match="credentials"):
        webhook_targets.check_webhook_url("http://u:p@127.0.0.1/", allow_private=True)


# --- empty values mean unset ------------------------------------------------------------------


def _optional_fields() -> list[str]:
    return sorted(name for name, field in Settings.model_fields.items()
                  if type(None) in typing.get_args(field.annotation))


def test_an_empty_optional_variable_means_unset(monkeypatch):
    optional = _optional_fields()
    assert {"s3_endpoint_url", "s3_bucket", "s3_access_key_id", "s3_secret_access_key", "url_signing_key",
            "model_path", "gpu_memory_budget_bytes", "worker_http_port", "fault_injection"} <= set(optional)
    for i, name in enumerate(optional):
        monkeypatch.setenv(f"BAGEL_JOBS_{name.upper()}", "" if i % 2 else "  ")
    s = load_settings()
    assert {name: getattr(s, name) for name in optional} == dict.fromkeys(optional)
    passed = load_settings(s3_endpoint_url="", worker_http_port=" ")
    assert passed.s3_endpoint_url is None and passed.worker_http_port is None
    # A field that is not optional keeps its empty string: an empty key prefix is a real value.
    monkeypatch.setenv("BAGEL_JOBS_S3_PREFIX", "")
    assert load_settings().s3_prefix == ""


def test_an_empty_s3_bucket_is_still_refused_for_the_s3_backend(monkeypatch):
    monkeypatch.setenv("BAGEL_JOBS_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("BAGEL_JOBS_S3_BUCKET", " ")
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_S3_BUCKET: required when BAGEL_JOBS_STORAGE_BACKEND=s3"):
        load_settings()


def test_an_empty_s3_endpoint_builds_an_aws_store(monkeypatch, tmp_path):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):  # botocore reads these too
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("BAGEL_JOBS_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("BAGEL_JOBS_S3_ENDPOINT_URL", "")  # what deploy/k8s/config.yaml writes
    monkeypatch.setenv("BAGEL_JOBS_S3_BUCKET", "bagel-results")
    monkeypatch.setenv("BAGEL_JOBS_S3_REGION", "eu-west-1")
    monkeypatch.setenv("BAGEL_JOBS_S3_ACCESS_KEY_ID", "AKIDEMPTYENDPOINT")
    monkeypatch.setenv("BAGEL_JOBS_S3_SECRET_ACCESS_KEY", "not-a-real-secret")
    settings = load_settings()
    assert settings.s3_endpoint_url is None
    store = make_store(settings)  # builds the boto3 client; no request is sent
    assert isinstance(store, S3Store)
    url = store.url("results/t1/j1.png", 60)  # presigning is local too
    assert url.startswith("https://") and ".amazonaws.com/" in url and "results/t1/j1.png" in url
