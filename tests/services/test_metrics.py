"""Prometheus metrics of every long-running process: found in Redis, scraped over HTTP, right.

The caption runs on the session's stack (the one tests/services/test_stack.py uses), so its executors
are usually warm; counts are compared before and after, as earlier tests ran invocations too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
import uuid

import pytest
import redis
import torch
from flytekit import workflow

from cornserve_builtins.llm import SamplingParams
from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve import metrics
from flyte_cornserve.flyte import call
from flyte_cornserve.protocol.invocations import InvocationStore, State
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.services.control import control_plane_info, load_deployment
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.task import TensorRef
from tests.processes import Sidecars

from ..scrape import eventually, exported_names, scrape, series
from ..stack import Stack, new_image

PROJECT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = str(PROJECT / "workflows" / "images" / "blue-circle-on-yellow.png")
DASHBOARD = PROJECT / "deploy" / "grafana" / "cornserve-dashboard.json"

CAPTION = MLLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=4))
ENCODER, LLM = CAPTION.encoder.deployment_id(), CAPTION.llm.deployment_id()
TERMINAL = [("DONE", ""), ("ERROR", "user"), ("ERROR", "recoverable"), ("CANCELLED", "")]


@workflow
def caption(image: str) -> str:
    return call(CAPTION, prompt="Describe the image.", images=[image]).text


def run(coroutine):
    return asyncio.run(coroutine)


def endpoints(stack: Stack) -> dict[str, metrics.Endpoint]:
    return {e.name: e for e in run(metrics.list_endpoints(stack.client()))}


def executor_of(stack: Stack, deployment_id: str) -> str:
    deployment = run(load_deployment(stack.client(), deployment_id))
    assert deployment is not None and len(deployment.executors) == 1
    return deployment.executors[0]


@pytest.fixture(scope="module")
def captioned(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One caption through the stack (an encoder invocation, then an LLM one), with every process's
    metrics scraped before and after it. Its image is new to the stack: its embeddings are put, not
    found in the cache."""
    image = new_image(IMAGE, tmp_path_factory.mktemp("caption"))
    async def deploy() -> None:
        dispatcher = Dispatcher(stack.client())
        await asyncio.gather(dispatcher.deploy(CAPTION.encoder), dispatcher.deploy(CAPTION.llm))

    run(deploy())
    names = {"control-plane": "control-plane", "encoder": f"executor:{executor_of(stack, ENCODER)}",
             "llm": f"executor:{executor_of(stack, LLM)}",
             "sidecar": f"sidecar:{run(control_plane_info(stack.client()))['sidecars']['local']}"}
    advertised = endpoints(stack)
    assert set(names.values()) <= set(advertised), f"not advertised: {set(names.values()) - set(advertised)}"
    urls = {process: advertised[name].url for process, name in names.items()}
    before = {process: scrape(url) for process, url in urls.items()}
    session_url = os.environ.get(ENV_URL)
    os.environ[ENV_URL] = stack.url  # the local run goes to the session's stack
    try:
        text = caption(image=str(image))
    finally:
        if session_url is None:
            del os.environ[ENV_URL]
        else:
            os.environ[ENV_URL] = session_url
    assert isinstance(text, str)
    records = run(InvocationStore(stack.client()).recent(2))
    by_deployment = {r.deployment_id: r for r in records}
    assert set(by_deployment) == {ENCODER, LLM} and all(r.state is State.DONE for r in records)
    embedding = TensorRef.model_validate(by_deployment[ENCODER].output["embeddings"])
    return {"names": names, "urls": urls, "before": before, "records": by_deployment, "embedding": embedding}


def delta(captioned: dict, process: str, after: dict, key) -> float:
    return after.get(key, 0.0) - captioned["before"][process].get(key, 0.0)


def test_the_control_plane_counts_each_invocation_once(captioned: dict) -> None:
    after = scrape(captioned["urls"]["control-plane"])
    for deployment in (ENCODER, LLM):
        changes = {(state, kind): delta(captioned, "control-plane", after, series(
            "cornserve_invocations_total", deployment=deployment, state=state, kind=kind)) for state, kind in TERMINAL}
        assert changes == {("DONE", ""): 1, ("ERROR", "user"): 0, ("ERROR", "recoverable"): 0, ("CANCELLED", ""): 0}, deployment
        assert after[series("cornserve_executors", deployment=deployment, state="serving")] == 1
        assert after[series("cornserve_queue_depth", deployment=deployment)] == 0
    assert after[series("cornserve_deployments", state="READY")] >= 2


