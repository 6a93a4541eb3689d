"""The Kubernetes manifests in deploy/k8s/ (and the setting names in deploy/compose.yaml).

Every built-in object must pass kubernetes-validate's strict schema for Kubernetes 1.31 (the
schemas ship in the wheel; nothing is fetched). KEDA's ScaledObject is not a built-in kind: it is
checked against the fields of KEDA v2.16's ScaledObject spec written out below, and the HPA
behaviour it carries is validated as the autoscaling/v2 HorizontalPodAutoscaler it becomes.
Then the operational promises: GPU workers probed on their metrics port, a grace period that
covers the drain, a PodDisruptionBudget over them, migrations as one Job, autoscaling on the
backlog in GPU-seconds, every container's environment accepted by ``Settings``, and no
``BAGEL_JOBS_`` name (here or in the compose file) that ``Settings`` does not know.

Each check is a function that raises ``AssertionError`` naming the file and object; the last tests
break a copy of the manifests once per check and assert that the check notices.
"""

from __future__ import annotations

import base64
import copy
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from tests.fixtures.services import require_service
from worker.errors import SettingsError
from worker.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "k8s"
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
K8S_VERSION = "1.31"   # the schema set of kubernetes-validate used here (it ships 1.x up to 1.37)
KEDA_VERSION = "2.16"  # the ScaledObject fields below are those of KEDA v2.16
KEDA_API_VERSION = "keda.sh/v1alpha1"
BACKLOG_METRIC = "bagel_backlog_gpu_seconds"
MIN_GRACE_S = 600        # a GPU worker's terminationGracePeriodSeconds: time to finish a chunk
MIN_MODEL_LOAD_S = 600   # what its startupProbe allows for loading the 29 GB checkpoint
POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


@dataclass
class Manifest:
    """One YAML document of a file in deploy/k8s/."""

    file: str
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.doc.get("kind", "")

    @property
    def name(self) -> str:
        return self.doc.get("metadata", {}).get("name", "")

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}/{self.name}"


def load_manifests() -> list[Manifest]:
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                found.append(Manifest(path.name, doc))
    return found


def load_texts() -> dict[str, str]:
    """Raw text of every manifest and of the compose file (for the setting names)."""
    paths = [*sorted(K8S_DIR.glob("*.yaml")), COMPOSE_FILE]
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in paths}


@pytest.fixture
def manifests() -> list[Manifest]:
    return load_manifests()


@pytest.fixture
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        require_service("kubernetes-validate", "not installed; pip install 'bagel-jobs[test]' (kubernetes-validate)")
    return kubernetes_validate


# --- finding things ------------------------------------------------------------------------------


def _pod_spec(m: Manifest) -> dict[str, Any]:
    return m.doc["spec"]["template"]["spec"]


def _containers(m: Manifest) -> list[dict[str, Any]]:
    return [*_pod_spec(m).get("initContainers", []), *_pod_spec(m)["containers"]]


