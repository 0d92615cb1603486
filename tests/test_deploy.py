"""`deploy/` as a reader (and kustomize) takes it: every file and patch target a kustomization names
exists; every whole Kubernetes object, and every object an overlay's patches make of one, validates
strictly against the Kubernetes 1.30 OpenAPI schema; the control plane runs the Kubernetes backend
with the permissions and Secrets its executor pods need (the pods themselves: tests/services/
test_pods.py); the FlytePropeller snippets route both task types to the connector's Service. (No kustomize binary or API server runs here: patches are plain
strategic-merge patches, applied below the way kustomize merges them: maps key by key, lists of
named items by name, anything else replaced.)"""

from __future__ import annotations

import copy
import pathlib

import kubernetes_validate
import pytest
import yaml

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.services.backend import ExecutorSpec
from flyte_cornserve.services.cli import up
from flyte_cornserve.services.pods import PodSettings, executor_pod

DEPLOY = pathlib.Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES = "1.30.0"
KUSTOMIZATIONS = sorted(DEPLOY.rglob("kustomization.yaml"))


def documents(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects(folder: pathlib.Path) -> list[dict]:
    """What a kustomization folder builds: its resources (files, or folders with their own
    kustomization), with its patches applied."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    built: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        built += objects(path) if path.is_dir() else documents(path)
    for patch in kustomization.get("patches", []):
        (change,) = documents(folder / patch["path"])
        (target,) = [o for o in built if identity(o) == identity(change)]
        merge(target, change)
    return built


def identity(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def merge(target: dict, change: dict) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif (isinstance(value, list) and isinstance(target.get(key), list)
              and all(isinstance(item, dict) and "name" in item for item in value + target[key])):
            by_name = {item["name"]: item for item in target[key]}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_every_file_and_patch_target_a_kustomization_names_exists(kustomization: pathlib.Path) -> None:
    folder = kustomization.parent
    spec = yaml.safe_load(kustomization.read_text())
    for resource in spec.get("resources", []):
        path = folder / resource
        assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{kustomization}: {resource} is missing"
    names = {identity(o) for o in objects(folder.parent.parent / "base")} if "overlays" in folder.parts else set()
    for patch in spec.get("patches", []):
        assert (folder / patch["path"]).is_file(), f"{kustomization}: {patch['path']} is missing"
        (change,) = documents(folder / patch["path"])
        assert (patch["target"]["kind"], patch["target"]["name"]) == identity(change)
        assert identity(change) in names, f"{patch['path']} patches {identity(change)}, which the base does not have"


@pytest.mark.parametrize("folder", [p.parent for p in KUSTOMIZATIONS], ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_object_validates_strictly_against_kubernetes_1_30(folder: pathlib.Path) -> None:
    built = objects(folder)
    assert built
    for obj in built:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises, naming the field
    kinds = {obj["kind"] for obj in built}
    assert {"Namespace", "StatefulSet", "Deployment", "DaemonSet", "Service", "ServiceAccount", "Role",
            "RoleBinding", "Secret"} <= kinds


def control_plane(folder: pathlib.Path) -> tuple[dict, dict]:
    """(pod spec, container) of the control plane's Deployment that `folder` builds."""
    built = {identity(o): o for o in objects(folder)}
    pod = built[("Deployment", "cornserve-control-plane")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize("folder", ["base", "overlays/cpu", "overlays/gpu"])
def test_the_control_plane_runs_executors_as_pods_of_its_own_image_in_its_namespace(folder: str) -> None:
    pod, container = control_plane(DEPLOY / folder)
    args = container["args"]
    assert args[:4] == ["up", "--foreground", "--backend", "kubernetes"]
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # its image: the executors'
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["CORNSERVE_METRICS_HOST"]["value"] == "0.0.0.0"  # its probes reach it at the pod's IP
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})  # no executor runs in it
    assert [volume["name"] for volume in pod["volumes"]] == ["home"]  # no shared memory: no sidecar here


