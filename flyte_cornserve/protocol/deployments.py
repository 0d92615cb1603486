"""What an executor writes about its deployment: its start-up phases.

The task manager (`services.task_manager`) and waiting clients (`services.control.StartFollower`)
read what `PhaseReporter` writes here; the other deployment keys, which only the control plane
writes, are in `services.control` (its docstring has the table of all of them).
"""

from __future__ import annotations

import json
import time

import redis

from flyte_cornserve.namespace import key

DEPLOYMENT_EVENTS_MAXLEN = 1000
PHASES_TTL_S = 3600  # an executor's phase outlives its start by this much, whoever removes it (or not)


def deployment_events_key() -> str:
    """The deployments' events stream: {deployment, event, detail}."""
    return key("deployments", "events")


def phases_key(deployment_id: str) -> str:
    """Each executor's latest start-up phase (field: executor id); see `PhaseReporter`."""
    return key("deployment", deployment_id, "phases")


def executor_key(executor_id: str) -> str:
    """An executor's heartbeat (a JSON string with a TTL): it exists while the executor lives."""
    return key("executor", executor_id)


class PhaseReporter:
    """An executor's start-up phases, reported to Redis (a `flyte_cornserve.phases` reporter).

    Each phase change sets the executor's field of the deployment's phases hash (what the task
    manager turns into the deployment's message) and appends a `phase` event to the deployments'
    events stream (what a waiting client reads, in order), in one transaction. Synchronous: phases
    are reported from whatever thread loads the model. The executor needs only the Redis URL and
    its deployment and executor ids.
    """

    def __init__(self, url: str, deployment_id: str, executor_id: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=10)
        self.deployment_id = deployment_id
        self.executor_id = executor_id

    def __call__(self, phase: str, step: str) -> None:
        key = phases_key(self.deployment_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, self.executor_id, json.dumps({"phase": phase, "step": step, "at": time.time()}))
            pipe.expire(key, PHASES_TTL_S)
            pipe.xadd(deployment_events_key(), {"deployment": self.deployment_id, "event": "phase",
                                              "detail": f"{self.executor_id} {phase} {step}", "phase": phase,
                                              "step": step, "executor": self.executor_id},
                      maxlen=DEPLOYMENT_EVENTS_MAXLEN, approximate=True)
            pipe.execute()

    def close(self) -> None:
        self.client.close()
