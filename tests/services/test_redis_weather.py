"""Redis blips are weather: a control plane rides out a restart of its Redis (same socket, data kept by
AOF), and one that finds, after an outage, that another control plane took its liveness key stops."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import pytest
import redis

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.services import control
from flyte_cornserve.services.control import control_plane_key
from flyte_cornserve.services.control_plane import HEARTBEAT_S

from ..restartable_redis import RestartableRedis
from ..stack import Stack

OUTAGE_S = 2 * HEARTBEAT_S  # the scenario: Redis is away for two heartbeats
TASK = EncoderTask(model_id="tiny-llava")


@pytest.fixture
def server() -> Iterator[RestartableRedis]:
    started = RestartableRedis()
    yield started
    started.close()


@pytest.fixture
def plane(server: RestartableRedis, tmp_path: pathlib.Path) -> Iterator[Stack]:
    stack = Stack(server.url, tmp_path / "control-plane.log", "--cpu", "4", "--memory", "8Gi", "--gpu", "0")
    yield stack
    stack.stop()


def _outage(server: RestartableRedis) -> None:
    server.stop()
    time.sleep(OUTAGE_S)  # the outage itself, not a wait for something to happen
    server.start()


def test_control_plane_keeps_its_heartbeat_and_serves_across_a_redis_restart(server, plane) -> None:
    sync = plane.sync_client()
    _outage(server)
    sync.delete(control_plane_key())  # as if it expired during a longer outage
    deadline = time.monotonic() + 10 * HEARTBEAT_S
    while (raw := sync.get(control_plane_key())) is None:
        assert plane.process.poll() is None, "the control plane exited"
        assert time.monotonic() < deadline, "the control plane's heartbeat did not come back"
        time.sleep(HEARTBEAT_S / 10)  # the poll's period
    assert json.loads(raw)["pid"] == plane.process.pid

    async def deploy_and_undeploy():
        client = plane.client()
        deployed = await control.request(client, "deploy", 300.0, task=TASK.to_json())
        undeployed = await control.request(client, "undeploy", 300.0, deployment_id=deployed["deployment"])
        await client.aclose()
        return deployed, undeployed

    deployed, undeployed = asyncio.run(deploy_and_undeploy())
    assert deployed["ok"] and undeployed == {"ok": True, "found": True}
    assert plane.process.poll() is None


def test_a_control_plane_whose_key_was_taken_during_an_outage_stops(server, plane, tmp_path) -> None:
    db = int(parse_qs(urlparse(plane.url).query)["db"][0])
    other = json.dumps({"pid": 1, "host": "elsewhere", "started_at": 0.0, "token": "another"})
    server.stop()
    # While the plane cannot reach it, another control plane takes the key (Redis on a socket of its
    # own, same folder and AOF: the real socket comes back already holding the other plane's key).
    side = server.directory / "side.sock"
    server.start(socket=side)
    redis.Redis(unix_socket_path=str(side), db=db).set(control_plane_key(), other, px=600_000)
    server.stop()
    server.start()
    plane.process.wait(60)
    deadline = time.monotonic() + 30
    while "stopping" not in (log := plane.log.read_text()):  # its output is copied to the log as it comes
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.05)  # the poll's period
    assert "another control plane" in log, log[-3000:]
    assert plane.sync_client().get(control_plane_key()).decode() == other  # left alone