@pytest.mark.parametrize("process", ["encoder", "llm"])
def test_each_executor_counts_its_invocation_once(captioned: dict, process: str) -> None:
    deployment = {"encoder": ENCODER, "llm": LLM}[process]
    record = captioned["records"][deployment]
    executor = captioned["names"][process].removeprefix("executor:")
    assert record.executor == executor
    url, ids = captioned["urls"][process], {"deployment": deployment, "executor": executor}
    done = series("cornserve_executor_invocations_total", **ids, state="DONE", kind="")
    in_flight = series("cornserve_executor_items_in_flight", **ids)

    def settled(now: dict) -> bool:  # counted, and the items let go of (the last of that bookkeeping)
        return delta(captioned, process, now, done) >= 1 and now[in_flight] == 0

    # an executor counts right after its outcome is stored, and that store is what wakes the caption
    eventually(lambda: settled(scrape(url)), f"the {process} executor to count its outcome")
    after = scrape(url)
    for state, kind in TERMINAL[:3]:
        assert delta(captioned, process, after, series("cornserve_executor_invocations_total", **ids, state=state,
                                                      kind=kind)) == (1 if state == "DONE" else 0)
    assert delta(captioned, process, after, series("cornserve_executor_run_seconds_count", **ids)) == 1
    assert delta(captioned, process, after, series("cornserve_executor_queue_wait_seconds_count", **ids)) == 1
    assert delta(captioned, process, after, series("cornserve_executor_batch_size_count", **ids)) == 1
    if process == "encoder":  # a new image: encoded and put
        lookups = {result: delta(captioned, process, after, series("cornserve_tensor_cache_lookups_total", **ids,
                                                                   result=result)) for result in ("hit", "miss")}
        assert lookups == {"hit": 0, "miss": 1}


def test_the_sidecar_counts_the_embedding_put(captioned: dict) -> None:
    after = scrape(captioned["urls"]["sidecar"])
    sidecar = captioned["names"]["sidecar"].removeprefix("sidecar:")
    embedding: TensorRef = captioned["embedding"]
    assert embedding.nbytes > 0 and embedding.location == sidecar
    assert delta(captioned, "sidecar", after, series("cornserve_sidecar_tensors_allocated_total", sidecar=sidecar)) == 1
    moved = {path: delta(captioned, "sidecar", after, series("cornserve_sidecar_bytes_total", sidecar=sidecar, path=path))
             for path in (metrics.LOCAL_PUT, metrics.TCP_SERVED, metrics.TCP_FETCHED)}
    assert moved == {metrics.LOCAL_PUT: embedding.nbytes, metrics.TCP_SERVED: 0, metrics.TCP_FETCHED: 0}
    assert after[series("cornserve_sidecar_arena_capacity_bytes", sidecar=sidecar)] > 0


def test_every_metric_the_dashboard_uses_is_exported(captioned: dict) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= dashboard["templating"]["list"][0].items()
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"] if panel["type"] != "row")
    used = {name for expr in exprs for name in re.findall(r"\bcornserve_[a-z0-9_]+", expr)}
    exported = set().union(*(exported_names(url) for url in captioned["urls"].values()))
    assert len(used) > 15
    assert not used - exported, f"the dashboard uses metrics no process exports: {sorted(used - exported)}"


