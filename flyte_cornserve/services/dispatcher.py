"""The dispatcher: the submitting side of an invocation, with the semantics Flyte promises.

It routes an invocation to a deployment (the least-loaded deployed one among the task's routing
candidates), has the control plane deploy it on first use, enqueues it with its deadline, and
waits on Redis for the outcome. `run()` adds what FlytePropeller does on a cluster and flytekit's
local mode does not: the timeout is enforced (the executor aborts the invocation), recoverable
failures are retried with exponential backoff, user errors fail at once. Any number of `run()`s
may be under way at once: they share one reader of their completions and one deploy request per
deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.protocol.invocations import TERMINAL, ErrorKind, InvocationStore, Record, State, TensorPolicy
from flyte_cornserve.sidecar.directory import Lookups
from flyte_cornserve.task import (TaskInputError, TaskIO, TaskOptions, TensorRef, UnitTask, tensor_refs,
                                  unit_task_from_json)

from . import control
from .control import DeploymentState, load_deployment
from .completions import Completions
from .task_manager import describe

log = logging.getLogger(__name__)

#: a deployment may need to build a model and start an engine first
DEPLOY_TIMEOUT_S = 900.0
#: waiting for an invocation without a timeout of its own: re-check this often that it still exists
WAIT_SLICE_S = 60.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0


def backoff_s(attempt: int) -> float:
    """How long to wait before retrying after failed attempt number `attempt` (1, 2, ...)."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))

#: progress(message): what is under way now (a live line). If it also has `note(message)` (as
#: `flyte.progress.ProgressLine` has), lines that stay go there: each start-up phase of a deployment
#: that ended, with its duration; otherwise they go to the callable too.
Progress = Callable[[str], None]


class InvocationFailed(RuntimeError):
    """The invocation ended in ERROR or CANCELLED; `record` says how (error, kind, attempts)."""

    def __init__(self, message: str, record: Record) -> None:
        super().__init__(message)
        self.record = record

    @property
    def retryable(self) -> bool:
        return self.record.error_kind is ErrorKind.RECOVERABLE


class InputTensorGone(TaskInputError):
    """An input `TensorRef` whose tensor is gone and cannot be computed again (its input was inline
    data, which a ref does not carry): no retry can help."""


def tensor_policy(options: TaskOptions) -> TensorPolicy:
    """How the executor keeps the tensors an invocation of a task with `options` puts."""
    ttl = options.tensor_ttl
    return TensorPolicy(cache=options.tensor_cache, ttl_s=None if ttl is None else ttl.total_seconds())


@dataclass(frozen=True)
class Submission:
    invocation_id: str
    deployment_id: str
    task: UnitTask  # the routing candidate that serves it
    timeout_s: float | None
    ended: asyncio.Future[State] | None = None  # resolved with its terminal state, if watched


