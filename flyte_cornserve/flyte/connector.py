"""The cornserve connector: how Flyte runs a `cornserve` task on a persistent executor.

On a cluster, FlytePropeller calls it through `pyflyte serve connector --modules
flyte_cornserve.flyte.connector`: `create()` validates the input, deploys the unit task on first
use and enqueues the invocation; `get()` maps its state to a Flyte phase, rewrites the node's deck
(`decks`) and the log links, and at the end writes the outputs as literals to `outputs.pb` under
the output prefix (a `TensorRef` stays metadata), where Propeller reads them and keeps the deck;
`delete()` cancels it. A recoverable failure (executor died, timeout, and at `create()` no control
plane there or none answering) is RETRYABLE_FAILED, so Flyte's retries apply; a user error (bad
input, a deployment the control plane refuses) is FAILED, and so is an invocation whose record is
gone (expired).

A local `pyflyte run` does not come here: `CornserveTask.execute()` calls `local_run.run_locally()`,
the same dispatcher in-process (`dispatchers.shared_dispatcher()`, shared with this module).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from flyteidl.core.execution_pb2 import TaskExecution, TaskLog
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.extend.backend.base_connector import AsyncConnectorBase, ConnectorRegistry, Resource, ResourceMeta
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskTemplate
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

from flyte_cornserve.decks.render import render_unit

from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.protocol.invocations import TERMINAL, ErrorKind, MalformedRecord, State
from flyte_cornserve.services.control import ControlPlaneError
from flyte_cornserve.services.dispatcher import InvocationFailed, failure_of
from flyte_cornserve.services.stack import current_url
from flyte_cornserve.services.task_manager import describe
from flyte_cornserve.task import TaskInputError, unit_task_from_json

from . import decks
from .dispatchers import shared_dispatcher
from .unit_task import CUSTOM_SCHEMA, TASK_TYPE

_PHASES = {
    State.CREATED: TaskExecution.QUEUED,
    State.QUEUED: TaskExecution.QUEUED,
    State.RUNNING: TaskExecution.RUNNING,
    State.DONE: TaskExecution.SUCCEEDED,
    State.CANCELLED: TaskExecution.ABORTED,
}


@dataclass
class CornserveMetadata(ResourceMeta):
    """What Flyte keeps between calls: which invocation, of which routed unit task (its deadline
    is in the invocation's record)."""

    invocation_id: str = ""
    task: str = ""  # the unit task that serves it (the routing candidate), as JSON
    error: str = ""  # not submitted at create(): get() fails it with this message
    #: the create() error is infrastructure trouble (no control plane, or none answered): get() says
    #: RETRYABLE_FAILED, so Flyte's retries apply; else (bad input, a deployment refused) FAILED
    retryable: bool = False
    output_prefix: str = ""  # where the outputs and the deck go ("": outputs inline, no deck)


class CornserveConnector(AsyncConnectorBase):
    name = "Cornserve Connector"

    def __init__(self) -> None:
        super().__init__(task_type_name=TASK_TYPE, metadata_type=CornserveMetadata)

    async def create(self, task_template: TaskTemplate, output_prefix: str | None = None,
                     inputs: LiteralMap | None = None, **kwargs: Any) -> CornserveMetadata:
        custom = task_template.custom or {}
        refused = _unreadable_custom(task_template.id.name, custom)
        if refused:
            return CornserveMetadata(error=refused)
        unit_task = unit_task_from_json(json.dumps(custom["unit_task"]))
        input_model, _ = unit_task.io_models()
        types = {name: field.annotation for name, field in input_model.model_fields.items()}
        unknown = sorted(set((inputs or LiteralMap({})).literals) - set(types))
        if unknown:  # not the task's interface (flytekit's conversion would fail with a bare KeyError)
            return CornserveMetadata(error=_bounded(f"{describe(unit_task)}: unknown input(s) "
                                                    f"{', '.join(map(repr, unknown))}; it takes {', '.join(types)}"))
        try:
            try:
                request = await TypeEngine._literal_map_to_kwargs(
                    FlyteContextManager.current_context(), inputs or LiteralMap({}), types)
            except (ValueError, TypeError, AssertionError) as exc:  # a literal of another type than its field's
                raise TaskInputError(f"{describe(unit_task)}: {_conversion_error(exc)}") from None
            # Propeller's CreateTask call is short-lived: enqueue once the deployment is admitted
            submission = await (await shared_dispatcher()).submit(unit_task, request, wait_ready=False)
        except ControlPlaneError as exc:  # a refusal, or no control plane there to answer
            return CornserveMetadata(error=f"{describe(unit_task)}: {exc}", retryable=exc.recoverable)
        except InvocationFailed as exc:  # re-computing a gone input tensor failed (`Dispatcher.resolve_tensors`)
            return CornserveMetadata(error=_bounded(f"{describe(unit_task)}: {exc}"), retryable=exc.retryable)
        except (RedisConnectionError, RedisTimeoutError) as exc:  # Redis down or restarting: a later try may reach it
            return CornserveMetadata(error=_bounded(_redis_unreachable(unit_task, exc)), retryable=True)
        except (TaskInputError, ValueError, TypeError) as exc:  # retrying cannot help
            return CornserveMetadata(error=_bounded(str(exc)))
        return CornserveMetadata(invocation_id=submission.invocation_id, task=submission.task.to_json(),
                                 output_prefix=output_prefix or "")

    async def get(self, resource_meta: CornserveMetadata, **kwargs: Any) -> Resource:
        if resource_meta.error:
            return Resource(phase=TaskExecution.RETRYABLE_FAILED if resource_meta.retryable else TaskExecution.FAILED,
                            message=resource_meta.error)
        dispatcher = await shared_dispatcher()
        try:
            record = await dispatcher.store.record(resource_meta.invocation_id)
            if record.state not in TERMINAL and record.deadline and time.time() >= record.deadline:
                await dispatcher.store.time_out(record.id, record.deadline - record.created_at)
                record = await dispatcher.store.record(record.id)
        except KeyError:  # its record went (docs/protocol.md, "Retention"), or this is another Redis
            return Resource(phase=TaskExecution.FAILED,
                            message=f"invocation {resource_meta.invocation_id} is unknown or expired: its record "
                                    f"is not in this cornserve stack's Redis")
        except MalformedRecord as exc:  # written by hand or corrupted: no retry reads it better
            return Resource(phase=TaskExecution.FAILED,
                            message=_bounded(f"{describe(unit_task_from_json(resource_meta.task))}: {exc}"))
        if record.state in TERMINAL:  # Propeller has it once this answers; a repeated get still finds it
            await dispatcher.store.collect(record.id)
        task = unit_task_from_json(resource_meta.task)
        prefix = resource_meta.output_prefix
        links = await decks.log_links(dispatcher.redis, decks.executors_of(record)) + decks.deck_link(prefix)
        log_links = [TaskLog(uri=link.uri, name=link.name) for link in links]
        if prefix:  # the deck first: Propeller keeps it only if it is there when the node succeeds
            view = await decks.unit_view(dispatcher.store, task, [record.id], links)
            await decks.write_deck(prefix, render_unit(view))
        if record.state is State.DONE:
            try:
                output = descriptor_for(task).decode_response(record.output or {})
            except ValueError as exc:  # a pydantic ValidationError: not what the task's executor writes
                return Resource(phase=TaskExecution.FAILED, log_links=log_links, message=_bounded(
                    f"invocation {record.id}: its record's output does not fit {describe(task)}'s outputs: {exc}"))
            literals = await _literals(output)
            if not prefix:
                return Resource(phase=TaskExecution.SUCCEEDED, message="done", outputs=literals, log_links=log_links)
            await decks.write_outputs(prefix, literals)
            return Resource(phase=TaskExecution.SUCCEEDED, message="done", log_links=log_links)
        if record.state is State.ERROR:
            retryable = record.error_kind is ErrorKind.RECOVERABLE
            return Resource(phase=TaskExecution.RETRYABLE_FAILED if retryable else TaskExecution.FAILED,
                            message=f"{_bounded(str(failure_of(task, record)))} {decks.failure_summary(record)}",
                            log_links=log_links)
        return Resource(phase=_PHASES[record.state], message=f"{record.state.value} on {record.executor or 'its queue'}",
                        log_links=log_links)

    async def delete(self, resource_meta: CornserveMetadata, **kwargs: Any) -> None:
        if resource_meta.invocation_id:
            await (await shared_dispatcher()).cancel(resource_meta.invocation_id)


#: the longest failure message: Propeller keeps it in the node's status (and create()'s in the resource meta)
MAX_MESSAGE = 8192


def _unreadable_custom(name: str, custom: dict[str, Any]) -> str:
    """Why this connector cannot read a template's `custom`, or "" if it can (schema 0, written
    before the schema was, has the layout of schema 1)."""
    if "unit_task" not in custom:
        return f"task {name}: its template's custom has no unit_task: not a cornserve task template"
    schema = custom.get("schema", 0)
    if not isinstance(schema, (int, float)) or schema > CUSTOM_SCHEMA:
        return (f"task {name}: its template's custom has schema {schema!r}, written by a newer flyte-cornserve than "
                f"this connector, which reads schema {CUSTOM_SCHEMA} and older: upgrade the connector's image")
    return ""


def _bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message) - limit} more characters)"


