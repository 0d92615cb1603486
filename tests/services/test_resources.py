"""Resource accounting: placement by group, refusal naming what is missing, release."""

from __future__ import annotations

import pytest

from flyte_cornserve.services.resources import Capacity, InsufficientResources, Node, ResourceManager
from flyte_cornserve.task import Resources

GiB = 2**30


def manager() -> ResourceManager:
    return ResourceManager([
        Node("cpu-node", Capacity(2, 8 * GiB), frozenset({"cpu"})),
        Node("gpu-node", Capacity(8, 64 * GiB, gpu=1), frozenset({"cpu", "gpu"})),
    ])


def test_cpu_executors_fill_the_first_node_then_the_next() -> None:
    resources = manager()
    placed = [resources.reserve(f"e{i}", Resources(cpu=1, memory="2Gi"), f"deployment d{i}").name for i in range(3)]
    assert placed == ["cpu-node", "cpu-node", "gpu-node"]
    assert resources.nodes["cpu-node"].free == Capacity(0, 4 * GiB)


def test_gpu_executors_go_only_to_gpu_nodes_and_are_refused_when_none_is_free() -> None:
    resources = manager()
    assert resources.reserve("g1", Resources(cpu=1, memory="4Gi", gpu=1), "deployment llm").name == "gpu-node"
    with pytest.raises(InsufficientResources, match=r"deployment llm2 does not fit.*group 'gpu'.*node gpu-node lacks "
                                                     r"gpu \(needs 1, 0 free\)"):
        resources.reserve("g2", Resources(cpu=1, memory="4Gi", gpu=1), "deployment llm2")


def test_refusal_names_every_missing_resource_and_holds_nothing() -> None:
    resources = manager()
    with pytest.raises(InsufficientResources) as refused:
        resources.reserve("big", Resources(cpu=16, memory="100Gi"), "deployment big (LLMTask huge)")
    message = str(refused.value)
    assert "deployment big (LLMTask huge) does not fit" in message
    assert "node cpu-node lacks cpu (needs 16, 2 free), memory (needs 100Gi, 8Gi free)" in message
    assert "node gpu-node lacks cpu (needs 16, 8 free), memory (needs 100Gi, 64Gi free)" in message
    assert all(not node.reserved for node in resources.nodes.values())


def test_a_group_no_node_serves_is_named() -> None:
    resources = ResourceManager([Node("local", Capacity(4, 8 * GiB), frozenset({"cpu"}))])
    with pytest.raises(InsufficientResources, match="needs an executor in group 'gpu'.*no node serves that group"):
        resources.reserve("g", Resources(gpu=1), "deployment g")


def test_release_frees_what_the_executor_held() -> None:
    resources = manager()
    resources.reserve("a", Resources(cpu=2, memory="8Gi"), "deployment a")
    with pytest.raises(InsufficientResources):
        resources.reserve("b", Resources(cpu=9, memory="1Gi"), "deployment b")
    resources.release("a")
    assert resources.nodes["cpu-node"].free == Capacity(2, 8 * GiB)
    assert resources.reserve("c", Resources(cpu=2, memory="8Gi"), "deployment c").name == "cpu-node"
