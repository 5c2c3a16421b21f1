"""deploy/ (Kubernetes) and docker-compose.yml: valid against their schemas, and
wired as docs/deploy.md promises.

The schemas, offline: kubernetes-validate's bundled Kubernetes schemas (strict: an
unknown field fails, as ``kubectl apply`` refuses it) for the core resources,
KEDA's ScaledObject CRD (deploy/schemas/, vendored) and the Compose
specification (check-jsonschema's vendored copy) through check-jsonschema. No
cluster or Docker here: the rest is the contract read from the files.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from api.routes.metrics import queue_work
from shared.core.broker import WEBHOOK_QUEUE
from shared.core.settings import Settings
from shared.registry import load_registry
from shared.registry.entries import DiffusersModel
from worker import supervisor
from worker.supervisor import WorkerGroup

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
KEDA_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject-v2.20.2.json"
# The oldest Kubernetes the manifests are for, and the newest the package knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Each kind of worker, the queue it serves (docs/deploy.md).
WORKERS = {
    "imagegen-io-worker": "default",
    "imagegen-batch-worker": Settings.model_fields["batch_queue"].default,
    "imagegen-webhook-worker": WEBHOOK_QUEUE,
    "imagegen-gpu-worker": DiffusersModel.model_fields["queue"].default,
}
# The longest a worker's warm shutdown takes: the supervisor's wait for its
# consumers, then its wait after killing one that is still running
# (worker/supervisor.py: ChildWorker.stop kills and waits 5 s more).
KILL_WAIT_SECONDS = 5


DRAIN_SECONDS = Settings.model_fields["worker_drain_seconds"].default + KILL_WAIT_SECONDS


def _manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def _core() -> list[Path]:
    return [p for p in _manifests() if not p.name.endswith(".scaledobject.yaml")]


def _scalers() -> list[Path]:
    return [p for p in _manifests() if p.name.endswith(".scaledobject.yaml")]


def _docs(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _docs(_manifests()) if d["kind"] == kind}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _pods() -> dict[str, dict[str, Any]]:
    kinds = ("Deployment", "Job")
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in _docs(_manifests())
        if d["kind"] in kinds
    }


def _worker_queue(command: list[str]) -> str:
    assert command[:2] == ["imagegen", "worker"], command
    return command[command.index("--queues") + 1]


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    """kubernetes-validate in this process (its CLI is the same call for each
    resource, a second of start-up more). A kind it has no schema for raises: no
    resource is passed over."""
    docs = list(_docs(_core()))
    kinds = {"ConfigMap", "Job", "Deployment", "Service", "HorizontalPodAutoscaler"}
    assert kinds <= {d["kind"] for d in docs}
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} against Kubernetes {version}: {exc.message} at {exc.path}")


def test_the_scaled_objects_pass_kedas_crd_schema() -> None:
    scalers = [str(p) for p in _scalers()]
    assert len(scalers) == len(WORKERS)
    done = _run(str(BIN / "check-jsonschema"), "--schemafile", str(KEDA_SCHEMA), *scalers)
    assert done.returncode == 0, done.stdout + done.stderr
    # check-jsonschema reads one document a file: every ScaledObject is in its own.
    assert all(d["kind"] == "ScaledObject" for d in _docs(_scalers()))
    assert all(d["kind"] != "ScaledObject" for d in _docs(_core()))


def test_docker_compose_passes_the_compose_specification() -> None:
    compose = str(ROOT / "docker-compose.yml")
    done = _run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", compose)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_kind_of_worker_has_a_deployment_on_its_queue() -> None:
    deployments = _of_kind("Deployment")
    assert set(deployments) == {"imagegen-api", *WORKERS}
    for name, queue in WORKERS.items():
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert _worker_queue(container["command"]) == queue, name
    (api,) = deployments["imagegen-api"]["spec"]["template"]["spec"]["containers"]
    assert api["command"][:2] == ["imagegen", "api"]
    gpu = deployments["imagegen-gpu-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["image"] == "imagegen-gpu"  # the local extra's image
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_every_worker_deployment_is_scaled_on_its_queues_work_in_metrics() -> None:
    metric = queue_work([], 0).name
    scalers = _of_kind("ScaledObject")
    deployments = _of_kind("Deployment")
    targets = {s["spec"]["scaleTargetRef"]["name"]: s for s in scalers.values()}
    assert set(targets) == set(WORKERS)
    for name, queue in WORKERS.items():
        spec = targets[name]["spec"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        # Every API pod reports the same figure: the highest, never the sum.
        assert trigger["metadata"]["query"] == f'max({metric}{{queue="{queue}"}})', name
        assert int(trigger["metadata"]["threshold"]) >= 1
        # At least one where it is needed: the I/O workers run the sweeper, and a
        # new batch's validation and pumps are batch tasks no figure counts.
        if name in ("imagegen-io-worker", "imagegen-batch-worker"):
            assert spec["minReplicaCount"] >= 1, name
        # The scaler owns the count: an apply must not reset it.
        assert "replicas" not in deployments[name]["spec"], name
    # The API's /metrics, where the figure is, is scraped.
    api = deployments["imagegen-api"]["spec"]["template"]["metadata"]["annotations"]
    assert (api["prometheus.io/scrape"], api["prometheus.io/path"]) == ("true", "/metrics")


def test_the_api_is_probed_on_healthz_and_readyz_and_drains_within_its_grace() -> None:
    from api.app import create_app

    routes = {getattr(r, "path", None) for r in create_app().routes}
    assert {"/healthz", "/readyz"} <= routes
    pod = _of_kind("Deployment")["imagegen-api"]["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    port = api["ports"][0]["name"]
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    # Out of the Service's endpoints (preStop), then uvicorn's own drain.
    sleep = float(api["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + _uvicorn_drain() + 5


def _uvicorn_drain() -> float:
    """``timeout_graceful_shutdown`` as cli/servers.py hands it to uvicorn."""
    tree = ast.parse((ROOT / "cli" / "servers.py").read_text())
    values = [
        k.value.value
        for k in ast.walk(tree)
        if isinstance(k, ast.keyword)
        and k.arg == "timeout_graceful_shutdown"
        and isinstance(k.value, ast.Constant)
    ]
    (value,) = values
    assert isinstance(value, int | float)
    return float(value)


def test_workers_get_the_whole_warm_shutdown_before_they_are_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The group hands each consumer its whole drain (IMAGEGEN_WORKER_DRAIN_SECONDS).
    stops: list[float] = []

    class Consumer:  # no process started
        def __init__(self, args: list[str], env: dict[str, str]) -> None:
            self.args = args

        def stop(self, timeout: float) -> None:
            stops.append(timeout)

    monkeypatch.setattr(supervisor, "ChildWorker", Consumer)
    WorkerGroup(Settings(worker_drain_seconds=7), ["default"]).stop()
    assert stops == [7]
    pods = _pods()
    for name in WORKERS:
        assert pods[name]["terminationGracePeriodSeconds"] >= DRAIN_SECONDS, name
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("io-worker", "batch-worker", "webhook-worker", "gpu-worker"):
        assert _seconds(services[name]["stop_grace_period"]) >= DRAIN_SECONDS, name


def test_migrations_run_as_a_job_that_every_deployment_waits_for() -> None:
    (job,) = _of_kind("Job").values()
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["command"] == ["imagegen", "migrate"]
    for name, deployment in _of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (wait,) = pod["initContainers"]
        assert wait["image"] == pod["containers"][0]["image"], name
        assert "shared.core.migrate import pending" in wait["command"][-1], name
    # Compose: a one-shot `migrate` every imagegen service starts after.
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["migrate"]["command"] == ["imagegen", "migrate"]
    for name, service in services.items():
        if name != "migrate" and "build" in service:
            condition = service["depends_on"]["migrate"]["condition"]
            assert condition == "service_completed_successfully", name


def test_pods_run_as_non_root_on_a_read_only_root_with_requests_and_limits() -> None:
    (user,) = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    for name, pod in _pods().items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in _containers(pod):
            where = (name, container["name"])
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            # The only writable place: /tmp, where IMAGEGEN_DATA_DIR is.
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            if container is pod["containers"][0]:
                assert "/tmp" in mounts, where
            assert all(m.get("readOnly") for p, m in mounts.items() if p != "/tmp"), where


SECRET = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|DATABASE_URL|BROKER_URL|REDIS_URL")


def test_settings_come_from_the_config_map_and_secrets_never_from_literals() -> None:
    config = _of_kind("ConfigMap")["imagegen-config"]["data"]
    assert not [k for k in config if SECRET.search(k)]
    settings = {f"IMAGEGEN_{f.upper()}" for f in Settings.model_fields}
    assert {k for k in config if k.startswith("IMAGEGEN_")} <= settings
    assert config["IMAGEGEN_DATA_DIR"].startswith("/tmp/")
    example = (DEPLOY / "secrets.env.example").read_text()
    keys = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    assert {"IMAGEGEN_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    assert {k for k in keys if k.startswith("IMAGEGEN_")} <= settings
    for name, pod in _pods().items():
        for container in _containers(pod):
            sources = container["envFrom"]
            assert {"configMapRef": {"name": "imagegen-config"}} in sources, name
            assert {"secretRef": {"name": "imagegen-secrets"}} in sources, name
            literal = [e["name"] for e in container.get("env", []) if SECRET.search(e["name"])]
            assert literal == [], (name, literal)


def test_the_models_file_is_mounted_from_its_config_map_and_loads(tmp_path: Path) -> None:
    models = _of_kind("ConfigMap")["imagegen-models"]["data"]["models.yaml"]
    path = tmp_path / "models.yaml"
    path.write_text(models)
    assert load_registry(path).models  # a wrong entry raises, naming it
    where = _of_kind("ConfigMap")["imagegen-config"]["data"]["IMAGEGEN_MODELS_FILE"]
    for name, deployment in _of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name"))
        assert volume["configMap"]["name"] == "imagegen-models", name
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
        assert f"{mount['mountPath']}/models.yaml" == where, name


def test_each_kustomization_lists_every_manifest_beside_it() -> None:
    folders = sorted({p.parent for p in DEPLOY.rglob("kustomization.yaml")})
    listed: set[Path] = set()
    for folder in folders:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for entry in kustomization["resources"]:
            target = (folder / entry).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), entry
            listed.add(target)
    assert set(_manifests()) <= listed