def _gpu_worker(manifests: list[Manifest]) -> tuple[Manifest, dict[str, Any]]:
    """The Deployment (and its container) that asks for an NVIDIA GPU."""
    found = [(m, c) for m in manifests if m.kind == "Deployment" for c in _pod_spec(m)["containers"]
             if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
    assert len(found) == 1, f"expected one Deployment container with an nvidia.com/gpu limit, found {len(found)}"
    return found[0]


def _api(manifests: list[Manifest]) -> Manifest:
    found = [m for m in manifests if m.kind == "Deployment"
             if any(c.get("args", [])[:1] == ["api"] for c in _pod_spec(m)["containers"])]
    assert len(found) == 1, f"expected one Deployment running `bagel-jobs api`, found {len(found)}"
    return found[0]


def _env(container: dict[str, Any], manifests: list[Manifest]) -> dict[str, str]:
    """What the container's environment holds: envFrom ConfigMaps/Secrets, then env."""
    by_ref = {(m.kind, m.name): m.doc for m in manifests if m.kind in ("ConfigMap", "Secret")}
    out: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if key in source:
                doc = by_ref.get((kind, source[key]["name"]), {})
                data = doc.get("data") or {}
                if kind == "Secret":  # a Secret's data is base64; its stringData is plain
                    data = {k: base64.b64decode(v).decode() for k, v in data.items()}
                out.update(data)
                out.update(doc.get("stringData") or {})
    out.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    return out


def _port_number(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    return named.get(port)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    return bool(match) and not selector.get("matchExpressions") and match.items() <= labels.items()


def _runs_migrations(container: dict[str, Any]) -> bool:
    words = [*container.get("command", []), *container.get("args", [])]
    return "db upgrade" in " ".join(words) or "alembic" in " ".join(words)


# --- KEDA v2.16 ScaledObject ---------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """A mapping with these keys (types, nested ``Obj``/``ListOf``, or ``None`` for any value)."""

    fields: dict[str, Any]
    required: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ListOf:
    item: Any


# From KEDA v2.16's ScaledObject reference (keda.sh/docs/2.16/reference/scaledobject-spec) and its
# Prometheus scaler page; `behavior` is the HPA's own field and is validated as one below.
PROMETHEUS_METADATA = Obj(
    fields=dict.fromkeys(["serverAddress", "query", "threshold", "activationThreshold", "namespace",
                          "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl", "authModes"], str),
    required=frozenset({"serverAddress", "query", "threshold"}),
)
TRIGGER = Obj(
    fields={"type": str, "metadata": None, "name": str, "useCachedMetrics": bool, "metricType": str,
            "authenticationRef": Obj({"name": str, "kind": str}, frozenset({"name"}))},
    required=frozenset({"type", "metadata"}),
)
SCALED_OBJECT_SPEC = Obj(
    fields={
        "scaleTargetRef": Obj({"name": str, "apiVersion": str, "kind": str, "envSourceContainerName": str},
                              frozenset({"name"})),
        "pollingInterval": int, "cooldownPeriod": int, "initialCooldownPeriod": int,
        "idleReplicaCount": int, "minReplicaCount": int, "maxReplicaCount": int,
        "fallback": Obj({"failureThreshold": int, "replicas": int}, frozenset({"failureThreshold", "replicas"})),
        "advanced": Obj({
            "restoreToOriginalReplicaCount": bool,
            "horizontalPodAutoscalerConfig": Obj({"name": str, "behavior": dict}),
            "scalingModifiers": Obj({"target": str, "activationTarget": str, "metricType": str, "formula": str},
                                    frozenset({"target", "formula"})),
        }),
        "triggers": ListOf(TRIGGER),
    },
    required=frozenset({"scaleTargetRef", "triggers"}),
)
TRIGGER_METADATA = {"prometheus": PROMETHEUS_METADATA}


def _schema_problems(value: Any, schema: Any, path: str) -> Iterator[str]:
    if schema is None:
        return
    if isinstance(schema, ListOf):
        if not isinstance(value, list) or not value:
            yield f"{path}: expected a non-empty list, got {value!r}"
            return
        for i, item in enumerate(value):
            yield from _schema_problems(item, schema.item, f"{path}[{i}]")
        return
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            yield f"{path}: expected a mapping, got {value!r}"
            return
        for key in sorted(schema.required - value.keys()):
            yield f"{path}.{key}: required"
        for key in sorted(value.keys() - schema.fields.keys()):
            yield f"{path}.{key}: unknown field in KEDA v{KEDA_VERSION}"
        for key in sorted(value.keys() & schema.fields.keys()):
            yield from _schema_problems(value[key], schema.fields[key], f"{path}.{key}")
        return
    # bool is an int in Python: a ``true`` where a count belongs is still wrong.
    if not isinstance(value, schema) or (schema is int and isinstance(value, bool)):
        yield f"{path}: expected {schema.__name__}, got {value!r}"


def scaled_object_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    if doc.get("apiVersion") != KEDA_API_VERSION:
        problems.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {KEDA_API_VERSION}")
    if not doc.get("metadata", {}).get("name"):
        problems.append("metadata.name: required")
    for key in sorted(doc.keys() - {"apiVersion", "kind", "metadata", "spec"}):
        problems.append(f"{key}: unknown top-level field")
    spec = doc.get("spec")
    problems += _schema_problems(spec, SCALED_OBJECT_SPEC, "spec")
    for i, trigger in enumerate((spec or {}).get("triggers") or []):
        kind = trigger.get("type") if isinstance(trigger, dict) else None
        if kind not in TRIGGER_METADATA:
            problems.append(f"spec.triggers[{i}].type: {kind!r} is not a trigger this check knows")
            continue
        problems += _schema_problems(trigger.get("metadata"), TRIGGER_METADATA[kind], f"spec.triggers[{i}].metadata")
    return problems


# --- the checks ----------------------------------------------------------------------------------


def check_builtin_kinds_are_valid(manifests: list[Manifest], kv: Any) -> None:
    builtin = [m for m in manifests if not m.doc.get("apiVersion", "").startswith("keda.sh/")]
    assert builtin, "no built-in objects found"
    for m in builtin:
        try:
            kv.validate(m.doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{m}: invalid for Kubernetes {K8S_VERSION} at {path or '(top)'}: "
                                 f"{exc.message}") from exc
        except kv.SchemaNotFoundError as exc:
            raise AssertionError(f"{m}: no Kubernetes {K8S_VERSION} schema for {m.doc.get('apiVersion')}") from exc


def check_scaled_objects_match_keda(manifests: list[Manifest], kv: Any) -> None:
    scaled = [m for m in manifests if m.kind == "ScaledObject"]
    assert scaled, "no KEDA ScaledObject in deploy/k8s/"
    for m in scaled:
        problems = scaled_object_problems(m.doc)
        assert not problems, f"{m}: not a KEDA v{KEDA_VERSION} ScaledObject: " + "; ".join(problems)
        # KEDA hands `behavior` to the HPA it creates: validate it as that HPA.
        spec = m.doc["spec"]
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is not None:
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": m.name},
                   "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                               "name": spec["scaleTargetRef"]["name"]},
                            "minReplicas": max(1, spec.get("minReplicaCount", 0)),
                            "maxReplicas": spec.get("maxReplicaCount", 100), "behavior": behavior}}
            check_builtin_kinds_are_valid([Manifest(m.file, hpa)], kv)


