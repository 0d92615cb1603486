"""A unit task as a Flyte task of the custom type `cornserve`.

The TaskTemplate carries everything the connector needs to run it on a persistent executor: the
unit task's JSON, its execution descriptor and its deployment id (in `custom`), and the Flyte
metadata set in its `options`. Its interface is the unit task's input and output models, one Flyte
variable per field, so TensorRefs wire from node to node field by field.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
from typing import Any

from flytekit import FlyteContextManager
from flytekit.configuration import SerializationSettings
from flytekit.core.base_task import PythonTask, TaskMetadata
from flytekit.core.interface import Interface

from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.services.task_manager import describe
from flyte_cornserve.task import UnitTask

from . import tensor_ref_type  # noqa: F401  (registers the TensorRef transformer)
from .decks import DECK_TITLE
from .local_run import run_locally

TASK_TYPE = "cornserve"
#: the version of the TaskTemplate's `custom` this code writes. A template without one (written
#: before 0.2) has the same layout: `unit_task`, `descriptor`, `deployment_id`.
CUSTOM_SCHEMA = 1

_flyte_tasks: dict[str, CornserveTask] = {}


class CornserveTask(PythonTask):
    """Flyte's view of one unit task instance; executed through the cornserve connector, never in a pod."""

    def __init__(self, unit_task: UnitTask) -> None:
        input_model, output_model = unit_task.io_models()
        options = unit_task.options
        super().__init__(
            task_type=TASK_TYPE,
            name=flyte_task_name(unit_task),
            interface=Interface(
                inputs={name: info.annotation for name, info in input_model.model_fields.items()},
                outputs={name: info.annotation for name, info in output_model.model_fields.items()},
            ),
            metadata=TaskMetadata(
                retries=options.retries,
                timeout=options.timeout,
                cache=options.cache,
                cache_version=options.cache_version,
                interruptible=options.interruptible,
            ),
            enable_deck=True,  # the template's `generates_deck`: Propeller shows the deck the connector writes
        )
        self.unit_task = unit_task
        self.descriptor = descriptor_for(unit_task)

    def get_custom(self, settings: SerializationSettings) -> dict[str, Any]:
        return {
            "schema": CUSTOM_SCHEMA,
            "unit_task": json.loads(self.unit_task.to_json()),
            "descriptor": self.descriptor.spec(),
            "deployment_id": self.unit_task.deployment_id(),
        }

    def execute(self, **kwargs: Any) -> Any:
        """Local `pyflyte run`: run on the (embedded) stack's executor, waiting on Redis."""
        return run_locally(self.unit_task, kwargs)

    def _write_decks(self, native_inputs: Any, native_outputs_as_map: Any, ctx: Any, new_user_params: Any) -> None:
        """Local `pyflyte run`: write the node's deck (made by `run_locally`) as it is, self-contained,
        where flytekit writes a task's deck, and say where."""
        write_local_deck(describe(self.unit_task), new_user_params)


def write_local_deck(title: str, params: Any) -> None:
    """Write the deck a cornserve task added to its execution's decks, and print where it is."""
    html = next((deck.html for deck in reversed(params.decks) if deck.name == DECK_TITLE), None) if params else None
    if html is None:
        return
    folder = pathlib.Path(FlyteContextManager.current_context().file_access.get_random_local_directory())
    path = folder / "deck.html"
    path.write_text(html)
    print(f"cornserve: {title}: deck at file://{path}", file=sys.stderr, flush=True)


def flyte_task_name(unit_task: UnitTask) -> str:
    """Stable and unique per unit-task configuration, options included (they change the template)."""
    digest = hashlib.sha256(unit_task.to_json().encode()).hexdigest()[:12]
    return f"cornserve.{type(unit_task).__name__.lower()}.{digest}"


def flyte_task(unit_task: UnitTask) -> CornserveTask:
    """The one `CornserveTask` entity for this unit task (created once, reused by every node)."""
    key = unit_task.to_json()
    if key not in _flyte_tasks:
        _flyte_tasks[key] = CornserveTask(unit_task)
    return _flyte_tasks[key]
