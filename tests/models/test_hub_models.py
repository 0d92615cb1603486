"""Hugging Face model ids: found in the Hugging Face cache, else downloaded into it (the "downloading
the model" phase), else an error that names the model and what to set.

huggingface_hub reads its settings (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN) from the
environment when it is imported, as an executor does when it starts: so each resolve here runs in a
child process with an environment of its own, against a local hub (`local_hub.py`) or none. The
end-to-end test deploys on a real stack whose executors download from the local hub.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from cornserve_builtins.encoder import EncoderTask, Modality
from flyte_cornserve.models import resolve_model
from flyte_cornserve.models.resolve import ModelNotFoundError
from flyte_cornserve.phases import DOWNLOADING_MODEL
from flyte_cornserve.protocol.deployments import deployment_events_key
from flyte_cornserve.services.control import ControlPlaneError
from flyte_cornserve.services.dispatcher import Dispatcher

from ..stack import Stack
from .local_hub import LocalHub, serve_hub

MODEL = "cornserve-test/tiny-llama"
CHILD_TIMEOUT_S = 120.0  # a hang guard, not a measure

CHILD = """
import json, sys
from flyte_cornserve import phases
from flyte_cornserve.models import resolve_model
from flyte_cornserve.models.resolve import ModelNotFoundError

phases.set_reporter(lambda name, step: print(json.dumps({"phase": [name, step]}), flush=True))
try:
    print(json.dumps({"path": str(resolve_model(sys.argv[1]))}))
except ModelNotFoundError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@dataclasses.dataclass
class Resolved:
    path: pathlib.Path | None
    error: str | None
    phases: list[tuple[str, str]]


