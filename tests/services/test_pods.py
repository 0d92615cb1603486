"""The Kubernetes backend's decisions (issue 13), without an API server: the executor pods it builds
for the built-in tasks validate strictly against the Kubernetes 1.30 OpenAPI schema and carry what
the cluster needs (GPUs, node affinity, tolerations, labels, owner); pods in the shapes the API server
returns read as the right state; and that state judged against the pending timeout says why a start
failed, naming the deployment and the scheduler's reason."""

from __future__ import annotations

import copy
import re
import uuid

import kubernetes_validate
import pytest
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMTask
from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.services.backend import ExecutorSpec
from flyte_cornserve.services.pods import (
    GONE_EXIT_CODE,
    PodSettings,
    executor_pod,
    judge,
    owner_reference,
    pod_name,
    read_pod,
)
from flyte_cornserve.task import Resources, UnitTask

KUBERNETES = "1.30.0"
GPU = Resources(cpu=4, memory="24Gi", gpu=1)
#: the control plane's Deployment, as the API server returns it (what the backend reads at its start)
CONTROL_PLANE = Deployment.from_dict({
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "cornserve-control-plane", "namespace": "cornserve",
                 "uid": "5f0c4e4e-8a3b-4c1e-9d7a-2b6f1e0c9a11", "resourceVersion": "81234", "generation": 3,
                 "creationTimestamp": "2026-12-01T09:00:00Z"},
    "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "cornserve-control-plane"}},
             "template": {"metadata": {"labels": {"app.kubernetes.io/name": "cornserve-control-plane"}},
                          "spec": {"containers": [{"name": "control-plane", "image": "flyte-cornserve"}]}}},
})
SETTINGS = PodSettings(namespace="cornserve", image="ghcr.io/flyte-cornserve/flyte-cornserve:0.2.0-cuda",
                       owner=owner_reference(CONTROL_PLANE))
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")

TASKS = {
    "encoder-cpu": EncoderTask(model_id="llava-hf/llava-1.5-7b-hf"),
    "llm-cpu": LLMTask(model_id="llava-hf/llava-1.5-7b-hf"),
    "encoder-gpu": EncoderTask(model_id="llava-hf/llava-1.5-7b-hf", resources=GPU),
    "llm-gpu": LLMTask(model_id="llava-hf/llava-1.5-7b-hf", resources=GPU),
}


def spec_of(task: UnitTask) -> ExecutorSpec:
    """What the task manager gives the backend for one executor of `task`."""
    deployment_id = task.deployment_id()
    return ExecutorSpec(f"{deployment_id[:24]}-{uuid.uuid4().hex[:6]}", deployment_id, task.to_json(), "cluster",
                        descriptor_for(task).resources())


