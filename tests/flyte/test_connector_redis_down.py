"""CreateTask while the stack's Redis is down (stopped, or restarting): a retryable failure that
names the Redis (without its credentials), not a gRPC error, so Propeller retries the node.

Real processes: `pyflyte serve connector` over gRPC (`tests/connector.py`) and a real redis-server
that the test stops (`tests/restartable_redis.py`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core.execution_pb2 import TaskExecution

from cornserve_builtins.encoder import EncoderTask

from ..connector import ConnectorProcess
from ..restartable_redis import RestartableRedis
from .test_connector_grpc import CATEGORY, IMAGE, literals, template

SECRET = "s3cret-pw"


@pytest.fixture
def redis_down() -> Iterator[RestartableRedis]:
    server = RestartableRedis()
    try:
        server.stop()
        yield server
    finally:
        server.close()


def test_create_with_redis_down_is_a_retryable_failure_naming_the_redis(redis_down: RestartableRedis, tmp_path) -> None:
    url = f"unix://cornserve:{SECRET}@{redis_down.socket}"
    connector = ConnectorProcess(url)
    try:
        reply = connector.stub.CreateTask(agent_pb2.CreateTaskRequest(
            template=template(EncoderTask(model_id="tiny-llava")), inputs=literals({"data": IMAGE}, {"data": str}),
            output_prefix=str(tmp_path / "out")))
        resource = connector.stub.GetTask(agent_pb2.GetTaskRequest(task_category=CATEGORY,
                                                                   resource_meta=reply.resource_meta)).resource
        assert resource.phase == TaskExecution.RETRYABLE_FAILED, (resource.phase, resource.message)
        assert "could not reach" in resource.message.lower() and str(redis_down.socket) in resource.message, \
            resource.message
        assert SECRET not in resource.message and SECRET not in reply.resource_meta.decode(errors="replace")
    finally:
        connector.stop()