def hf_env(hf_home: pathlib.Path, **settings: str) -> dict[str, str]:
    """This process's environment without any Hugging Face setting of its own, plus `settings`:
    HF_HOME, no telemetry, short timeouts."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5", **settings}


def resolve_in_child(model_id: str, env: dict[str, str]) -> Resolved:
    """`resolve_model(model_id)` in a new process with `env`, and the phases it reported."""
    done = subprocess.run([sys.executable, "-c", CHILD, model_id], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    end = lines[-1]
    return Resolved(pathlib.Path(end["path"]) if "path" in end else None, end.get("error"),
                    [tuple(line["phase"]) for line in lines[:-1]])


def put_in_cache(hf_home: pathlib.Path, repo_id: str, folder: pathlib.Path, commit: str) -> pathlib.Path:
    """`folder`'s files as the cached snapshot `commit` of `repo_id`, laid out as huggingface_hub lays out
    its cache: each file a blob named by its content's hash, linked from the snapshot; `refs/main` the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in folder.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def same_files(a: pathlib.Path, b: pathlib.Path) -> bool:
    def files(root: pathlib.Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    return files(a) == files(b)


@pytest.fixture(scope="module")
def tiny_llama() -> pathlib.Path:
    return resolve_model("tiny-llama")  # built here on first use


@pytest.fixture
def hub(tiny_llama: pathlib.Path) -> Iterator[LocalHub]:
    with serve_hub() as served:
        served.add(MODEL, tiny_llama)
        yield served


@pytest.fixture
def unreachable() -> Iterator[str]:
    """A URL where nothing listens: its port is bound here (so nobody else takes it) but not listening,
    so a connection to it is refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}"


# -- from the cache -----------------------------------------------------------------------------------

def test_a_cached_model_resolves_offline_to_its_snapshot(tiny_llama: pathlib.Path, tmp_path: pathlib.Path) -> None:
    snapshot = put_in_cache(tmp_path / "hf", MODEL, tiny_llama, "0123456789abcdef0123456789abcdef01234567")
    resolved = resolve_in_child(MODEL, hf_env(tmp_path / "hf", HF_HUB_OFFLINE="1"))
    assert resolved.error is None and resolved.path == snapshot, resolved
    assert resolved.phases == []  # nothing to download
    assert same_files(resolved.path, tiny_llama)


def test_offline_and_not_cached_is_an_error_that_says_what_to_set(tmp_path: pathlib.Path) -> None:
    resolved = resolve_in_child("some-org/some-model", hf_env(tmp_path / "hf", HF_HUB_OFFLINE="1"))
    assert resolved.path is None and resolved.phases == []
    message = resolved.error
    assert "'some-org/some-model'" in message and str(tmp_path / "hf" / "hub") in message, message
    assert "HF_HOME" in message and "HF_HUB_CACHE" in message, message  # where the cache is set
    assert "HF_HUB_OFFLINE" in message and "only that cache was looked at" in message, message
    assert "hf download some-org/some-model" in message and "local folder" in message, message  # fill it
    assert "HF_TOKEN" in message and "cornserve-hf-token" in message, message


def test_a_path_that_is_no_folder_is_no_model_id() -> None:
    with pytest.raises(ModelNotFoundError, match="model '/no/such/model' is neither a folder, a tiny model"):
        resolve_model("/no/such/model")


# -- downloaded -------------------------------------------------------------------------------------

def test_an_uncached_model_is_downloaded_into_the_cache_in_a_phase_of_its_own(
        hub: LocalHub, tiny_llama: pathlib.Path, tmp_path: pathlib.Path) -> None:
    env = hf_env(tmp_path / "hf", HF_ENDPOINT=hub.url)
    first = resolve_in_child(MODEL, env)
    assert first.error is None, first.error
    assert first.path == tmp_path / "hf" / "hub" / "models--cornserve-test--tiny-llama" / "snapshots" / hub.repos[MODEL].commit
    assert same_files(first.path, tiny_llama)
    assert first.phases == [(DOWNLOADING_MODEL, "begin"), (DOWNLOADING_MODEL, "end")]

    asked = len(hub.requests)
    again = resolve_in_child(MODEL, env)  # cached now: no request to the hub, no phase
    assert again.path == first.path and again.phases == [] and len(hub.requests) == asked
    offline = resolve_in_child(MODEL, {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.path == first.path

    weights = first.path / "model.safetensors"
    weights.resolve().unlink()  # its blob and its link: as a download interrupted before that file leaves it
    weights.unlink()
    asked = len(hub.requests)
    resumed = resolve_in_child(MODEL, env)  # not taken for cached: the download goes on
    assert resumed.path == first.path and same_files(resumed.path, tiny_llama)
    assert resumed.phases == [(DOWNLOADING_MODEL, "begin"), (DOWNLOADING_MODEL, "end")]
    assert [path for method, path in hub.requests[asked:] if method == "GET" and "/resolve/" in path] == [
        f"/{MODEL}/resolve/{hub.repos[MODEL].commit}/model.safetensors"]


def test_executors_of_one_node_downloading_one_model_at_once_get_each_file_once(
        hub: LocalHub, tiny_llama: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """huggingface_hub's file locks in the shared cache: whoever comes second waits and uses the first's
    file (whether the two overlap depends on timing; each file is fetched once either way)."""
    env = hf_env(tmp_path / "hf", HF_ENDPOINT=hub.url)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, MODEL], env=env, stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    paths = {json.loads(child.communicate(timeout=CHILD_TIMEOUT_S)[0].splitlines()[-1])["path"] for child in children}
    assert len(paths) == 1 and same_files(pathlib.Path(paths.pop()), tiny_llama), "not one complete snapshot"
    fetched = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert len(set(fetched)) == len(fetched) == len(hub.repos[MODEL].files), fetched


# -- not downloaded ---------------------------------------------------------------------------------

def test_an_unreachable_hub_is_an_error_that_names_it_and_what_to_set(unreachable: str, tmp_path: pathlib.Path) -> None:
    resolved = resolve_in_child("some-org/some-model", hf_env(tmp_path / "hf", HF_ENDPOINT=unreachable))
    message = resolved.error
    assert resolved.path is None and "'some-org/some-model'" in message, message
    assert f"the hub at {unreachable} could not be reached" in message and "Connection refused" in message, message
    assert "HF_ENDPOINT" in message and str(tmp_path / "hf" / "hub") in message, message
    assert "hf download some-org/some-model" in message and "local folder" in message, message
    assert resolved.phases == [(DOWNLOADING_MODEL, "begin")]  # it tried; the executor then fails with this


def test_a_model_the_hub_does_not_have_is_an_error_that_names_it(hub: LocalHub, tmp_path: pathlib.Path) -> None:
    resolved = resolve_in_child("some-org/some-model", hf_env(tmp_path / "hf", HF_ENDPOINT=hub.url))
    message = resolved.error
    assert f"the hub at {hub.url} has no model 'some-org/some-model'" in message, message
    assert "that can be read without a token (HF_TOKEN is not set)" in message and "cornserve-hf-token" in message, message


def test_a_gated_model_needs_a_token_that_may_read_it(hub: LocalHub, tiny_llama: pathlib.Path, tmp_path: pathlib.Path) -> None:
    hub.add("some-org/gated", tiny_llama, token="hf_granted")
    env = hf_env(tmp_path / "hf", HF_ENDPOINT=hub.url)

    without = resolve_in_child("some-org/gated", env).error
    assert f"the hub at {hub.url} refused it without a token (HF_TOKEN is not set): it is gated" in without, without
    assert "Set HF_TOKEN (on a cluster: the Secret cornserve-hf-token, key token)" in without, without
    wrong = resolve_in_child("some-org/gated", {**env, "HF_TOKEN": "hf_other"}).error
    assert "refused it with the token in HF_TOKEN: it is gated" in wrong and "'some-org/gated'" in wrong, wrong

    granted = resolve_in_child("some-org/gated", {**env, "HF_TOKEN": "hf_granted"})
    assert granted.error is None and same_files(granted.path, tiny_llama), granted


# -- in a deployment ----------------------------------------------------------------------------------

def test_a_deployment_shows_the_download_and_fails_with_what_to_set(
        hub: LocalHub, tiny_llama: pathlib.Path, redis_url: str, tmp_path: pathlib.Path) -> None:
    """A real stack whose executors download from the local hub: one deployment downloads its model
    (its executor reports the phase), another cannot (a gated model, no token) and its deploy fails
    with the executor's reason."""
    hub.add("some-org/gated", tiny_llama, token="hf_granted")
    downloaded = EncoderTask(model_id=MODEL, modality=Modality.TEXT)
    gated = EncoderTask(model_id="some-org/gated", modality=Modality.TEXT)
    env = {k: v for k, v in hf_env(tmp_path / "hf", HF_ENDPOINT=hub.url).items() if k.startswith("HF_")}
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "2", "--memory", "8Gi", env=env)
    try:
        asyncio.run(Dispatcher(stack.client()).deploy(downloaded))
        with pytest.raises(ControlPlaneError) as failed:
            asyncio.run(Dispatcher(stack.client()).deploy(gated))
        events = [{k.decode(): v.decode() for k, v in fields.items()}
                  for _, fields in stack.sync_client().xrange(deployment_events_key())]
    finally:
        stack.stop()
    mine = [(e["event"], e.get("phase"), e.get("step")) for e in events if e["deployment"] == downloaded.deployment_id()]
    assert mine[:3] == [("phase", DOWNLOADING_MODEL, "begin"), ("phase", DOWNLOADING_MODEL, "end"),
                        ("phase", "loading weights", "begin")], mine
    message = str(failed.value)
    assert f"deployment {gated.deployment_id()}" in message and "failed to start" in message, message
    assert "'some-org/gated'" in message and "it is gated" in message and "cornserve-hf-token" in message, message
