"""The resource manager: which node an executor runs on, and what each node has left.

Every executor declares cpu / memory / gpu (its descriptor's `Resources`). Nodes have a capacity
and serve executor groups: `cpu` executors need no accelerator, `gpu` executors need at least one
GPU and a node in the `gpu` group. Placement is first fit over the nodes in order; what does not fit
anywhere is refused with an error that names the deployment, what it needs and what each node has
free, instead of being started into an overcommitted machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flyte_cornserve.task import Resources

GROUP_CPU = "cpu"
GROUP_GPU = "gpu"


class InsufficientResources(RuntimeError):
    """No node can take the executor: the message says what is missing where."""


@dataclass(frozen=True)
class Capacity:
    cpu: float
    memory_bytes: int
    gpu: int = 0

    @classmethod
    def of(cls, resources: Resources) -> Capacity:
        return cls(resources.cpu, resources.memory_bytes, resources.gpu)

    def __add__(self, other: Capacity) -> Capacity:
        return Capacity(self.cpu + other.cpu, self.memory_bytes + other.memory_bytes, self.gpu + other.gpu)

    def __sub__(self, other: Capacity) -> Capacity:
        return Capacity(self.cpu - other.cpu, self.memory_bytes - other.memory_bytes, self.gpu - other.gpu)

    def covers(self, need: Capacity) -> bool:
        return self.cpu + 1e-9 >= need.cpu and self.memory_bytes >= need.memory_bytes and self.gpu >= need.gpu

    def shortfall(self, need: Capacity) -> list[str]:
        """What `need` lacks here, in words: e.g. ['cpu 1 more (needs 1, 0 free)']."""
        missing = []
        if self.cpu + 1e-9 < need.cpu:
            missing.append(f"cpu (needs {need.cpu:g}, {max(self.cpu, 0):g} free)")
        if self.memory_bytes < need.memory_bytes:
            missing.append(f"memory (needs {_gib(need.memory_bytes)}, {_gib(max(self.memory_bytes, 0))} free)")
        if self.gpu < need.gpu:
            missing.append(f"gpu (needs {need.gpu}, {max(self.gpu, 0)} free)")
        return missing

    def describe(self) -> str:
        return f"cpu={self.cpu:g} memory={_gib(self.memory_bytes)} gpu={self.gpu}"


@dataclass
class Node:
    """A machine executors can run on. `groups` are the executor groups it serves."""

    name: str
    capacity: Capacity
    groups: frozenset[str] = frozenset({GROUP_CPU})
    reserved: dict[str, Capacity] = field(default_factory=dict)  # executor id -> what it holds

    @property
    def free(self) -> Capacity:
        used = Capacity(0, 0, 0)
        for held in self.reserved.values():
            used = used + held
        return self.capacity - used


def group_of(resources: Resources) -> str:
    return GROUP_GPU if resources.gpu > 0 else GROUP_CPU


class ResourceManager:
    """Accounts what every executor holds on which node."""

    def __init__(self, nodes: list[Node]) -> None:
        if not nodes:
            raise ValueError("the resource manager needs at least one node")
        self.nodes = {node.name: node for node in nodes}

    def reserve(self, executor_id: str, resources: Resources, what: str) -> Node:
        """Hold `resources` for `executor_id` on the first node that fits, or raise
        `InsufficientResources` naming `what` (e.g. "deployment llmtask-1a2b (LLMTask tiny-llava)")."""
        need, group = Capacity.of(resources), group_of(resources)
        in_group = [node for node in self.nodes.values() if group in node.groups]
        for node in in_group:
            if node.free.covers(need):
                node.reserved[executor_id] = need
                return node
        if not in_group:
            raise InsufficientResources(
                f"{what} does not fit: it needs an executor in group {group!r} ({need.describe()}), and no node "
                f"serves that group (nodes: {', '.join(f'{n.name} groups={sorted(n.groups)}' for n in self.nodes.values())})"
            )
        details = "; ".join(f"node {n.name} lacks {', '.join(n.free.shortfall(need))}" for n in in_group)
        raise InsufficientResources(
            f"{what} does not fit: one executor needs {need.describe()} in group {group!r}; {details}. "
            f"Undeploy something (`cornserve undeploy`) or give the stack more (`cornserve up --cpu/--memory/--gpu`)."
        )

    def node_of(self, executor_id: str) -> str | None:
        """The node holding `executor_id`'s reservation, if any."""
        return next((node.name for node in self.nodes.values() if executor_id in node.reserved), None)

    def home(self, resources: Resources) -> Node:
        """The first node serving `resources`' group (a deployment with no executor yet still has one)."""
        group = group_of(resources)
        for node in self.nodes.values():
            if group in node.groups:
                return node
        raise InsufficientResources(f"no node serves executor group {group!r}")

    def release(self, executor_id: str) -> None:
        for node in self.nodes.values():
            node.reserved.pop(executor_id, None)

    def usage(self) -> list[dict[str, object]]:
        """Per node: capacity, free, groups (for the status table)."""
        return [
            {"node": node.name, "groups": sorted(node.groups), "capacity": node.capacity.describe(),
             "free": node.free.describe(), "executors": len(node.reserved)}
            for node in self.nodes.values()
        ]


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g}Gi"