def check_gpu_worker_probes(manifests: list[Manifest]) -> None:
    worker, container = _gpu_worker(manifests)
    env = _env(container, manifests)
    port_var = ENV_PREFIX + "WORKER_HTTP_PORT"
    assert env.get(port_var, "").strip().isdigit(), f"{worker}: {port_var} is not set to a port"
    metrics_port = int(env[port_var])
    declared = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert declared.get("metrics") == metrics_port, (
        f"{worker}: container port 'metrics' is {declared.get('metrics')}, {port_var} is {metrics_port}")
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        http = container.get(probe, {}).get("httpGet")
        assert http, f"{worker}: no {probe} with httpGet"
        assert http.get("path") == path, f"{worker}: {probe} asks {http.get('path')!r}, expected {path}"
        assert _port_number(container, http["port"]) == metrics_port, (
            f"{worker}: {probe} probes port {http['port']!r}, not the metrics port {metrics_port}")
    startup = container.get("startupProbe")
    assert startup and "httpGet" in startup, f"{worker}: no httpGet startupProbe to cover the model load"
    budget_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget_s >= MIN_MODEL_LOAD_S, (
        f"{worker}: startupProbe allows {budget_s} s for the model load, < {MIN_MODEL_LOAD_S}")


def check_gpu_worker_drains(manifests: list[Manifest]) -> None:
    worker, container = _gpu_worker(manifests)
    grace = _pod_spec(worker).get("terminationGracePeriodSeconds", 30)
    assert grace >= MIN_GRACE_S, (
        f"{worker}: terminationGracePeriodSeconds {grace} < {MIN_GRACE_S}: a chunk cannot finish")
    drain = _env(container, manifests).get(ENV_PREFIX + "DRAIN")
    allowed = get_args(Settings.model_fields["drain"].annotation)
    assert drain in allowed, f"{worker}: {ENV_PREFIX}DRAIN is {drain!r}, expected one of {allowed}"