def test_the_gpu_overlay_lets_executors_reserve_gpus_and_runs_sidecars_on_gpu_nodes() -> None:
    _, container = control_plane(DEPLOY / "overlays" / "gpu")
    assert int(container["args"][container["args"].index("--gpu") + 1]) > 0
    assert container["env"] and container["volumeMounts"]  # the base's, kept by the merge
    built = {identity(o): o for o in objects(DEPLOY / "overlays" / "gpu")}
    sidecar = built[("DaemonSet", "cornserve-sidecar")]["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in sidecar["tolerations"]


def test_the_role_grants_what_the_kubernetes_backend_calls_and_no_more() -> None:
    built = {identity(o): o for o in objects(DEPLOY / "base")}
    rules = {(rule["apiGroups"][0], resource): (set(rule["verbs"]), rule.get("resourceNames"))
             for rule in built[("Role", "cornserve-control-plane")]["rules"] for resource in rule["resources"]}
    owner = next(p.default for p in up.params if p.name == "owner")
    assert owner == "cornserve-control-plane" and ("Deployment", owner) in built
    assert rules == {
        ("", "pods"): ({"get", "list", "watch", "create", "delete"}, None),  # executor pods, and its own
        ("", "pods/log"): ({"get"}, None),  # an ended executor's log tail
        ("apps", "deployments"): ({"get"}, [owner]),  # the executor pods' owner
    }


def test_the_executor_pods_secrets_are_the_ones_deploy_defines_or_names() -> None:
    """The Redis URL's Secret is redis.yaml's; the sidecars' token is the Secret the sidecar
    DaemonSet reads (its comment says how to create it)."""
    task = EncoderTask(model_id="m")
    spec = ExecutorSpec("e-1", task.deployment_id(), task.to_json(), "cluster", descriptor_for(task).resources())
    pod = executor_pod(spec, PodSettings(namespace="cornserve", image="flyte-cornserve")).to_dict()
    wanted = {(v["name"], v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
              for v in pod["spec"]["containers"][0]["env"] if "secretKeyRef" in v.get("valueFrom", {})
              and not v["valueFrom"]["secretKeyRef"].get("optional")}
    built = {identity(o): o for o in objects(DEPLOY / "base")}
    sidecar = built[("DaemonSet", "cornserve-sidecar")]["spec"]["template"]["spec"]["containers"][0]
    read_by_sidecar = {(v["name"], v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
                       for v in sidecar["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert wanted == read_by_sidecar  # the Redis URL and the token, from the same Secrets
    redis_secret = built[("Secret", "cornserve-redis")]
    assert ("CORNSERVE_REDIS_URL", "cornserve-redis", "url") in wanted and "url" in redis_secret["stringData"]


@pytest.mark.parametrize("values, plugins", [
    ("flyte-core-values.yaml", lambda v: (v["configmap"]["enabled_plugins"]["tasks"]["task-plugins"],
                                         v["configmap"]["connector_service"]["plugins"]["connector-service"])),
    ("flyte-binary-values.yaml", lambda v: (v["configuration"]["inline"]["tasks"]["task-plugins"],
                                           v["configuration"]["inline"]["plugins"]["connector-service"])),
])
def test_the_propeller_snippets_route_both_task_types_to_the_connector_service(values, plugins) -> None:
    tasks, connector = plugins(yaml.safe_load((DEPLOY / "propeller" / values).read_text()))
    assert "connector-service" in tasks["enabled-plugins"]
    for task_type in ("cornserve", "cornserve_batch"):
        assert tasks["default-for-task-types"][task_type] == "connector-service"
        assert task_type in connector["supportedTaskTypes"]
    service = next(o for o in documents(DEPLOY / "base" / "connector.yaml") if o["kind"] == "Service")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert connector["defaultConnector"]["endpoint"] == f"dns:///{service['metadata']['name']}.cornserve.svc.cluster.local:{port}"
    # above Propeller's defaults (50 per namespace, 100 per project, 10 QPS)
    assert connector["resourceConstraints"]["NamespaceScopeResourceConstraint"]["Value"] > 50
    assert connector["resourceConstraints"]["ProjectScopeResourceConstraint"]["Value"] > 100
    assert connector["webApi"]["readRateLimiter"]["qps"] > 10 and connector["webApi"]["writeRateLimiter"]["qps"] > 10