def test_status_lists_the_metrics_endpoints(captioned: dict, stack: Stack) -> None:
    shown = subprocess.run(
        [sys.executable, "-c", "from flyte_cornserve.cli import main; main()", "status", "--invocations", "0"],
        env={**os.environ, ENV_URL: stack.url, "COLUMNS": "300"}, capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "metrics endpoints" in shown.stdout
    for process, url in captioned["urls"].items():
        where = endpoints(stack)[captioned["names"][process]]
        assert url in shown.stdout and re.search(rf"\b{where.pid}\b", shown.stdout), process


def test_endpoints_of_dead_processes_are_dropped_and_a_clean_exit_withdraws(redis_url: str) -> None:
    """A sidecar advertises while it lives; SIGTERM withdraws its entry; after a SIGKILL the entry
    stays in the hash until its membership expires, and is then neither listed nor kept."""
    pool = Sidecars(redis_url, f"test-{uuid.uuid4().hex[:10]}")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = pool.directory.metrics_key
    try:
        stopped, killed = pool.start(), pool.start(heartbeat_ttl=0.5)
        listed = {e.name: e for e in metrics.list_endpoints_sync(client, key)}
        assert set(listed) == {f"sidecar:{stopped.id}", f"sidecar:{killed.id}"}
        assert listed[f"sidecar:{killed.id}"].pid == killed.process.pid
        assert "cornserve_sidecar_arena_capacity_bytes" in exported_names(listed[f"sidecar:{killed.id}"].url)

        stopped.stop()
        assert client.hget(key, f"sidecar:{stopped.id}") is None  # withdrawn by the clean exit itself

        killed.kill()
        assert client.hget(key, f"sidecar:{killed.id}") is not None  # nobody withdrew it
        eventually(lambda: not pool.directory.is_alive(killed.id), "the killed sidecar's membership to expire")
        assert metrics.list_endpoints_sync(client, key) == []
        assert client.hget(key, f"sidecar:{killed.id}") is None  # the listing removed it
    finally:
        pool.close()


def test_bytes_pulled_across_sidecars_are_counted_on_both_ends(redis_url: str) -> None:
    pool = Sidecars(redis_url, f"test-{uuid.uuid4().hex[:10]}")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        a, b = pool.start(), pool.start()
        urls = {e.name: e.url for e in metrics.list_endpoints_sync(client, pool.directory.metrics_key)}
        tensor = torch.arange(1000, dtype=torch.float32)
        ref = pool.client(a).put(tensor)
        assert torch.equal(pool.client(b).get(ref, timeout=30), tensor)

        def moved(sidecar, path: str) -> float:
            return scrape(urls[f"sidecar:{sidecar.id}"])[series("cornserve_sidecar_bytes_total", sidecar=sidecar.id, path=path)]

        assert (moved(a, metrics.LOCAL_PUT), moved(b, metrics.TCP_FETCHED), moved(b, metrics.LOCAL_PUT)) == (ref.nbytes, ref.nbytes, 0)
        # the holder counts once its last byte is sent: the fetching side may have them a moment earlier
        eventually(lambda: moved(a, metrics.TCP_SERVED) == ref.nbytes, "the holder to count the bytes it served")
        on_b = scrape(urls[f"sidecar:{b.id}"])
        assert on_b[series("cornserve_sidecar_tensors_allocated_total", sidecar=b.id)] == 1  # the copy
    finally:
        pool.close()


def test_a_put_that_waits_for_room_is_counted(redis_url: str) -> None:
    pool = Sidecars(redis_url, f"test-{uuid.uuid4().hex[:10]}")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        sidecar = pool.start(memory_cap="1MiB")
        url = metrics.list_endpoints_sync(client, pool.directory.metrics_key)[0].url
        first, second = pool.client(sidecar), pool.client(sidecar)
        big = torch.zeros(600 * 1024, dtype=torch.uint8)  # two do not fit under the cap
        held = first.put(big)
        with concurrent.futures.ThreadPoolExecutor(1) as pool_of_one:
            waiting = pool_of_one.submit(second.put, big, timeout=60)
            eventually(lambda: first.stats().waiting == 1, "the second put to wait for room")
            assert scrape(url)[series("cornserve_sidecar_alloc_waiting", sidecar=sidecar.id)] == 1
            first.release(held)
            waiting.result(timeout=60)
        after = scrape(url)
        assert after[series("cornserve_sidecar_alloc_waits_total", sidecar=sidecar.id)] == 1
        assert after[series("cornserve_sidecar_alloc_wait_seconds_total", sidecar=sidecar.id)] > 0
        assert after[series("cornserve_sidecar_alloc_waiting", sidecar=sidecar.id)] == 0
        assert after[series("cornserve_sidecar_tensors_allocated_total", sidecar=sidecar.id)] == 2
    finally:
        pool.close()
