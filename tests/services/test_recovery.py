"""Recovery: children die with their control plane, a new control plane reconciles what Redis holds,
and an executor that keeps crashing backs off and ends in a FAILED deployment.

Real processes throughout: `cornserve up` (embedded, as `pyflyte run` starts it) or `cornserve up
--foreground` on the session's Redis (`tests/stack.py`), the cheap encoder as the executor.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import signal
from datetime import timedelta

import pytest
import redis

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.models import resolve_model
from flyte_cornserve.protocol.deployments import deployment_events_key
from flyte_cornserve.protocol.invocations import ErrorKind, State
from flyte_cornserve.services.control import control_plane_key, DeploymentState, load_deployment
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.services.stack import wait_for_exit
from flyte_cornserve.task import TaskOptions

from ..stack import Stack, wait_for_event
from .test_cli import cornserve, home  # noqa: F401  (the fixture: a home of its own)

PROJECT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = str(PROJECT / "workflows" / "images" / "blue-circle-on-yellow.png")
#: bounds the waits of a test that fails: the invocation's own timeout ends it
BOUNDED = TaskOptions(timeout=timedelta(seconds=60), retries=0)


def executor_pid(client: redis.Redis, deployment_id: str) -> int:
    executors = json.loads(client.hget(f"cornserve:deployment:{deployment_id}", "executors"))
    beat = client.get(f"cornserve:executor:{executors[0]}")
    assert beat is not None, "the executor does not heartbeat"
    return json.loads(beat)["pid"]


def sidecar_pid(client: redis.Redis) -> int:
    (sidecar_id,) = json.loads(client.get("cornserve:control-plane"))["sidecars"].values()
    return int(client.hget(f"cornserve:sidecar:{sidecar_id}", "pid"))


def sidecar_arena(client: redis.Redis) -> pathlib.Path:
    (sidecar_id,) = json.loads(client.get("cornserve:control-plane"))["sidecars"].values()
    member = {k.decode(): v.decode() for k, v in client.hgetall(f"cornserve:sidecar:{sidecar_id}").items()}
    return pathlib.Path(member["shm_dir"]) / member["arena"]


def kill_leftovers(pids: list[int]) -> None:
    """A failing test must not leave processes behind (only the ones this test looked up)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_killed_control_plane_takes_its_sidecar_executors_and_redis_with_it(home: pathlib.Path) -> None:  # noqa: F811
    task = EncoderTask(model_id=str(resolve_model("tiny-llava")))
    cornserve(home, "up", "--cpu", "2", "--memory", "4Gi")
    state = json.loads((home / "stack" / "stack.json").read_text())
    cornserve(home, "deploy", task.to_json())
    client = redis.Redis.from_url(state["redis_url"])
    pids = {"control plane": state["pid"], "executor": executor_pid(client, task.deployment_id()),
            "sidecar": sidecar_pid(client), "redis": int(client.info("server")["process_id"])}
    arena = sidecar_arena(client)
    client.close()
    try:
        os.kill(state["pid"], signal.SIGKILL)
        survivors = [name for name, pid in pids.items() if not wait_for_exit(pid, 30.0)]
        assert not survivors, f"still running after the control plane was killed: {survivors}"
        assert not arena.exists(), f"the sidecar's arena {arena} was left in shared memory"
    finally:
        kill_leftovers(list(pids.values()))


def test_a_restarted_control_plane_restarts_the_executors_of_ready_deployments(redis_url: str, tmp_path) -> None:
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "2", "--memory", "8Gi")
    encoder = EncoderTask(model_id="tiny-llava", options=BOUNDED)
    leftovers: list[int] = []
    try:
        asyncio.run(Dispatcher(stack.client()).run(encoder, {"data": IMAGE}))
        client = stack.sync_client()
        executor, sidecar = executor_pid(client, encoder.deployment_id()), sidecar_pid(client)
        leftovers += [executor, sidecar]
        stack.process.kill()  # a crash: no clean stop, the deployment's record stays READY
        stack.process.wait()
        try:
            os.killpg(executor, signal.SIGKILL)  # its executor is gone too (it dies with its parent)
        except ProcessLookupError:
            pass
        assert wait_for_exit(executor, 30.0)
        stack._start()  # a new control plane on the same Redis

        async def invoke():
            dispatcher = Dispatcher(stack.client())
            return await dispatcher.outcome(await dispatcher.submit(encoder, {"data": IMAGE}))

        record = asyncio.run(invoke())
        assert record.state is State.DONE, record.error
    finally:
        stack.stop()
        kill_leftovers(leftovers)