def check_disruption_budgets(manifests: list[Manifest]) -> None:
    pdbs = [m for m in manifests if m.kind == "PodDisruptionBudget"]
    worker, _ = _gpu_worker(manifests)
    api = _api(manifests)
    for target, key, value in ((worker, "maxUnavailable", 1), (api, "minAvailable", 1)):
        labels = target.doc["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if _selects(p.doc["spec"].get("selector", {}), labels)]
        assert covering, f"{target}: no PodDisruptionBudget selects its pods {labels}"
        assert any(p.doc["spec"].get(key) == value for p in covering), (
            f"{target}: no PodDisruptionBudget over its pods with {key}: {value}")


def check_migrations_run_as_one_job(manifests: list[Manifest]) -> None:
    jobs = [m for m in manifests if m.kind == "Job" and any(_runs_migrations(c) for c in _containers(m))]
    assert len(jobs) == 1, f"expected one Job running `bagel-jobs db upgrade`, found {[str(j) for j in jobs]}"
    for m in manifests:
        if m.kind in POD_TEMPLATE_KINDS and m.kind != "Job":
            for c in _containers(m):
                assert not _runs_migrations(c), f"{m}: container {c['name']!r} runs migrations; that is the Job's work"


def check_autoscaling_on_backlog(manifests: list[Manifest]) -> None:
    worker, _ = _gpu_worker(manifests)
    scaled = [m for m in manifests if m.kind == "ScaledObject"
              and m.doc["spec"]["scaleTargetRef"]["name"] == worker.name]
    assert len(scaled) == 1, f"expected one ScaledObject for {worker}, found {len(scaled)}"
    spec = scaled[0].doc["spec"]
    triggers = spec["triggers"]
    assert [t["type"] for t in triggers] == ["prometheus"], f"{scaled[0]}: triggers {[t['type'] for t in triggers]}"
    query = triggers[0]["metadata"]["query"]
    assert BACKLOG_METRIC in query, f"{scaled[0]}: query {query!r} does not read {BACKLOG_METRIC}"
    # Every API replica exports the same database-wide series: a bare sum() counts them N times.
    if _api(manifests).doc["spec"].get("replicas", 1) > 1:
        assert not re.fullmatch(rf"\s*sum\s*\(\s*{BACKLOG_METRIC}\s*\)\s*", query), (
            f"{scaled[0]}: {query!r} sums the backlog once per API replica")
    assert float(triggers[0]["metadata"]["threshold"]) > 0, f"{scaled[0]}: threshold must be > 0"
    assert spec.get("minReplicaCount", 0) in (0, 1), f"{scaled[0]}: minReplicaCount {spec.get('minReplicaCount')}"
    assert "cooldownPeriod" in spec, f"{scaled[0]}: no cooldownPeriod"
    window = (spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
              .get("scaleDown", {}).get("stabilizationWindowSeconds", 0))
    assert window > 0, f"{scaled[0]}: no scale-down stabilization window"


def check_every_container_builds_settings(manifests: list[Manifest]) -> None:
    """The environment each container gets (ConfigMap, Secret, env) passes Settings' start-up checks."""
    for m in manifests:
        if m.kind not in POD_TEMPLATE_KINDS:
            continue
        for c in _containers(m):
            env = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in _env(c, manifests).items()
                   if k.startswith(ENV_PREFIX)}
            try:
                load_settings(_env_file=None, **env)
            except SettingsError as exc:
                raise AssertionError(f"{m}: container {c['name']!r} would not start: {exc}") from exc


def check_setting_names_exist(texts: dict[str, str]) -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    used = {(name, file) for file, text in texts.items()
            for name in re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]\b", text)}
    assert used, "no BAGEL_JOBS_ names found"
    unknown = sorted(f"{file}: {name}" for name, file in used if name not in known)
    assert not unknown, "settings that worker.settings.Settings does not have: " + ", ".join(unknown)


# --- tests ---------------------------------------------------------------------------------------


def test_every_document_parses_and_has_a_kind_and_name(manifests):
    assert {m.file for m in manifests} >= {"api.yaml", "workers.yaml", "autoscaling.yaml", "config.yaml",
                                           "migrations.yaml"}
    for m in manifests:
        assert m.kind and m.name and m.doc.get("apiVersion"), f"{m}: apiVersion, kind and metadata.name required"


def test_builtin_kinds_pass_strict_validation_for_kubernetes_1_31(manifests, kubernetes_validate):
    check_builtin_kinds_are_valid(manifests, kubernetes_validate)


def test_scaled_object_uses_only_keda_2_16_fields(manifests, kubernetes_validate):
    check_scaled_objects_match_keda(manifests, kubernetes_validate)


def test_gpu_worker_is_probed_on_its_metrics_port(manifests):
    check_gpu_worker_probes(manifests)


def test_gpu_worker_grace_period_covers_the_drain(manifests):
    check_gpu_worker_drains(manifests)


def test_disruption_budgets_cover_gpu_workers_and_api(manifests):
    check_disruption_budgets(manifests)


def test_migrations_run_once_as_a_job_not_per_replica(manifests):
    check_migrations_run_as_one_job(manifests)


def test_gpu_workers_scale_on_the_backlog_in_gpu_seconds(manifests):
    check_autoscaling_on_backlog(manifests)


def test_every_container_environment_passes_the_settings_checks(manifests, monkeypatch):
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    check_every_container_builds_settings(manifests)


def test_every_setting_name_in_the_manifests_and_compose_file_exists():
    check_setting_names_exist(load_texts())


# --- each check can fail -------------------------------------------------------------------------


def _find(manifests: list[Manifest], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(m.doc for m in manifests if m.kind == kind and (name is None or m.name == name))


def _gpu_container(ms: list[Manifest]) -> dict[str, Any]:
    return _gpu_worker(ms)[1]


def _set_env(container: dict[str, Any], name: str, value: str | None) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name]
    if value is not None:
        container["env"].append({"name": name, "value": value})


def _add_init_migration(ms: list[Manifest]) -> None:
    api = _api(ms)
    _pod_spec(api)["initContainers"] = [{"name": "migrate", "image": "bagel-jobs:latest", "args": ["db", "upgrade"]}]