@pytest.mark.parametrize("name", TASKS)
def test_the_executor_pods_of_the_builtin_tasks_validate_strictly_against_kubernetes_1_30(name: str) -> None:
    task = TASKS[name]
    spec = spec_of(task)
    pod = executor_pod(spec, SETTINGS).to_dict()
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)  # raises, naming the field

    metadata, pod_spec = pod["metadata"], pod["spec"]
    assert DNS_LABEL.match(metadata["name"]) and metadata["name"] == spec.executor_id  # `{pod}` in log links
    assert metadata["labels"] == {"app.kubernetes.io/name": "cornserve-executor",
                                  "app.kubernetes.io/part-of": "flyte-cornserve",
                                  "cornserve.io/deployment": task.deployment_id(),
                                  "cornserve.io/executor": spec.executor_id}
    assert metadata["ownerReferences"] == [{"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": "cornserve-control-plane",
                                            "uid": "5f0c4e4e-8a3b-4c1e-9d7a-2b6f1e0c9a11",
                                            "controller": False, "blockOwnerDeletion": False}]
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["hostIPC"] is True
    (container,) = pod_spec["containers"]
    assert container["command"] == ["cornserve"]
    assert container["args"] == ["executor", "--task", task.to_json(), "--executor-id", spec.executor_id]
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["CORNSERVE_SIDECAR_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["CORNSERVE_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "cornserve-redis", "key": "url"}}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert container["readinessProbe"]["exec"]["command"] == ["sh", "-c", 'test -s "$CORNSERVE_READY_FILE"']

    resources = descriptor_for(task).resources()
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests == {"cpu": f"{resources.cpu:g}", "memory": resources.memory}
    if resources.gpu:
        assert limits == {"memory": resources.memory, "nvidia.com/gpu": "1"}
        (term,) = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        assert term == {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}
        assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    else:
        assert limits == {"memory": resources.memory}
        (term,) = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        assert term == {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
        assert "tolerations" not in pod_spec


def test_what_reading_datasets_takes_reaches_every_executor_pod() -> None:
    """`cornserve up --executor-env/--executor-env-secret/--executor-service-account`: credentials of the
    object store, or a cloud role through the service account (whose token then is mounted)."""
    settings = PodSettings(namespace="cornserve", image="flyte-cornserve", extra_env={"AWS_REGION": "eu-west-1"},
                           env_secrets=("object-store",), service_account="datasets-reader")
    pod = executor_pod(spec_of(TASKS["encoder-cpu"]), settings).to_dict()
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    (container,) = pod["spec"]["containers"]
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "object-store", "optional": True}}]
    assert (pod["spec"]["serviceAccountName"], pod["spec"]["automountServiceAccountToken"]) == ("datasets-reader", True)
    plain = executor_pod(spec_of(TASKS["encoder-cpu"]), SETTINGS).to_dict()
    assert "envFrom" not in plain["spec"]["containers"][0] and plain["spec"]["automountServiceAccountToken"] is False


def test_quantities_and_ids_kubernetes_would_refuse_are_made_valid() -> None:
    """Half a core, a kilo that Kubernetes spells `k`, and the ids of a task class whose name makes
    its deployment id too long a label value and its executor id no DNS label (an underscore)."""
    task = EncoderTask(model_id="m", resources=Resources(cpu=0.5, memory="800000K"))
    deployment_id = "a_task_whose_class_name_is_long_enough_to_overflow_a_label-0123456789abcdef"
    spec = ExecutorSpec(f"{deployment_id[:24]}-0a1b2c", deployment_id, task.to_json(), "cluster",
                        descriptor_for(task).resources())
    pod = executor_pod(spec, PodSettings(namespace="cornserve", image="flyte-cornserve")).to_dict()
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "500m", "memory": "800000k"}
    labels = pod["metadata"]["labels"]
    assert LABEL_VALUE.match(labels["cornserve.io/deployment"]) and LABEL_VALUE.match(labels["cornserve.io/executor"])
    assert labels["cornserve.io/deployment"].endswith("-0123456789abcdef")  # its digest
    assert labels["cornserve.io/executor"] == spec.executor_id  # a valid label value stays as it is
    assert pod["metadata"]["name"] == pod_name(spec.executor_id) == "a-task-whose-class-name--0a1b2c"
    assert "ownerReferences" not in pod["metadata"]


# -- pods as the API server returns them ------------------------------------------------------------

def returned(status: dict, **metadata) -> Pod:
    """The executor pod of an LLM on a GPU as the API server returns it: its spec, with `status`."""
    pod = copy.deepcopy(executor_pod(spec_of(TASKS["llm-gpu"]), SETTINGS).to_dict())
    pod["metadata"] |= {"uid": "0d3c2b1a-1111-2222-3333-444455556666", "resourceVersion": "90210",
                        "creationTimestamp": "2026-12-01T10:00:00Z", **metadata}
    pod["spec"] |= {"nodeName": "gpu-node-1"} if status.get("hostIP") else {}
    pod["status"] = {"qosClass": "Burstable", **status}
    return Pod.from_dict(pod)


def condition(kind: str, status: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": "2026-12-01T10:00:01Z",
            **({"reason": reason} if reason else {}), **({"message": message} if message else {})}