def test_an_executor_that_keeps_crashing_backs_off_then_fails_its_deployment(redis_url: str, tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(resolve_model("tiny-llava"), model)
    encoder = EncoderTask(model_id=str(model), options=BOUNDED)
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "2", "--memory", "8Gi",
                  "--restart-limit", "3", "--restart-backoff", "0.1")
    leftovers: list[int] = []
    try:
        async def scenario():
            dispatcher = Dispatcher(stack.client())
            await dispatcher.deploy(encoder)
            client = stack.sync_client()
            pid = executor_pid(client, encoder.deployment_id())
            leftovers.append(pid)
            (model / "config.json").unlink()  # from now on an executor of this model cannot start
            os.kill(pid, signal.SIGSTOP)  # what is submitted now stays queued
            submission = await dispatcher.submit(encoder, {"data": IMAGE})
            os.kill(pid, signal.SIGKILL)
            return await dispatcher.outcome(submission)

        record = asyncio.run(scenario())
        assert record.state is State.ERROR and record.error_kind is ErrorKind.USER, (record.state, record.error)
        assert "exited 3 times" in record.error and "config.json" in record.error, record.error  # with the log tail
        deployment = asyncio.run(load_deployment(stack.client(), encoder.deployment_id()))
        assert deployment is not None and deployment.state is DeploymentState.FAILED
        assert deployment.executors == [], "no phantom executor id"
        assert "config.json" in deployment.message and deployment.restarts == 2
        exits = [e for _, e in stack.sync_client().xrange(deployment_events_key())
                 if e[b"deployment"].decode() == encoder.deployment_id() and e[b"event"] == b"executor-exited"]
        assert len(exits) == 3  # bounded: the limit, then no more restarts
        wait_for_event(stack, encoder.deployment_id(), "failed", 5.0)
    finally:
        stack.stop()
        kill_leftovers(leftovers)


def test_a_run_started_before_the_control_plane_is_up_is_retried_until_it_is(redis_url: str, tmp_path) -> None:
    """No control plane serves the Redis at the first attempt (a recoverable `ControlPlaneError`):
    the dispatcher retries it as it retries a recoverable invocation, and the control plane that
    comes up meanwhile (started once the first attempt failed) serves the retry."""
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "2", "--memory", "8Gi")
    stack.stop()  # a clean stop: the control plane's key is gone, so this Redis has none
    assert not stack.sync_client().exists(control_plane_key())
    encoder = EncoderTask(model_id="tiny-llava", options=TaskOptions(timeout=timedelta(seconds=60), retries=3))
    seen: list[str] = []

    def progress(message: str) -> None:
        seen.append(message)
        if "retry 1 of 3" in message and stack.process.poll() is not None:
            stack._start()  # the control plane comes up only after the first attempt failed

    try:
        output = asyncio.run(Dispatcher(stack.client()).run(encoder, {"data": IMAGE}, progress=progress))
        assert output.embeddings.shape == (16, 64)
        assert any("no cornserve control plane" in m and "retry 1 of 3" in m for m in seen), seen
    finally:
        stack.stop()


def group_members(pgid: int) -> list[int]:
    """The processes of a process group (from /proc)."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rpartition(")")[2].split()[2]) == pgid:
                    members.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return members


def test_down_after_a_crash_stops_what_the_dead_stack_left_running(home: pathlib.Path) -> None:  # noqa: F811
    """The worst case: the control plane's daemon is SIGKILLed *and* the guard watchers of its
    children are, so nothing ends the sidecar, the executor and the embedded Redis. `cornserve down`
    must find and stop them all, and remove the stale stack.json and the sidecar's arena."""
    task = EncoderTask(model_id=str(resolve_model("tiny-llava")))
    cornserve(home, "up", "--cpu", "2", "--memory", "4Gi")
    state = json.loads((home / "stack" / "stack.json").read_text())
    cornserve(home, "deploy", task.to_json())
    client = redis.Redis.from_url(state["redis_url"])
    (sidecar_id,) = json.loads(client.get("cornserve:control-plane"))["sidecars"].values()
    children = {"executor": executor_pid(client, task.deployment_id()), "sidecar": sidecar_pid(client),
                "redis": int(client.info("server")["process_id"])}
    client.close()
    arenas = list(pathlib.Path("/dev/shm").glob(f"cornserve_{sidecar_id}_*"))
    assert arenas, "the sidecar has an arena"
    watchers = [pid for child in children.values() for pid in group_members(child) if pid != child]
    assert len(watchers) == len(children), watchers  # one guard watcher in each child's group
    everything = [state["pid"], *children.values(), *watchers]
    try:
        for pid in watchers:
            os.kill(pid, signal.SIGKILL)
        assert all(wait_for_exit(pid, 30.0) for pid in watchers)
        os.kill(state["pid"], signal.SIGKILL)
        assert wait_for_exit(state["pid"], 30.0)
        assert not [name for name, pid in children.items() if wait_for_exit(pid, 0.0)], "the crash left them running"

        print(cornserve(home, "down").stdout)

        survivors = [name for name, pid in children.items() if not wait_for_exit(pid, 30.0)]
        assert not survivors, f"still running after `cornserve down`: {survivors}"
        assert not (home / "stack" / "stack.json").exists(), "the stale stack.json is left"
        assert not list(pathlib.Path("/dev/shm").glob(f"cornserve_{sidecar_id}_*")), "the sidecar's arena is left"
    finally:
        kill_leftovers(everything)
        for arena in pathlib.Path("/dev/shm").glob(f"cornserve_{sidecar_id}_*"):
            arena.unlink(missing_ok=True)