class Dispatcher:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self.store = InvocationStore(client)
        self.completions = Completions(client)
        self._deploying: dict[str, asyncio.Future[None]] = {}  # one deploy request per deployment at a time
        self.tensors = Lookups(client)

    async def route(self, task: UnitTask) -> UnitTask:
        """The candidate whose deployment is least loaded (queued + running per executor); the
        preferred one when none is deployed yet."""
        return (await self.choose(task))[0]

    async def choose(self, task: UnitTask) -> tuple[UnitTask, str]:
        """`route()`, and why: the routing choice a node's deck shows."""
        candidates = task.routing_candidates()
        if len(candidates) == 1:
            return candidates[0], "the task's only candidate"
        loads = []
        for rank, candidate in enumerate(candidates):
            deployment = await load_deployment(self.redis, candidate.deployment_id())
            if deployment is None or deployment.state is not DeploymentState.READY:
                continue
            backlog = await self.store.backlog(deployment.id)
            loads.append((backlog / max(1, len(deployment.executors)), rank, candidate))
        if not loads:
            return candidates[0], f"none of its {len(candidates)} candidates deployed: the preferred one"
        load, _, chosen = min(loads, key=lambda load: load[:2])
        others = ", ".join(f"{describe(c)} {l:g}" for l, _, c in loads if c is not chosen)
        return chosen, f"least backlog per executor among {len(loads)} deployed candidates ({load:g}" + (
            f"; {others})" if others else ")")

    async def deploy(self, task: UnitTask, progress: Progress | None = None, wait: bool = True) -> str:
        """Make sure `task` is deployed (and READY, if `wait`) with its `replicas` bounds; return its
        deployment id."""
        deployment_id = task.deployment_id()
        deployment = await load_deployment(self.redis, deployment_id)
        if (deployment is not None and deployment.state is DeploymentState.READY
                and deployment.scaling == task.replicas.model_dump(mode="json")):
            await control.touch(self.redis, deployment_id)
            return deployment_id
        key = f"{deployment_id}:{wait}"
        pending = self._deploying.get(key)
        if pending is None:  # the first caller asks the control plane; the others wait for its answer
            pending = self._deploying[key] = asyncio.ensure_future(self._request_deploy(task, progress, wait))
            pending.add_done_callback(lambda _: self._deploying.pop(key, None))
        await asyncio.shield(pending)
        return deployment_id

    async def _request_deploy(self, task: UnitTask, progress: Progress | None, wait: bool) -> None:
        """Ask the control plane; meanwhile show the deployment's start-up phases as its first
        executor reports them (the deployments' events stream, read as they come)."""
        if progress is None or not wait:
            await control.request(self.redis, "deploy", DEPLOY_TIMEOUT_S, task=task.to_json(), wait=wait)
            return
        follower = await control.StartFollower.begin(self.redis, task.deployment_id(), describe(task), progress,
                                                     getattr(progress, "note", progress))
        following = asyncio.ensure_future(follower.run())
        try:
            await control.request(self.redis, "deploy", DEPLOY_TIMEOUT_S, task=task.to_json(), wait=wait)
        except BaseException:
            following.cancel()  # and if redis-py swallows that, `close()` still ends it
            follower.close()
            await asyncio.gather(following, return_exceptions=True)
            raise
        follower.close()  # its `ready` event came before the reply: it reads it and returns
        (shown,) = await asyncio.gather(following, return_exceptions=True)
        if isinstance(shown, Exception):  # what is shown never fails the deployment
            log.warning("could not show the start of %s: %s", task.deployment_id(), shown)

    async def submit(self, task: UnitTask, request: TaskIO | Mapping[str, Any], attempts: int = 1,
                     progress: Progress | None = None, wait_ready: bool = True, watch: bool = False) -> Submission:
        """Validate, route, deploy if needed, compute gone input tensors again (`resolve_tensors`),
        enqueue. Raises `TaskInputError` for bad input and `ControlPlaneError` for a deployment that
        is refused. Without `wait_ready` it enqueues as soon as the deployment is admitted (its
        executors pick the invocation up once they serve). With `watch`, `outcome()` learns of its
        end from this dispatcher's shared reader."""
        validated = task.validate_input(request)
        target, why = await self.choose(task)
        # its deployment starts while any of its input tensors that is gone is computed again
        deploying = asyncio.ensure_future(self.deploy(target, progress, wait=wait_ready))
        try:
            validated = await self.resolve_tensors(task, validated, progress)
        except BaseException:
            deploying.cancel()  # (the control plane goes on deploying: only this wait ends)
            await asyncio.gather(deploying, return_exceptions=True)
            raise
        deployment_id = await deploying
        timeout = task.options.timeout
        timeout_s = timeout.total_seconds() if timeout is not None else None
        payload = descriptor_for(target).encode_request(validated)
        invocation_id = uuid.uuid4().hex
        ended = await self.completions.expect(invocation_id) if watch else None
        await self.store.submit(deployment_id, payload, timeout_s=timeout_s, invocation_id=invocation_id,
                                max_attempts=attempts, label=describe(target), route=why,
                                notify=self.completions.key if watch else "", tensors=tensor_policy(task.options))
        return Submission(invocation_id, deployment_id, target, timeout_s, ended)

    async def resolve_tensors(self, task: UnitTask, request: TaskIO, progress: Progress | None = None) -> TaskIO:
        """The request, each input `TensorRef` whose tensor is gone (evicted, or its stack restarted
        since Flyte cached the ref) replaced by the tensor computed again: its producer re-run on the
        input its `source` names. Content addressing gives it the same id when nothing changed."""
        refs = {ref.id: ref for ref in tensor_refs(request)}
        if not refs:
            return request
        found = await self.tensors.pin_many(list(refs), [0] * len(refs))
        gone = [ref for ref, there in zip(refs.values(), found, strict=True) if there is None]
        if not gone:
            return request
        again = await asyncio.gather(*(self._recompute(task, ref, progress) for ref in gone))
        replaced = {old.id: new.model_dump(mode="json") for old, new in zip(gone, again, strict=True)}
        return task.validate_input(_replace_refs(request.model_dump(mode="json"), replaced))

    async def _recompute(self, task: UnitTask, ref: TensorRef, progress: Progress | None) -> TensorRef:
        source = ref.source
        if source is None or not source.input:
            why = ("its input was inline data (a text or a data: URL), which a ref does not carry" if source
                   else "the ref does not say how it was computed")
            raise InputTensorGone(
                f"{describe(task)}: input tensor {ref.id} is gone (evicted, or its cornserve stack restarted since "
                f"the ref was made, e.g. by Flyte's cache) and cannot be computed again: {why}. Bump the producing "
                f"task's cache_version, or turn Flyte's cache off for it (TaskOptions(cache=False))")
        producer = unit_task_from_json(source.task)
        if progress is not None:  # a line that stays: the run did more than its graph shows
            getattr(progress, "note", progress)(
                f"{describe(task)}: input tensor {ref.id} is gone; computing it again with {describe(producer)} "
                f"from {source.input[:200]}")
        input_model, _ = producer.io_models()
        (field,) = [name for name, info in input_model.model_fields.items() if info.is_required()]
        output = await self.run(producer, {field: source.input}, progress)
        (new,) = tensor_refs(output)
        if new.source is not None and new.source.content != source.content:
            raise InputTensorGone(
                f"{describe(task)}: input tensor {ref.id} is gone, and its input {source.input!r} changed since it "
                f"was computed (its content digest was {source.content}, is {new.source.content}): computing it "
                f"again would not give the same tensor. Bump the producing task's cache_version, or turn Flyte's "
                f"cache off for it (TaskOptions(cache=False))")
        return new

    async def outcome(self, submission: Submission) -> Record:
        """Wait for the terminal record, and collect it; past the deadline, time the invocation out
        (recoverable).

        A watched submission waits on this dispatcher's shared reader (and every WAIT_SLICE_S looks
        at the record itself); any other on a blocking read of its own events stream."""
        deadline = None if submission.timeout_s is None else time.monotonic() + submission.timeout_s
        try:
            while True:
                remaining = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
                if submission.ended is None:
                    record = await self.store.wait(submission.invocation_id, max(0.0, remaining))
                else:
                    try:
                        await asyncio.wait_for(asyncio.shield(submission.ended), max(0.0, remaining))
                    except TimeoutError:
                        pass
                    record = await self.store.record(submission.invocation_id)
                if record.state not in TERMINAL and deadline is not None and time.monotonic() >= deadline:
                    await self.store.time_out(submission.invocation_id, submission.timeout_s or 0.0)
                    record = await self.store.record(submission.invocation_id)
                if record.state in TERMINAL:
                    await self.store.collect(record.id)
                    return record
        finally:
            self.completions.forget(submission.invocation_id)

    async def run(self, task: UnitTask, request: TaskIO | Mapping[str, Any],
                  progress: Progress | None = None, on_submit: Callable[[Submission], None] | None = None) -> TaskIO:
        """Run one invocation to its output, retrying recoverable failures `options.retries` times:
        a recoverable invocation error, and a recoverable `ControlPlaneError` (no control plane, or
        none answering, or one that went away) from deploying or submitting. A refusal (it does not
        fit) and a user error fail at once."""
        attempts = task.options.retries + 1
        used = 0
        while True:
            try:
                submission = await self.submit(task, request, attempts=attempts - used, progress=progress, watch=True)
            except control.ControlPlaneError as exc:
                used += 1
                if not exc.recoverable or used >= attempts:
                    raise
                backoff = backoff_s(used)
                if progress is not None:
                    progress(f"{describe(task)}: {exc}; retry {used} of {attempts - 1} in {backoff:g} s")
                await asyncio.sleep(backoff)  # the retry backoff itself
                continue
            if on_submit is not None:
                on_submit(submission)
            record = await self.outcome(submission)
            used += max(1, record.attempt)  # an executor death re-runs it within one submission
            if record.state is State.DONE:
                return descriptor_for(submission.task).decode_response(record.output or {})
            failure = failure_of(submission.task, record)
            if not failure.retryable or used >= attempts:
                raise failure
            backoff = backoff_s(used)
            if progress is not None:
                progress(f"{describe(submission.task)}: {record.error}; retry {used} of {attempts - 1} in {backoff:g} s")
            await asyncio.sleep(backoff)  # the retry backoff itself

    async def cancel(self, invocation_id: str) -> bool:
        return await self.store.cancel(invocation_id)


def _replace_refs(value: Any, replaced: dict[str, dict[str, Any]]) -> Any:
    """JSON `value` with each ref whose id is in `replaced` swapped for its replacement."""
    if isinstance(value, dict):
        if value.get("id") in replaced and {"shape", "dtype", "nbytes"} <= value.keys():
            return replaced[value["id"]]
        return {name: _replace_refs(item, replaced) for name, item in value.items()}
    if isinstance(value, list):
        return [_replace_refs(item, replaced) for item in value]
    return value


def failure_of(task: UnitTask, record: Record) -> InvocationFailed:
    """The error a caller sees: task, invocation, state, kind and the executor's message."""
    if record.state is State.CANCELLED:
        return InvocationFailed(f"{describe(task)} invocation {record.id} was cancelled", record)
    kind = record.error_kind.value if record.error_kind else "unknown"
    attempts = f", after {record.attempt} attempt(s)" if record.attempt > 1 else ""
    return InvocationFailed(
        f"{describe(task)} invocation {record.id} failed ({kind} error{attempts}): {record.error}", record
    )
