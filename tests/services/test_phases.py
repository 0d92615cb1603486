"""Start-up phases: executors report them, the task manager shows them, a local run prints them.

The end-to-end test deploys a text encoder on `tiny-llama` in a stack whose `CORNSERVE_HOME` is
fresh, so its executor really builds the model (about 5 s) before it loads it.
"""

from __future__ import annotations

import pathlib
import re

import pytest
from flytekit import workflow

from cornserve_builtins.encoder import EncoderTask, Modality
from flyte_cornserve import phases
from flyte_cornserve.flyte import call
from flyte_cornserve.flyte.progress import ProgressLine
from flyte_cornserve.protocol.deployments import deployment_events_key
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.services.control import StartProgress, phase_message
from flyte_cornserve.task import TensorRef

from ..stack import Stack

TEXT_ENCODER = EncoderTask(model_id="tiny-llama", modality=Modality.TEXT)
LABEL = "EncoderTask tiny-llama"


@workflow
def embed(text: str) -> TensorRef:
    return call(TEXT_ENCODER, data=text).embeddings


# -- the pieces ---------------------------------------------------------------------------------------

def test_a_phase_reports_its_beginning_and_its_end_and_nothing_without_a_reporter() -> None:
    with phases.phase("loading weights"):  # no reporter: nothing happens
        pass
    reported: list[tuple[str, str]] = []
    phases.set_reporter(lambda name, step: reported.append((name, step)))
    try:
        with phases.phase("building the model"):
            pass
        with pytest.raises(ValueError), phases.phase("loading weights"):
            raise ValueError("a broken checkpoint")  # the executor fails; its log says why
    finally:
        phases.set_reporter(None)
    assert reported == [("building the model", "begin"), ("building the model", "end"), ("loading weights", "begin")]


def test_a_failing_reporter_does_not_fail_the_start() -> None:
    def broken(name: str, step: str) -> None:
        raise ConnectionError("redis went away")

    phases.set_reporter(broken)
    try:
        with phases.phase("loading weights"):
            loaded = True
    finally:
        phases.set_reporter(None)
    assert loaded


def test_the_deployment_message_is_the_phase_under_way_or_the_one_just_done() -> None:
    assert phase_message(None) is None
    assert phase_message({"phase": "loading weights", "step": "begin", "at": 12.5}) == ("loading weights", 12.5)
    assert phase_message({"phase": "loading weights", "step": "end", "at": 14.0}) == ("loading weights done", 0.0)


def test_a_start_shows_one_executors_phases_with_their_durations() -> None:
    view = StartProgress("LLMTask tiny-llava", started_ms=10_000, executor="x1")
    assert view.live(11_000) == "deploying LLMTask tiny-llava: starting the executor (1 s)"

    def feed(ms: int, **fields: str) -> list[str]:
        return view.feed(f"{ms}-0", {"deployment": "d", **fields})

    assert feed(12_000, event="phase", executor="x1", phase="building the model", step="begin") == []
    assert feed(12_500, event="phase", executor="x2", phase="building the model", step="begin") == []  # a replica
    assert view.live(15_400) == "deploying LLMTask tiny-llava: building the model (3 s)"
    assert feed(16_200, event="phase", executor="x1", phase="building the model", step="end") == [
        "LLMTask tiny-llava: building the model done in 4.2 s"]
    assert view.live(16_300) is None  # between two phases: the next one shows next
    assert feed(16_300, event="phase", executor="x2", phase="building the model", step="end") == []
    assert feed(16_300, event="phase", executor="x1", phase="starting the engine", step="begin") == []
    assert view.live(46_300) == "deploying LLMTask tiny-llava: starting the engine (30 s)"
    assert feed(46_400, event="phase", executor="x1", phase="starting the engine", step="end") == [
        "LLMTask tiny-llava: starting the engine done in 30.1 s"]
    assert not view.finished
    assert feed(46_500, event="ready", detail="x1,x2") == ["LLMTask tiny-llava: ready in 36.5 s"]
    assert view.finished