def executor_status(state: dict, ready: bool = False) -> dict:
    return {"name": "executor", "ready": ready, "restartCount": 0, "started": "running" in state,
            "image": SETTINGS.image, "imageID": "", "state": state, "lastState": {}}


UNSCHEDULABLE = ("0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
                 "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful "
                 "for scheduling, 2 No preemption victims found for incoming pod.")
RUNNING = {"hostIP": "10.0.0.5", "podIP": "10.1.2.3", "startTime": "2026-12-01T10:00:02Z"}
STARTED = {"running": {"startedAt": "2026-12-01T10:01:40Z"}}
PENDING_UNSCHEDULABLE = returned({"phase": "Pending", "conditions": [
    condition("PodScheduled", "False", "Unschedulable", UNSCHEDULABLE)]})
PULLING = {"phase": "Pending", **RUNNING, "conditions": [
    condition("PodScheduled", "True"), condition("Ready", "False", "ContainersNotReady",
                                                 "containers with unready status: [executor]")]}
ERR_IMAGE_PULL = returned(PULLING | {"containerStatuses": [executor_status({"waiting": {
    "reason": "ErrImagePull", "message": "failed to pull and unpack image \"ghcr.io/flyte-cornserve/flyte-cornserve:"
                                         "0.2.0-cuda\": failed to resolve reference: 429 Too Many Requests"}})]})
INVALID_IMAGE = returned(PULLING | {"containerStatuses": [executor_status({"waiting": {
    "reason": "InvalidImageName", "message": "Failed to apply default image tag \"Flyte:x\": couldn't parse image name"}})]})
NO_SECRET = returned(PULLING | {"containerStatuses": [executor_status({"waiting": {
    "reason": "CreateContainerConfigError", "message": "secret \"cornserve-sidecar-token\" not found"}})]})
RUNNING_NOT_READY = returned({"phase": "Running", **RUNNING, "conditions": [
    condition("PodReadyToStartContainers", "True"), condition("Initialized", "True"),
    condition("Ready", "False", "ContainersNotReady", "containers with unready status: [executor]"),
    condition("ContainersReady", "False", "ContainersNotReady", "containers with unready status: [executor]"),
    condition("PodScheduled", "True")], "containerStatuses": [executor_status(STARTED)]})
RUNNING_READY = returned({"phase": "Running", **RUNNING, "conditions": [
    condition("PodReadyToStartContainers", "True"), condition("Initialized", "True"), condition("Ready", "True"),
    condition("ContainersReady", "True"), condition("PodScheduled", "True")],
    "containerStatuses": [executor_status(STARTED, ready=True)]})
OOM_KILLED = returned({"phase": "Failed", **RUNNING, "conditions": [
    condition("Ready", "False", "PodFailed"), condition("PodScheduled", "True")],
    "containerStatuses": [executor_status({"terminated": {
        "exitCode": 137, "reason": "OOMKilled", "startedAt": "2026-12-01T10:01:40Z",
        "finishedAt": "2026-12-01T10:03:00Z", "containerID": "containerd://4f2a"}})]})
STOPPED = returned({"phase": "Succeeded", **RUNNING, "conditions": [
    condition("Ready", "False", "PodCompleted"), condition("PodScheduled", "True")],
    "containerStatuses": [executor_status({"terminated": {
        "exitCode": 0, "reason": "Completed", "startedAt": "2026-12-01T10:01:40Z",
        "finishedAt": "2026-12-01T11:00:00Z", "containerID": "containerd://4f2a"}})]},
    deletionTimestamp="2026-12-01T10:59:00Z", deletionGracePeriodSeconds=60)