def _redis_unreachable(unit_task: Any, exc: Exception) -> str:
    """create()'s message when the stack's Redis did not answer: which Redis (its URL without
    credentials), and why; Propeller retries the node."""
    url = current_url()
    where = f" at {_redacted_url(url)}" if url else ""
    reason = _scrubbed(str(exc), url) if url else str(exc)
    return (f"{describe(unit_task)}: could not reach the cornserve stack's Redis{where} ({type(exc).__name__}: "
            f"{reason}); it may be down or restarting, the task will be retried")


def _redacted_url(url: str) -> str:
    """The URL without user name and password: `redis://user:pw@host/0?password=pw` -> `redis://host/0`."""
    parts = urlsplit(url)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + (f"?{query}" if query else "")


def _scrubbed(text: str, url: str) -> str:
    """`text` with the URL's user name and password (if it quotes them) replaced by `***`."""
    parts = urlsplit(url)
    for secret in {s for s in (parts.username, parts.password, *parse_qs(parts.query).get("password", [])) if s}:
        text = text.replace(secret, "***")
    return text


def _conversion_error(exc: Exception) -> str:
    """flytekit's conversion error without the literal it quotes (megabytes, for a huge string): the
    input, the type expected, and why."""
    kept = [line.strip() for line in str(exc).splitlines()
            if line.startswith(("Error converting input", "Expected Python type", "Exception:"))]
    return _bounded(" ".join(kept) if kept else str(exc), 2000)


async def _literals(output: Any) -> LiteralMap:
    """The output model's fields as a Flyte LiteralMap, typed by the model (TensorRef -> Struct)."""
    fields = type(output).model_fields
    return await TypeEngine._dict_to_literal_map(
        FlyteContextManager.current_context(), {name: getattr(output, name) for name in fields},
        {name: field.annotation for name, field in fields.items()},
    )


ConnectorRegistry.register(CornserveConnector(), override=True)

from . import batch_connector  # noqa: E402,F401  (this module name registers both connectors)