BREAKAGES: dict[str, tuple[Callable[[list[Manifest]], None], str]] = {
    "unknown pod field": (lambda ms: _pod_spec(_gpu_worker(ms)[0]).update(gracePeriod=900), "builtin"),
    "string replica count": (lambda ms: _api(ms).doc["spec"].update(replicas="2"), "builtin"),
    "unknown ScaledObject field": (lambda ms: _find(ms, "ScaledObject")["spec"].update(maxReplicas=4), "keda"),
    "ScaledObject without target name": (lambda ms: _find(ms, "ScaledObject")["spec"]["scaleTargetRef"].pop("name"),
                                         "keda"),
    "prometheus trigger without threshold": (
        lambda ms: _find(ms, "ScaledObject")["spec"]["triggers"][0]["metadata"].pop("threshold"), "keda"),
    "numeric threshold": (
        lambda ms: _find(ms, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(threshold=600), "keda"),
    "bad HPA behavior": (lambda ms: _find(ms, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
                         ["behavior"]["scaleDown"].update(stabilisationWindow=60), "keda"),
    "liveness on the wrong port": (lambda ms: _gpu_container(ms)["livenessProbe"]["httpGet"].update(port=8000),
                                   "probes"),
    "no readiness probe": (lambda ms: _gpu_container(ms).pop("readinessProbe"), "probes"),
    "metrics port disagrees with the setting": (
        lambda ms: _set_env(_gpu_container(ms), "BAGEL_JOBS_WORKER_HTTP_PORT", "9102"), "probes"),
    "short startup probe": (lambda ms: _gpu_container(ms)["startupProbe"].update(failureThreshold=3), "probes"),
    "short grace period": (lambda ms: _pod_spec(_gpu_worker(ms)[0]).update(terminationGracePeriodSeconds=120),
                           "drain"),
    "no drain setting": (lambda ms: _set_env(_gpu_container(ms), "BAGEL_JOBS_DRAIN", None), "drain"),
    "GPU PDB selects other pods": (
        lambda ms: _find(ms, "PodDisruptionBudget", "bagel-gpu-worker")["spec"].update(
            selector={"matchLabels": {"app": "bagel-gpu"}}), "pdb"),
    "no API PDB": (lambda ms: ms.remove(next(m for m in ms if m.kind == "PodDisruptionBudget"
                                             and m.name == "bagel-api")), "pdb"),
    "migration init container": (_add_init_migration, "migrations"),
    "no migrations Job": (lambda ms: ms.remove(next(m for m in ms if m.kind == "Job")), "migrations"),
    "redis trigger": (lambda ms: _find(ms, "ScaledObject")["spec"]["triggers"][0].update(type="redis"), "autoscaling"),
    "query on another metric": (
        lambda ms: _find(ms, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(query="sum(celery_queue)"),
        "autoscaling"),
    "a setting value Settings refuses": (
        lambda ms: _find(ms, "ConfigMap", "bagel-jobs")["data"].update(BAGEL_JOBS_QUANTIZATION="fp8"), "settings"),
    "backlog summed over API replicas": (
        lambda ms: _find(ms, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
            query="sum(bagel_backlog_gpu_seconds)"), "autoscaling"),
    "no scale-down window": (
        lambda ms: _find(ms, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        ["scaleDown"].pop("stabilizationWindowSeconds"), "autoscaling"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_check_notices_a_broken_manifest(breakage, kubernetes_validate):
    checks: dict[str, Callable[[list[Manifest]], None]] = {
        "builtin": lambda ms: check_builtin_kinds_are_valid(ms, kubernetes_validate),
        "keda": lambda ms: check_scaled_objects_match_keda(ms, kubernetes_validate),
        "probes": check_gpu_worker_probes,
        "drain": check_gpu_worker_drains,
        "pdb": check_disruption_budgets,
        "migrations": check_migrations_run_as_one_job,
        "autoscaling": check_autoscaling_on_backlog,
        "settings": check_every_container_builds_settings,
    }
    broken = copy.deepcopy(load_manifests())
    breaker, check = BREAKAGES[breakage]
    breaker(broken)
    with pytest.raises(AssertionError):
        checks[check](broken)


def test_the_setting_name_check_notices_a_stale_name():
    texts = load_texts()
    texts["deploy/compose.yaml"] += "\n  BAGEL_JOBS_GPU_QUEUE_LENGTH: 4\n"
    with pytest.raises(AssertionError, match=r"deploy/compose.yaml: BAGEL_JOBS_GPU_QUEUE_LENGTH"):
        check_setting_names_exist(texts)