@pytest.mark.parametrize("pod, phase, ready, exit_code, waiting_reason", [
    (PENDING_UNSCHEDULABLE, "Pending", False, None, ""),
    (ERR_IMAGE_PULL, "Pending", False, None, "ErrImagePull"),
    (RUNNING_NOT_READY, "Running", False, None, ""),
    (RUNNING_READY, "Running", True, None, ""),
    (OOM_KILLED, "Failed", False, 137, ""),
    (STOPPED, "Succeeded", False, 0, ""),
], ids=["unschedulable", "err-image-pull", "running", "ready", "oom-killed", "stopped"])
def test_a_pod_as_the_api_server_returns_it_reads_as_its_state(pod, phase, ready, exit_code, waiting_reason) -> None:
    view = read_pod(pod)
    assert (view.name, view.phase, view.ready, view.exit_code, view.waiting_reason) == (
        pod.metadata.name, phase, ready, exit_code, waiting_reason)
    assert view.unschedulable == (f"Unschedulable: {UNSCHEDULABLE}" if pod is PENDING_UNSCHEDULABLE else "")
    assert not view.gone


def test_a_pod_just_created_has_no_status_yet_and_is_pending() -> None:
    view = read_pod(executor_pod(spec_of(TASKS["encoder-cpu"]), SETTINGS))
    assert (view.phase, view.ready, view.exit_code) == ("Pending", False, None)


# -- judging a start ---------------------------------------------------------------------------------

DEPLOYMENT = TASKS["llm-gpu"].deployment_id()


def verdict(pod: Pod, waited_s: float, gone: bool = False):
    view = read_pod(pod)
    return judge(view.deleted() if gone else view, DEPLOYMENT, waited_s, pending_timeout_s=600, start_timeout_s=3600)


def test_an_unschedulable_pod_fails_its_start_at_the_pending_timeout_naming_the_deployment_and_the_reason() -> None:
    assert verdict(PENDING_UNSCHEDULABLE, 599.0).outcome == "starting"  # a GPU pool may be scaling up
    failed = verdict(PENDING_UNSCHEDULABLE, 600.0)
    assert failed.outcome == "start-failed"
    assert f"of deployment {DEPLOYMENT}" in failed.reason and PENDING_UNSCHEDULABLE.metadata.name in failed.reason
    assert "still Pending after 600 s" in failed.reason
    assert "not scheduled: Unschedulable: 0/3 nodes are available" in failed.reason
    assert "2 Insufficient nvidia.com/gpu" in failed.reason


def test_an_image_that_does_not_pull_fails_at_the_pending_timeout_and_one_that_cannot_start_at_once() -> None:
    assert verdict(ERR_IMAGE_PULL, 30.0).outcome == "starting"  # a registry's hiccup heals
    failed = verdict(ERR_IMAGE_PULL, 600.0)
    assert failed.outcome == "start-failed" and "ErrImagePull: failed to pull" in failed.reason
    for pod, reason in ((INVALID_IMAGE, "InvalidImageName: "), (NO_SECRET, "CreateContainerConfigError: secret")):
        failed = verdict(pod, 0.0)
        assert failed.outcome == "start-failed" and f"cannot start: {reason}" in failed.reason
        assert DEPLOYMENT in failed.reason


def test_a_running_pod_is_ready_once_its_probe_passes_and_may_load_its_model_past_the_pending_timeout() -> None:
    assert verdict(RUNNING_NOT_READY, 900.0).outcome == "starting"
    assert verdict(RUNNING_READY, 900.0).outcome == "ready"
    failed = verdict(RUNNING_NOT_READY, 3600.0)
    assert failed.outcome == "start-failed" and "did not serve within 3600 s" in failed.reason


def test_an_ended_or_deleted_pod_has_exited_with_its_containers_code_or_gone_exit_code() -> None:
    assert verdict(OOM_KILLED, 10.0) == verdict(OOM_KILLED, 10.0, gone=True)
    assert verdict(OOM_KILLED, 10.0).exit_code == 137
    assert (verdict(STOPPED, 10.0).outcome, verdict(STOPPED, 10.0).exit_code) == ("exited", 0)
    for never_ran in (PENDING_UNSCHEDULABLE, RUNNING_READY):  # deleted before it started; its node lost
        assert (verdict(never_ran, 10.0, gone=True).outcome, verdict(never_ran, 10.0, gone=True).exit_code) == (
            "exited", GONE_EXIT_CODE)
