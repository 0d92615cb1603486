"""The executor pods of the Kubernetes backend: what it asks the API server for, and what the pods'
states mean. Pure code, no API calls (`kubernetes_backend` makes them), so the tests cover every
decision: `executor_pod()` builds an executor's Pod from its `ExecutorSpec`, `read_pod()` reads a
Pod as the API server returns it, and `judge()` says what that means for the executor's start.

An executor pod runs `cornserve executor` as the local backend does, with what a node gives it:
- its node's sidecar, which the sidecar DaemonSet (deploy/base/sidecar.yaml) runs with `--id` the
  node's name: the pod finds it through the downward API (`spec.nodeName` as `CORNSERVE_SIDECAR_ID`),
  shares the node's `/dev/shm` and IPC namespace with it (tensors are read in place) and holds the
  sidecars' token (every request to a sidecar carries it);
- `CORNSERVE_HOME` on an emptyDir, where the executor writes its ready file once it serves
  (`launch.announce_ready`): the readiness probe tests that file, so the pod is Ready exactly when a
  local executor would be;
- a model cache shared by the node's executors (a hostPath) as `HF_HOME`, with `HF_TOKEN` from an
  optional Secret;
- requests and limits from the descriptor's `Resources` (memory limited to what it requests; GPUs as
  `nvidia.com/gpu`), and the executor group's node affinity and tolerations.
Labels carry the deployment and executor ids; the owner reference (the control plane's Deployment)
makes deleting the installation delete the executors, while they outlive the control plane's pod.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from lightkube.models.apps_v1 import Deployment
from lightkube.models.core_v1 import (
    Affinity,
    Container,
    EmptyDirVolumeSource,
    EnvFromSource,
    EnvVar,
    EnvVarSource,
    ExecAction,
    HostPathVolumeSource,
    NodeAffinity,
    NodeSelector,
    NodeSelectorRequirement,
    NodeSelectorTerm,
    ObjectFieldSelector,
    PodSpec,
    Probe,
    ResourceRequirements,
    SecretEnvSource,
    SecretKeySelector,
    Toleration,
    Volume,
    VolumeMount,
)
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.resources.core_v1 import Pod

from flyte_cornserve.home import ENV_HOME
from flyte_cornserve.launch import ENV_READY_FILE
from flyte_cornserve.metrics import ENV_ADVERTISE_HOST, ENV_HOST
from flyte_cornserve.namespace import ENV_NAMESPACE
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID
from flyte_cornserve.sidecar.wire import ENV_TOKEN
from flyte_cornserve.task import Resources

from .backend import ExecutorSpec
from .resources import GROUP_CPU, GROUP_GPU, group_of

LABEL_NAME = "app.kubernetes.io/name"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_DEPLOYMENT = "cornserve.io/deployment"
LABEL_EXECUTOR = "cornserve.io/executor"
#: the labels every executor pod has: the backend watches the pods they select
EXECUTOR_LABELS = {LABEL_NAME: "cornserve-executor", LABEL_PART_OF: "flyte-cornserve"}
CONTAINER = "executor"
GPU_RESOURCE = "nvidia.com/gpu"

HOME = "/var/lib/cornserve"  # the executor's CORNSERVE_HOME (the Dockerfile's), an emptyDir
MODEL_CACHE = "/var/cache/huggingface"  # HF_HOME in the container
#: the readiness probe: the ready file `announce_ready()` writes once the executor serves (never removed)
READY_PROBE = ["sh", "-c", f'test -s "${ENV_READY_FILE}"']

#: a container waiting for one of these will not start however long it waits: its start fails at
#: once. ErrImagePull and ImagePullBackOff are not among them: a registry's hiccup or a multi-GB
#: CUDA image's slow pull heals, so they fail the start only at the pending timeout.
FAILS_AT_ONCE = frozenset({"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"})
#: the exit code of an executor whose pod went away without its container's (deleted before it
#: started, evicted, its node lost)
GONE_EXIT_CODE = -1


def _default_node_selectors() -> dict[str, dict[str, str]]:
    # cpu: the CPU image's vLLM build is for x86-64 (as the cpu overlay pins the sidecars);
    # gpu: the NVIDIA GPU operator's node label
    return {GROUP_CPU: {"kubernetes.io/arch": "amd64"}, GROUP_GPU: {"nvidia.com/gpu.present": "true"}}


def _default_tolerations() -> dict[str, tuple[Toleration, ...]]:
    return {GROUP_GPU: (Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"),)}


@dataclass(frozen=True)
class PodSettings:
    """How this installation's executor pods look, whatever the task."""

    namespace: str  # Kubernetes namespace of the pods (the control plane's)
    image: str
    image_pull_policy: str = "IfNotPresent"
    redis_secret: str = "cornserve-redis"  # the Secret with the Redis URL under `url` (deploy/base/redis.yaml)
    sidecar_token_secret: str = "cornserve-sidecar-token"  # the sidecars' token under `token`
    hf_token_secret: str = "cornserve-hf-token"  # optional: HF_TOKEN under `token`, for gated models
    model_cache_path: str = "/var/lib/cornserve-models"  # on the node: the model cache its executors share
    cornserve_namespace: str | None = None  # CORNSERVE_NAMESPACE (the sidecars' must be the same)
    owner: OwnerReference | None = None  # the control plane's Deployment
    #: per executor group: node labels a node must have (node affinity) and the taints tolerated
    node_selectors: Mapping[str, Mapping[str, str]] = field(default_factory=_default_node_selectors)
    tolerations: Mapping[str, Sequence[Toleration]] = field(default_factory=_default_tolerations)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: Secrets whose every key becomes an env variable (e.g. the object store's credentials); optional
    env_secrets: Sequence[str] = ()
    service_account: str | None = None  # e.g. one bound to a cloud role (IRSA, workload identity) for datasets
    termination_grace_s: int = 60  # the task manager stops executors with the same grace


# -- building -----------------------------------------------------------------------------------------

def executor_pod(spec: ExecutorSpec, settings: PodSettings) -> Pod:
    """The Pod of one executor: a bare Pod, never restarted (the task manager restarts an executor
    under a new id)."""
    group = group_of(spec.resources)
    tolerations = list(settings.tolerations.get(group, ()))
    return Pod(
        apiVersion="v1", kind="Pod",
        metadata=ObjectMeta(
            name=pod_name(spec.executor_id), namespace=settings.namespace,
            labels={**EXECUTOR_LABELS, LABEL_DEPLOYMENT: label_value(spec.deployment_id),
                    LABEL_EXECUTOR: label_value(spec.executor_id)},
            ownerReferences=[settings.owner] if settings.owner else None,
        ),
        spec=PodSpec(
            containers=[_executor_container(spec, settings)],
            restartPolicy="Never",
            terminationGracePeriodSeconds=settings.termination_grace_s,
            hostIPC=True,  # the sidecar's shared memory
            affinity=_node_affinity(settings.node_selectors.get(group, {})),
            tolerations=tolerations or None,
            serviceAccountName=settings.service_account,
            # executors never call the API server; a cloud role bound to their service account needs its token
            automountServiceAccountToken=True if settings.service_account else False,
            enableServiceLinks=False,  # no service variables: `$(VAR)` in its arguments expands nothing of theirs
            volumes=[
                Volume(name="home", emptyDir=EmptyDirVolumeSource()),
                Volume(name="shm", hostPath=HostPathVolumeSource(path="/dev/shm", type="Directory")),
                Volume(name="models", hostPath=HostPathVolumeSource(path=settings.model_cache_path,
                                                                    type="DirectoryOrCreate")),
            ],
        ),
    )


def _executor_container(spec: ExecutorSpec, settings: PodSettings) -> Container:
    return Container(
        name=CONTAINER,
        image=settings.image,
        imagePullPolicy=settings.image_pull_policy,
        command=["cornserve"],
        args=["executor", "--task", escape(spec.task_json), "--executor-id", escape(spec.executor_id)],
        env=_env(settings),
        envFrom=[EnvFromSource(secretRef=SecretEnvSource(name=name, optional=True))  # absent: none needed
                 for name in settings.env_secrets] or None,
        resources=_resources(spec.resources),
        readinessProbe=Probe(exec=ExecAction(command=READY_PROBE), periodSeconds=2),
        volumeMounts=[
            VolumeMount(name="home", mountPath=HOME),
            VolumeMount(name="shm", mountPath="/dev/shm"),
            VolumeMount(name="models", mountPath=MODEL_CACHE),
        ],
    )


def _env(settings: PodSettings) -> list[EnvVar]:
    def secret(name: str, secret_name: str, key: str, optional: bool | None = None) -> EnvVar:
        return EnvVar(name=name, valueFrom=EnvVarSource(
            secretKeyRef=SecretKeySelector(name=secret_name, key=key, optional=optional)))

    def pod_field(name: str, path: str) -> EnvVar:
        return EnvVar(name=name, valueFrom=EnvVarSource(fieldRef=ObjectFieldSelector(fieldPath=path)))

    namespace = [EnvVar(name=ENV_NAMESPACE, value=settings.cornserve_namespace)] if settings.cornserve_namespace else []
    return [
        secret(ENV_URL, settings.redis_secret, "url"),
        *namespace,
        pod_field(ENV_SIDECAR_ID, "spec.nodeName"),  # the DaemonSet's sidecar on this node has the node's name
        secret(ENV_TOKEN, settings.sidecar_token_secret, "token"),
        EnvVar(name=ENV_HOST, value="0.0.0.0"),  # its metrics, for Prometheus to scrape
        pod_field(ENV_ADVERTISE_HOST, "status.podIP"),
        EnvVar(name=ENV_HOME, value=HOME),
        EnvVar(name=ENV_READY_FILE, value=f"$({ENV_HOME})/ready"),
        EnvVar(name="HF_HOME", value=MODEL_CACHE),
        secret("HF_TOKEN", settings.hf_token_secret, "token", optional=True),
        *(EnvVar(name=name, value=value) for name, value in settings.extra_env.items()),
    ]


def _resources(resources: Resources) -> ResourceRequirements:
    """Requests what the resource manager reserved for it; memory is limited to that (an executor
    that outgrows it is OOM-killed and restarted, not allowed to starve its node), cpu is not."""
    memory = memory_quantity(resources.memory)
    gpus = {GPU_RESOURCE: str(resources.gpu)} if resources.gpu else {}
    return ResourceRequirements(requests={"cpu": cpu_quantity(resources.cpu), "memory": memory},
                                limits={"memory": memory, **gpus})


def _node_affinity(labels: Mapping[str, str]) -> Affinity | None:
    if not labels:
        return None
    term = NodeSelectorTerm(matchExpressions=[NodeSelectorRequirement(key=key, operator="In", values=[value])
                                              for key, value in sorted(labels.items())])
    return Affinity(nodeAffinity=NodeAffinity(
        requiredDuringSchedulingIgnoredDuringExecution=NodeSelector(nodeSelectorTerms=[term])))


def owner_reference(deployment: Deployment) -> OwnerReference:
    """A reference to the control plane's Deployment as the executor pods' owner: deleting it (the
    installation) deletes them; a new control plane pod (a restart, a rollout) leaves them. Not their
    controller: no Deployment controller manages them."""
    return OwnerReference(apiVersion="apps/v1", kind="Deployment", name=deployment.metadata.name,
                          uid=deployment.metadata.uid, controller=False, blockOwnerDeletion=False)


def pod_name(executor_id: str) -> str:
    """An executor's pod name: its id (every id the task manager makes is a DNS label: the deployment
    id's first 24 characters and 6 hex digits), else that id made one."""
    return re.sub(r"[^a-z0-9-]", "-", executor_id.lower())[:63].strip("-")


def label_value(text: str) -> str:
    """`text` as a label value: itself if it is one (deployment and executor ids are), else with
    other characters as `-` and, past 63 characters, its end (a deployment id's digest)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[-63:].strip("-_.")


def escape(argument: str) -> str:
    """`argument` as a container's command or argument that the kubelet gives the process unchanged:
    it expands `$(VAR)` and turns `$$` into `$`, so every `$` is doubled."""
    return argument.replace("$", "$$")


def cpu_quantity(cores: float) -> str:
    millicores = max(1, round(cores * 1000))
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def memory_quantity(memory: str) -> str:
    """`Resources.memory` as a Kubernetes quantity: the same, except kilo, which Kubernetes spells `k`."""
    return memory[:-1] + "k" if memory.endswith("K") else memory


# -- reading ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PodView:
    """What the backend needs of a pod's state."""

    name: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool = False  # its Ready condition is True: the executor serves
    exit_code: int | None = None  # the executor container's, once it terminated
    unschedulable: str = ""  # PodScheduled is False: the scheduler's reason and message
    waiting_reason: str = ""  # the container waits to start: ErrImagePull, CreateContainerConfigError...
    waiting_message: str = ""
    gone: bool = False  # deleted: a DELETED event's last state, or missing from a later list

    @property
    def waiting(self) -> str:
        return ": ".join(part for part in (self.waiting_reason, self.waiting_message) if part)

    def deleted(self) -> PodView:
        return replace(self, gone=True)


def read_pod(pod: Pod) -> PodView:
    status = pod.status
    conditions = {c.type: c for c in (status.conditions or [])} if status else {}
    ready = conditions.get("Ready")
    scheduled = conditions.get("PodScheduled")
    container = next((c for c in (status.containerStatuses or []) if c.name == CONTAINER), None) if status else None
    state = container.state if container else None
    terminated = state.terminated if state else None
    waiting = state.waiting if state else None
    return PodView(
        name=pod.metadata.name,
        phase=(status.phase if status else None) or "Pending",
        ready=ready is not None and ready.status == "True",
        exit_code=terminated.exitCode if terminated else None,
        unschedulable=(": ".join(part for part in (scheduled.reason, scheduled.message) if part)
                       if scheduled is not None and scheduled.status == "False" else ""),
        waiting_reason=(waiting.reason or "") if waiting else "",
        waiting_message=(waiting.message or "") if waiting else "",
    )


@dataclass(frozen=True)
class Verdict:
    """What a pod's state means for its executor."""

    outcome: Literal["starting", "ready", "exited", "start-failed"]
    exit_code: int | None = None  # exited
    reason: str = ""  # start-failed: why, naming the deployment; its pod is to be deleted


def judge(view: PodView, deployment_id: str, waited_s: float, pending_timeout_s: float,
          start_timeout_s: float) -> Verdict:
    """`view` of the pod of an executor of `deployment_id`, created (or adopted) `waited_s` ago.

    It has exited once its container terminated or the pod ended or went; it is ready once Ready.
    Its start has failed if its container waits for something that will not come (`FAILS_AT_ONCE`),
    if it is still Pending (unscheduled: no node has room, a GPU pool scaling up; or its image still
    pulling) after `pending_timeout_s`, or if it does not serve within `start_timeout_s` (as a local
    executor must not)."""
    if view.gone or view.exit_code is not None or view.phase in ("Succeeded", "Failed"):
        code = view.exit_code if view.exit_code is not None else 0 if view.phase == "Succeeded" else GONE_EXIT_CODE
        return Verdict("exited", exit_code=code)
    if view.ready:
        return Verdict("ready")
    executor = f"executor pod {view.name} of deployment {deployment_id}"
    if view.waiting_reason in FAILS_AT_ONCE:
        return Verdict("start-failed", reason=f"{executor} cannot start: {view.waiting}")
    if view.phase == "Pending" and waited_s >= pending_timeout_s:
        why = (f"not scheduled: {view.unschedulable}" if view.unschedulable
               else view.waiting or "scheduled, its container not started")
        return Verdict("start-failed", reason=f"{executor} was still Pending after {pending_timeout_s:g} s ({why})")
    if waited_s >= start_timeout_s:
        return Verdict("start-failed", reason=f"{executor} did not serve within {start_timeout_s:g} s")
    return Verdict("starting")
