"""A container of a Kubernetes object run here as a local process, as it is: what a kubelet would run.

No kubelet or container runtime runs on these machines, so `Kubelet.run(obj, container)` does their
part for one container of a Pod, or of a Deployment's or DaemonSet's pod template (an object the
backend builds, or a deploy/ document):

- its command and args with `$(VAR)` expanded as the kubelet expands them (`expand`: `$$` is `$`, a
  reference to no variable stays as written), over the container's env; the command is looked up on
  the image's PATH, whose first folder is this environment's bin (`cornserve`, `pyflyte`);
- its env in order, each `value` expanded over the entries before it; `valueFrom.fieldRef` from
  the pod's fields (`spec.nodeName`, `metadata.name`, `metadata.namespace`, `status.hostIP`,
  `status.podIP`); `valueFrom.secretKeyRef` and `envFrom.secretRef` from `secrets` (an optional one may be missing; a missing
  required one fails, as the kubelet's CreateContainerConfigError does); over the image's own
  environment (`image_env`: what the Dockerfile's ENV and the base image set);
- its volume mounts as folders here: an emptyDir's under `root/pod/<pod>/<volume>`, a hostPath's
  under `root/node/<path>`, except /dev/shm, which is this machine's own (the sidecar and the executor
  pods share the node's). The process sees this machine's file system, not the container's, so every
  env value and argument at or under a mount path is rewritten to its folder;
- its working directory (the image's, unless `workingDir`) is `root/pod/<pod>/workdir`;
- readiness from its readinessProbe, through `flyte_cornserve.launch`: `exec` runs the command with the
  container's environment (`ReadyCommand`); `tcpSocket` connects to the pod's IP (`ReadySocket`);
  `grpc` connects to the pod's IP, then one grpc.health.v1 Check must answer SERVING. The pod's IP is
  this machine's non-loopback address, so a process that listens on 127.0.0.1 only fails its probe
  here as in a pod. Once ready, every port the container declares must accept connections there
  soon (as a Service, a peer or Prometheus reaches it).

Its ports are fixed (deploy/ names them): one taken here fails at once, naming it. `stop_all()` ends
every process started, by pid: SIGTERM to its process group, SIGKILL after the pod's termination
grace period.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flyte_cornserve.launch import Launched, LaunchError, ReadyCommand, ReadySocket, start

VENV_BIN = os.path.dirname(sys.executable)
NODE_SHM = "/dev/shm"
START_TIMEOUT_S = 300.0
PORT_TIMEOUT_S = 30.0


def expand(text: str, variables: Mapping[str, str]) -> str:
    """`$(NAME)` replaced by `variables[NAME]` where there is one; `$$` is `$`; any other `$` stays
    (Kubernetes' third_party/forked/golang/expansion)."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(" and (close := text.find(")", i + 2)) != -1:
            name = text[i + 2:close]
            out.append(variables.get(name, f"$({name})"))
            i = close + 1
        else:  # `$(` never closed, or `$x`: as written
            out.append(text[i:i + 2])
            i += 2
    return "".join(out)


def this_machine_ip() -> str:
    """The address other pods would reach this one at: the one the default route leaves from (no
    packet is sent); 127.0.0.1 on a machine without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return "127.0.0.1"
        return probe.getsockname()[0]


def pod_of(obj: dict) -> tuple[str, dict]:
    """(pod name, pod spec) of a Pod, or of the pods a Deployment or DaemonSet makes."""
    if obj["kind"] == "Pod":
        return obj["metadata"]["name"], obj["spec"]
    return f"{obj['metadata']['name']}-local", obj["spec"]["template"]["spec"]


@dataclasses.dataclass
class Container:
    """A running container: its process (launched and ready) and what it was given."""

    name: str
    pod: str
    launched: Launched
    env: dict[str, str]
    argv: list[str]
    grace_s: float

    @property
    def pid(self) -> int:
        return self.launched.pid

    def stop(self) -> None:
        """As the kubelet stops it: SIGTERM, SIGKILL after the grace period (its process group)."""
        if self.launched.process.poll() is not None:
            return
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.launched.process.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            self.launched.kill()


class Kubelet:
    """Runs containers as if on one node, `node_name`, whose pods get `secrets` (Secret name -> key -> value)."""

    def __init__(self, root: pathlib.Path, node_name: str, secrets: Mapping[str, Mapping[str, str]],
                 image_env: Mapping[str, str], namespace: str = "cornserve") -> None:
        self.root = root
        self.node_name = node_name
        self.ip = this_machine_ip()
        self.secrets = secrets
        self.image_env = dict(image_env)
        self.namespace = namespace
        self.started: list[Container] = []

    def run(self, obj: dict, container_name: str, timeout_s: float = START_TIMEOUT_S) -> Container:
        """Start the container and return once its readiness probe passes."""
        pod, spec = pod_of(obj)
        (container,) = [c for c in spec["containers"] if c["name"] == container_name]
        for port in container.get("ports", []):
            self._check_free(port["containerPort"], f"port {port.get('name', '')} of container {container_name}")
        folders = self._mounts(pod, spec, container)
        env = self._env(pod, container)
        argv = [expand(word, env) for word in container.get("command", []) + container.get("args", [])]
        env = {name: _local(value, folders) for name, value in env.items()}
        argv = [_local(word, folders) for word in argv]
        workdir = self.root / "pod" / pod / "workdir"
        workdir.mkdir(parents=True, exist_ok=True)
        probe = container["readinessProbe"]
        launched = start(argv, {**self.image_env, **env}, self.root / "logs" / f"{pod}-{container_name}.log",
                         self._readiness(probe, container, env), f"container {container_name} of pod {pod}",
                         cwd=workdir, process_group=0)
        running = Container(container_name, pod, launched, env, argv, float(spec.get("terminationGracePeriodSeconds", 30)))
        self.started.append(running)
        try:
            launched.wait_ready(timeout_s)
        except LaunchError as exc:
            raise AssertionError(str(exc)) from None
        if "grpc" in probe:
            self._check_grpc_health(probe["grpc"]["port"], probe["grpc"].get("service", ""))
        for port in container.get("ports", []):
            self._check_reachable(port, f"container {container_name} of pod {pod}")
        return running

    def stop_all(self) -> None:
        for container in reversed(self.started):
            container.stop()

    # -- what the kubelet gives a container ---------------------------------------------------------

    def _env(self, pod: str, container: dict) -> dict[str, str]:
        fields = {"spec.nodeName": self.node_name, "metadata.name": pod, "metadata.namespace": self.namespace,
                  "status.hostIP": self.ip, "status.podIP": self.ip}
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):  # first: `env` entries override them, as in Kubernetes
            ref = source["secretRef"]
            if ref["name"] not in self.secrets and not ref.get("optional", False):
                raise AssertionError(f"CreateContainerConfigError: secret {ref['name']} not found "
                                     f"(container {container['name']} of pod {pod})")
            env.update(self.secrets.get(ref["name"], {}))
        for variable in container.get("env", []):
            source = variable.get("valueFrom")
            if source is None:
                env[variable["name"]] = expand(variable.get("value", ""), env)
            elif "fieldRef" in source:
                env[variable["name"]] = fields[source["fieldRef"]["fieldPath"]]
            else:
                ref = source["secretKeyRef"]
                value = self.secrets.get(ref["name"], {}).get(ref["key"])
                if value is None and not ref.get("optional", False):
                    raise AssertionError(f"CreateContainerConfigError: secret {ref['name']} has no key {ref['key']} "
                                         f"(container {container['name']} of pod {pod})")
                if value is not None:
                    env[variable["name"]] = value
        return env

    def _mounts(self, pod: str, spec: dict, container: dict) -> dict[str, pathlib.Path]:
        """mount path -> the folder here that stands for it."""
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        folders = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "hostPath" in volume:
                host = volume["hostPath"]["path"]
                folder = pathlib.Path(host) if host == NODE_SHM else self.root / "node" / host.lstrip("/")
            else:
                assert "emptyDir" in volume, f"volume {mount['name']}: only emptyDir and hostPath run here"
                folder = self.root / "pod" / pod / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folders[mount["mountPath"]] = folder
        return folders

    def _readiness(self, probe: dict, container: dict, env: dict[str, str]) -> ReadyCommand | ReadySocket:
        if "exec" in probe:
            return ReadyCommand(tuple(probe["exec"]["command"]))
        action = probe.get("tcpSocket") or probe.get("grpc")
        assert action is not None, f"probe {probe}: only exec, tcpSocket and grpc run here"
        return ReadySocket(host=self.ip, port=_port(action["port"], container))

    def _check_grpc_health(self, port: int, service: str) -> None:
        with grpc.insecure_channel(f"{self.ip}:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, answer

    def _check_reachable(self, port: dict, what: str) -> None:
        """A declared port accepts connections at the pod's IP, as a Service, a peer or Prometheus
        reaches it, within PORT_TIMEOUT_S of readiness (a process may open it after the one its
        probe tests)."""
        deadline = time.monotonic() + PORT_TIMEOUT_S
        while not ReadySocket(host=self.ip, port=port["containerPort"]).accepts():
            assert time.monotonic() < deadline, (
                f"{what} declares port {port}, but nothing accepts connections there at the pod's IP {self.ip} "
                f"within {PORT_TIMEOUT_S:g} s of readiness (listening on 127.0.0.1 only?)")
            time.sleep(0.05)  # the next look

    def _check_free(self, port: int, what: str) -> None:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as exc:
                raise AssertionError(f"{what} is {port}, which deploy/ fixes, and it is taken on this machine "
                                     f"({exc}): free it and run again") from None


def _port(port: int | str, container: dict) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


def _local(value: str, folders: Mapping[str, pathlib.Path]) -> str:
    """`value` with a container path at or under a mount path as the folder here that stands for it."""
    for mount_path in sorted(folders, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(folders[mount_path]) + value[len(mount_path):]
    return value