def test_without_a_terminal_each_step_is_one_line_and_each_phase_done_another(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    line = ProgressLine()
    line("starting the embedded cornserve stack (Redis, control plane)")
    for seconds in range(3):
        line(f"deploying LLMTask tiny-llava: starting the engine ({seconds} s)")
    line.note("LLMTask tiny-llava: starting the engine done in 30.1 s")
    line.close()
    assert capsys.readouterr().err.splitlines() == [
        "cornserve: starting the embedded cornserve stack (Redis, control plane)",
        "cornserve: deploying LLMTask tiny-llava: starting the engine",
        "cornserve: LLMTask tiny-llava: starting the engine done in 30.1 s",
    ]


def test_on_a_terminal_a_phase_done_line_replaces_the_live_line_and_stays(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    line = ProgressLine()
    line("deploying LLMTask tiny-llava: starting the engine (1 s)")
    line.note("LLMTask tiny-llava: starting the engine done in 30.1 s")
    line.close()
    printed = capsys.readouterr().err
    assert "deploying LLMTask tiny-llava: starting the engine (1 s)" in printed  # drawn live
    assert printed.count("cornserve: LLMTask tiny-llava: starting the engine done in 30.1 s\n") == 1


# -- end to end ---------------------------------------------------------------------------------------

def test_a_first_deployment_shows_its_named_phases_in_order_and_no_log_lines(
        redis_url: str, tmp_path: pathlib.Path, monkeypatch, capsys) -> None:
    home = tmp_path / "home"  # inside the project's .cache; no tiny model here yet: the executor builds it
    private = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "2", "--memory", "4Gi",
                    env={"CORNSERVE_HOME": str(home)})
    try:
        monkeypatch.setenv(ENV_URL, private.url)
        monkeypatch.setenv("TTY_COMPATIBLE", "0")  # what a log or CI shows
        capsys.readouterr()
        assert embed(text="a red square").shape[0] > 0
        printed = capsys.readouterr().err
        events = [{k.decode(): v.decode() for k, v in fields.items()}
                  for _, fields in private.sync_client().xrange(deployment_events_key())]
    finally:
        private.stop()

    # the executor reported its phases on the deployment's events stream, in order, then it was ready
    mine = [e for e in events if e["deployment"] == TEXT_ENCODER.deployment_id()]
    assert [(e["event"], e.get("phase"), e.get("step")) for e in mine] == [
        ("phase", "building the model", "begin"), ("phase", "building the model", "end"),
        ("phase", "loading weights", "begin"), ("phase", "loading weights", "end"), ("ready", None, None)]
    assert len({e["executor"] for e in mine if e["event"] == "phase"}) == 1

    # while it started the run printed its phases by name, each ended one once with its duration, and
    # no log line
    lines = [line for line in printed.splitlines() if line.startswith("cornserve:")]
    step = rf"cornserve: deploying {LABEL}: (starting the executor|building the model|loading weights)"
    done = rf"cornserve: {LABEL}: ((building the model|loading weights) done|ready) in \d+\.\d s"
    lines = lines[:next(i for i, line in enumerate(lines) if " ready in " in line) + 1]  # then the run goes on
    assert lines and all(re.fullmatch(step, line) or re.fullmatch(done, line) for line in lines), printed
    assert [re.sub(r" in \d+\.\d s$", "", line) for line in lines if re.fullmatch(done, line)] == [
        f"cornserve: {LABEL}: building the model done", f"cornserve: {LABEL}: loading weights done",
        f"cornserve: {LABEL}: ready"], printed
    building = lines.index(f"cornserve: deploying {LABEL}: building the model")  # it takes seconds: shown live
    assert building < next(i for i, line in enumerate(lines) if "building the model done" in line)
    # what the executor logged stays in its log file
    logs = "".join(path.read_text() for path in (home / "stack" / "logs").glob(f"{TEXT_ENCODER.deployment_id()[:24]}-*.log"))
    assert "building tiny model tiny-llama" in logs and "building tiny model" not in printed
