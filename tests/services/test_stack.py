"""The control plane end to end: real Redis, control plane, sidecar, encoder and vLLM executors.

Workflows run locally in this process as `pyflyte run` runs them (flytekit's local execution of
the `cornserve` tasks), against the session's stack.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from flytekit import workflow

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMInput, LLMTask, SamplingParams
from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve.flyte import call
from flyte_cornserve.flyte.decks import invocation_view
from flyte_cornserve.protocol.deployments import executor_key
from flyte_cornserve.protocol.invocations import ErrorKind, InvocationStore, State, events_key
from flyte_cornserve.redis_server import ASYNC_POOL_SIZE, ENV_URL, connect_async
from flyte_cornserve.services.control import (
    Deployment,
    control_plane_info,
    deployment_key,
    list_deployments,
    load_deployment,
)
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.task import Resources, TaskOptions, TensorRef

from ..html_deck import read_deck
from ..stack import Stack, wait_for_event

PROJECT = os.path.join(os.path.dirname(__file__), "..", "..")
IMAGE = os.path.join(PROJECT, "workflows", "images", "blue-circle-on-yellow.png")

SHORT = SamplingParams(max_tokens=8)
ASKER = LLMTask(model_id="tiny-llava", sampling=SHORT)
CAPTIONER = MLLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=12))
STRICT_ENCODER = EncoderTask(model_id="tiny-llava", options=TaskOptions(retries=3))
#: long generations: exactly 200 tokens
LONG = SamplingParams(max_tokens=200, ignore_eos=True)
HASTY = LLMTask(model_id="tiny-llava", sampling=LONG, options=TaskOptions(timeout=timedelta(milliseconds=1), retries=1))
HUGE = EncoderTask(model_id="tiny-llava", resources=Resources(cpu=64, memory="1Gi"))
ON_GPU = EncoderTask(model_id="tiny-llava", resources=Resources(cpu=1, memory="1Gi", gpu=1))


@workflow
def ask(prompt: str) -> str:
    return call(ASKER, prompt=prompt).text


@workflow
def describe(image: str) -> str:
    return call(CAPTIONER, prompt="Describe the image.", images=[image]).text


@workflow
def encode_strictly(data: str) -> TensorRef:
    return call(STRICT_ENCODER, data=data).embeddings


@workflow
def ask_hastily(prompt: str) -> str:
    return call(HASTY, prompt=prompt).text


@workflow
def encode_huge(data: str) -> TensorRef:
    return call(HUGE, data=data).embeddings


@workflow
def encode_on_gpu(data: str) -> TensorRef:
    return call(ON_GPU, data=data).embeddings


def run(coroutine):
    return asyncio.run(coroutine)


async def recent(stack: Stack, label: str, count: int = 50):
    return [r for r in await InvocationStore(stack.client()).recent(count) if r.label == label]


def executor_pid(stack: Stack, deployment_id: str) -> int:
    client = stack.sync_client()
    deployment = Deployment.from_redis(client.hgetall(deployment_key(deployment_id)))
    assert deployment.executors
    beat = client.get(executor_key(deployment.executors[0]))
    assert beat is not None, "the executor does not heartbeat"
    return json.loads(beat)["pid"]


def test_two_workflows_with_an_equivalent_llm_task_share_one_executor(use_stack: Stack) -> None:
    assert ask(prompt="Say something.")
    assert describe(image=IMAGE)
    llm = run(recent(use_stack, "LLMTask tiny-llava"))[:2]
    assert [r.state for r in llm] == [State.DONE, State.DONE]
    assert llm[0].deployment_id == llm[1].deployment_id == ASKER.deployment_id()
    assert llm[0].executor == llm[1].executor
    deployments = [d for d in run(list_deployments(use_stack.client())) if d.label == "LLMTask tiny-llava"]
    assert len(deployments) == 1 and len(deployments[0].executors) == 1


def test_a_user_error_fails_at_once_without_retry(use_stack: Stack) -> None:
    with pytest.raises(Exception, match=r"EncoderTask tiny-llava invocation \w+ failed \(user error\)") as raised:
        encode_strictly(data="/no/such/picture.png")
    assert "/no/such/picture.png" in str(raised.value)
    failed = [r for r in run(recent(use_stack, "EncoderTask tiny-llava")) if "/no/such/picture.png" in r.error]
    assert len(failed) == 1, "retries=3 must not retry a user error"
    assert failed[0].state is State.ERROR and failed[0].error_kind is ErrorKind.USER and failed[0].attempt == 1


def test_a_timeout_is_enforced_and_retried_as_recoverable(use_stack: Stack) -> None:
    before = {r.id for r in run(recent(use_stack, "LLMTask tiny-llava", 1000))}
    with pytest.raises(Exception, match=r"failed \(recoverable error.*timed out"):
        ask_hastily(prompt="Tell me a long story.")
    timed_out = [r for r in run(recent(use_stack, "LLMTask tiny-llava", 1000)) if r.id not in before]
    assert len(timed_out) == 2, "retries=1: the timed-out invocation runs twice"
    assert all(r.state is State.ERROR and r.error_kind is ErrorKind.RECOVERABLE and "timed out" in r.error
               for r in timed_out)


def test_a_deployment_that_does_not_fit_is_refused_naming_what_is_missing(use_stack: Stack) -> None:
    with pytest.raises(Exception, match=r"does not fit.*node local lacks cpu \(needs 64, [\d.]+ free\)"):
        encode_huge(data=IMAGE)
    with pytest.raises(Exception, match=r"does not fit.*group 'gpu'.*no node serves that group"):
        encode_on_gpu(data=IMAGE)
    deployed = {d.id for d in run(list_deployments(use_stack.client()))}
    assert HUGE.deployment_id() not in deployed and ON_GPU.deployment_id() not in deployed
    info = run(control_plane_info(use_stack.client()))
    assert info is not None  # the control plane lives on after refusing


def test_routing_picks_the_least_loaded_deployed_model(stack: Stack) -> None:
    llava, llama = LLMTask(model_id="tiny-llava", sampling=SHORT), LLMTask(model_id="tiny-llama", sampling=SHORT)
    either = LLMTask(model_id="tiny-llava", alternative_models=("tiny-llama",), sampling=SHORT)

    async def scenario() -> None:
        dispatcher = Dispatcher(stack.client())
        await asyncio.gather(dispatcher.deploy(llava), dispatcher.deploy(llama))
        assert (await dispatcher.route(either)).model_id == "tiny-llava"  # both idle: the preferred one

        for busy, other in ((llava, llama), (llama, llava)):
            pid = executor_pid(stack, busy.deployment_id())
            os.kill(pid, signal.SIGSTOP)  # frozen: what is queued for it stays queued
            try:
                held = [await dispatcher.submit(busy, LLMInput(prompt=f"hold {i}")) for i in range(2)]
                assert (await dispatcher.route(either)).model_id == other.model_id
                output = await dispatcher.run(either, LLMInput(prompt="Which model answers?"))
                assert output.text
                answered = (await dispatcher.store.recent(1))[0]
                assert answered.deployment_id == other.deployment_id() and answered.state is State.DONE
                assert answered.route.startswith("least backlog per executor among 2 deployed candidates")
            finally:
                os.kill(pid, signal.SIGCONT)
            for submission in held:
                assert (await dispatcher.outcome(submission)).state is State.DONE

    run(scenario())


def test_an_executor_killed_mid_invocation_is_restarted_and_the_invocation_completes_on_retry(stack: Stack) -> None:
    survivor = LLMTask(model_id="tiny-llama", sampling=LONG, options=TaskOptions(retries=1))

    async def scenario() -> int:
        dispatcher = Dispatcher(stack.client())
        await dispatcher.deploy(survivor)
        pid = executor_pid(stack, survivor.deployment_id())
        submissions = [await dispatcher.submit(survivor, LLMInput(prompt=f"story {i}"), attempts=2) for i in range(4)]
        # block until one of them runs, then freeze the executor so none can finish, then kill it
        last = {events_key(s.invocation_id): "0" for s in submissions}
        running = False
        while not running:
            for key, entries in await stack.client().xread(last, block=2000):
                for entry_id, fields in entries:
                    last[key.decode()] = entry_id
                    running = running or fields[b"state"] == b"RUNNING"
        os.kill(pid, signal.SIGSTOP)
        store = dispatcher.store
        interrupted = [s for s in submissions if (await store.record(s.invocation_id)).state is State.RUNNING]
        assert interrupted
        os.kill(pid, signal.SIGKILL)

        restarted = await asyncio.to_thread(wait_for_event, stack, survivor.deployment_id(), "executor-restarted")
        for submission in submissions:
            record = await dispatcher.outcome(submission)
            assert record.state is State.DONE, record.error
        for submission in interrupted:
            record = await store.record(submission.invocation_id)
            assert record.attempt == 2 and record.executor == restarted["detail"]
            # its deck tells both attempts apart, and why the second happened
            first, second = invocation_view(record).attempts
            assert (first.ended_at, first.outcome) == (None, "taken over: attempt 2: the executor that ran it "
                                                             "before stopped heartbeating (died)")
            assert second.executor == restarted["detail"] and second.outcome == "DONE"
            assert first.executor != second.executor
        deployment = await load_deployment(stack.client(), survivor.deployment_id())
        assert deployment is not None and deployment.restarts >= 1 and deployment.executors == [restarted["detail"]]
        return pid

    killed = run(scenario())
    with pytest.raises(ProcessLookupError):
        os.killpg(killed, 0)  # its whole process group is gone: no vLLM engine core left behind


def test_pyflyte_run_prints_a_caption(stack: Stack) -> None:
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "pyflyte"), "run", os.path.join(PROJECT, "workflows", "vlm.py"),
         "caption", "--image", IMAGE],
        env={**os.environ, ENV_URL: stack.url}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    caption = done.stdout.strip().splitlines()[-1]
    assert "background" in caption, done.stdout
    # each node's deck is written where flytekit writes a task's deck, and the run says where
    said = [line.split("deck at ", 1)[1] for line in done.stderr.splitlines() if "deck at file://" in line]
    assert len(said) == 2, done.stderr[-3000:]  # the encoder node and the LLM node
    for uri, title in zip(said, ("EncoderTask tiny-llava", "LLMTask tiny-llava")):
        deck = read_deck(pathlib.Path(uri.removeprefix("file://")))
        assert deck.root.find_all("h1")[0].text().strip() == title
        assert [row[1] for row in deck.rows("timeline", "event")] == ["CREATED", "QUEUED", "RUNNING", "DONE"]
        assert len(deck.rows("tensors", "tensor")) == 1  # the embedding: put (or found: a hit) by one, read by the other


def test_status_shows_deployments_executors_and_recent_invocations(stack: Stack) -> None:
    shown = subprocess.run(
        [sys.executable, "-c", "from flyte_cornserve.cli import main; main()", "status", "--invocations", "5"],
        env={**os.environ, ENV_URL: stack.url, "COLUMNS": "250"}, capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    deployment = ASKER.deployment_id()
    assert deployment in shown.stdout and "LLMTask tiny-llava" in shown.stdout and "READY" in shown.stdout
    assert "recent invocations" in shown.stdout and "DONE" in shown.stdout
    assert str(json.loads(stack.sync_client().get("cornserve:control-plane"))["pid"]) in shown.stdout


def test_idle_executors_stop_after_the_ttl(redis_url: str, tmp_path) -> None:
    quick = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "2", "--memory", "8Gi", "--idle-ttl", "2")
    encoder = EncoderTask(model_id="tiny-llava")
    try:
        async def use_once() -> int:
            dispatcher = Dispatcher(quick.client())
            await dispatcher.run(encoder, {"data": IMAGE})
            return executor_pid(quick, encoder.deployment_id())

        pid = run(use_once())
        stopped = wait_for_event(quick, encoder.deployment_id(), "stopped")
        assert "idle for more than 2 s" in stopped["detail"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert run(load_deployment(quick.client(), encoder.deployment_id())) is None
        nodes = run(control_plane_info(quick.client()))["nodes"]
        assert nodes[0]["free"] == nodes[0]["capacity"]  # its resources are free again
        output = run(Dispatcher(quick.client()).run(encoder, {"data": IMAGE}))  # used again: deployed again
        assert output.embeddings.shape[0] > 0
    finally:
        quick.stop()


def test_two_hundred_runs_at_once_share_a_few_connections(stack: Stack) -> None:
    """Regression: each waiting invocation held a pooled connection, and 128 at once raised redis-py's
    MaxConnectionsError. One reader now waits for all of a dispatcher's invocations."""
    quick = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=2))

    async def scenario() -> tuple[list[str], int]:
        dispatcher = Dispatcher(connect_async(stack.url, name="two-hundred"))
        outputs = await asyncio.gather(*(dispatcher.run(quick, LLMInput(prompt=f"question {i}")) for i in range(200)))
        mine = [c for c in await dispatcher.redis.client_list() if c["name"] == "two-hundred"]
        return [output.text for output in outputs], len(mine)

    texts, connections = run(scenario())
    assert len(texts) == 200 and all(isinstance(text, str) for text in texts)
    assert connections <= ASYNC_POOL_SIZE  # bounded, however many invocations are under way
