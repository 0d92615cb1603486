"""Decks render to one self-contained HTML page: read back here with `html.parser`, as a browser would
build it (elements by id, a table's rows as cell texts), never by grepping the markup."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest

from flyte_cornserve.decks.render import MAX_POINTS, render_chunk, render_unit
from flyte_cornserve.decks.views import (
    Attempt,
    ChunkView,
    ExecutorShare,
    InvocationView,
    ItemError,
    Link,
    ProgressSample,
    StageSpan,
    StageStats,
    TensorTransfer,
    TimelineEvent,
    UnitNodeView,
    percentiles,
)

from ..html_deck import Node, Page, cells, parse

T = 1_714_557_600.0  # 2024-05-01 10:00:00 UTC


def assert_self_contained(page: Page, links: list[Link]) -> None:
    """An HTML5 document with nothing fetched from anywhere: the console may be offline."""
    assert [d.lower() for d in page.decls] == ["doctype html"]
    assert [m.attrs.get("charset") for m in page.root.find_all("meta")] == ["utf-8"]
    allowed = {link.uri for link in links}
    for node in page.root.walk():
        assert "src" not in node.attrs, f"<{node.tag} src=...>"
        for name, value in node.attrs.items():
            if name in ("href", "xlink:href", "action", "poster", "data"):
                assert value in allowed, f"<{node.tag} {name}={value!r}>"
    assert not page.root.find_all("link") and not page.root.find_all("iframe") and not page.root.find_all("img")
    for style in page.root.find_all("style") + [n for n in page.root.walk() if "style" in n.attrs]:
        css = (style.text() + style.attrs.get("style", "")).lower()
        assert "@import" not in css and "url(" not in css
    assert "url(http" not in page.raw.lower() and "@import" not in page.raw.lower()
    assert len(page.ids()) == len(set(page.ids())), "duplicate ids"


def clock(at: float) -> str:
    t = datetime.fromtimestamp(at)
    return t.strftime("%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def points(polyline: Node) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in polyline.attrs["points"].split())]


# --- views ----------------------------------------------------------------------------------------


def unit_view(**changes) -> UnitNodeView:
    """An LLM call that failed (out of memory) and ran again as a new invocation, whose first executor
    died and whose second one finished it."""
    first = InvocationView(
        invocation_id="0b7e4c2a91d54f0e8a3c6b1d2e9f7a10", state="ERROR", deployment_id="llm-tiny-llava-0",
        executor="exec-llm-7f9c", node="gpu-node-1", created_at=T, started_at=T + 0.012, finished_at=T + 0.950,
        error="CUDA out of memory", error_kind="recoverable",
        timeline=[TimelineEvent("CREATED", T), TimelineEvent("QUEUED", T + 0.001),
                  TimelineEvent("RUNNING", T + 0.012, "exec-llm-7f9c"),
                  TimelineEvent("ERROR", T + 0.950, "exec-llm-7f9c", "CUDA out of memory")],
        attempts=[Attempt(1, "exec-llm-7f9c", T + 0.012, T + 0.950, "ERROR: CUDA out of memory")],
        transfers=[TensorTransfer("get", "emb-91c2d4e5f6a7", (1, 576, 4096), "bfloat16", 4_718_592,
                                  "shared memory", 0.0031, T + 0.020)])
    second = InvocationView(
        invocation_id="5c1d8e7f3a2b4c6d9e0f1a2b3c4d5e6f", state="DONE", deployment_id="llm-tiny-llava-0",
        executor="exec-llm-9d03", node="gpu-node-2", created_at=T + 1.0, started_at=T + 3.5, finished_at=T + 4.25,
        timeline=[TimelineEvent("CREATED", T + 1.0), TimelineEvent("QUEUED", T + 1.002),
                  TimelineEvent("RUNNING", T + 1.120, "exec-llm-2b41"),
                  TimelineEvent("RUNNING", T + 3.5, "exec-llm-9d03", "attempt 2: the executor that ran it before died"),
                  TimelineEvent("DONE", T + 4.25, "exec-llm-9d03")],
        attempts=[Attempt(1, "exec-llm-2b41", T + 1.120, None, "taken over: executor died"),
                  Attempt(2, "exec-llm-9d03", T + 3.5, T + 4.25, "DONE")],
        transfers=[TensorTransfer("get", "emb-77aa0b1c2d3e", (1, 590, 64), "float32", 151_040,
                                  "cross-node from sidecar-gpu-node-1", 0.0184, T + 3.51),
                   TensorTransfer("put", "out-0c9d8e7f6a5b", (1, 32), "int64", 256, "shared memory", 0.0004,
                                  T + 4.24)])
    view = UnitNodeView(
        title="LLMTask tiny-llava", task_class="LLMTask", model="llava-hf/tiny-llava", deployment_id="llm-tiny-llava-0",
        routing="least loaded of 2 deployments serving llava-hf/tiny-llava", invocations=[first, second],
        generated_at=T + 5.0,
        links=[Link("executor log", "https://logs.example.com/exec-llm-9d03"), Link("dashboard", "/dashboards/llm")])
    return dataclasses.replace(view, **changes)


def stage(name: str, items: int, failed: int, queue: list[float], run: list[float]) -> StageStats:
    latency = [q + r for q, r in zip(queue, run)]
    return StageStats(name, items, failed, percentiles(queue), percentiles(run), percentiles(latency))


def chunk_view(**changes) -> ChunkView:
    """100 items through an encoder and an LLM, 30 s in: 37 done, 3 failed."""
    encoder, llm = "EncoderTask tiny-llava", "LLMTask tiny-llava"
    progress = [ProgressSample(T + 2 + s, done=min(37, s * 37 // 29), failed=min(3, s // 10)) for s in range(30)]
    spans = [StageSpan(encoder, f"exec-enc-{i % 2}", T + 2 + 2 * i, T + 3.5 + 2 * i, 8) for i in range(6)]
    spans += [StageSpan(llm, "exec-llm-9d03", T + 3.6 + 3 * i, T + 6.45 + 3 * i, 8) for i in range(8)]
    view = ChunkView(
        title="MLLMTask tiny-llava, chunk of 100 items", batch_id="batch-2024-05-01-a1", state="RUNNING", total=100,
        done=37, failed=3, cancelled=0, created_at=T, started_at=T + 2, finished_at=None, generated_at=T + 32,
        message="running on 3 executors",
        progress=progress,
        stages=[stage(encoder, 48, 0, [0.004 + i / 1000 for i in range(48)], [0.11 + i / 500 for i in range(48)]),
                stage(llm, 40, 3, [0.05 + i / 100 for i in range(40)], [1.2 + i / 50 for i in range(40)])],
        spans=spans,
        errors=[ItemError("item-0007", "ValueError: image is 0×0 pixels"),
                ItemError("item-0019", "timeout after 30 s"),
                ItemError("item-0042", "CUDA out of memory")],
        executors=[ExecutorShare("exec-enc-0", encoder, 24), ExecutorShare("exec-enc-1", encoder, 24),
                   ExecutorShare("exec-llm-9d03", llm, 40)],
        links=[Link("batch log", "https://logs.example.com/batch-2024-05-01-a1")])
    return dataclasses.replace(view, **changes)


# --- the unit deck --------------------------------------------------------------------------------


def test_unit_deck_is_self_contained() -> None:
    view = unit_view()
    page = parse(render_unit(view))
    assert_self_contained(page, view.links)
    assert page.root.find_all("h1")[0].text() == "LLMTask tiny-llava"
    assert not page.root.find_all("script")


def test_unit_timeline_has_one_row_per_event_in_order() -> None:
    view = unit_view()
    rows = parse(render_unit(view)).rows("timeline", "event")
    expected = [(inv, e) for inv in view.invocations for e in inv.timeline]
    assert len(rows) == len(expected) == 9
    for row, (inv, event) in zip(rows, expected):
        assert row[0] == inv.invocation_id[:8]
        assert row[1:3] == [event.state, clock(event.at)]
        assert float(row[3].lstrip("+")) == pytest.approx((event.at - inv.created_at) * 1000, abs=0.06)
        assert row[5:] == [event.executor, event.note]
    assert [r[1] for r in rows] == ["CREATED", "QUEUED", "RUNNING", "ERROR", "CREATED", "QUEUED", "RUNNING",
                                   "RUNNING", "DONE"]
    assert [r[5] for r in rows if r[1] == "RUNNING"] == ["exec-llm-7f9c", "exec-llm-2b41", "exec-llm-9d03"]
    # ms until the next event of the same invocation; none after an invocation's last event
    assert [r[4] for r in rows[4:]] == ["2.0", "118.0", "2380", "750.0", "–"]


def test_unit_summary_shows_the_last_invocation() -> None:
    summary = dict(parse(render_unit(unit_view())).rows("summary"))
    assert summary["state"] == "DONE"
    assert summary["executor"] == "exec-llm-9d03"
    assert summary["node"] == "gpu-node-2"
    assert summary["queue wait"] == "120.0 ms"  # created to the first pick-up, not the second one
    assert summary["run time"] == "750.0 ms"
    assert summary["total"] == "3250 ms"
    assert summary["attempts"] == "2"
    assert summary["task class"] == "LLMTask" and summary["model"] == "llava-hf/tiny-llava"
    assert summary["routing"].startswith("least loaded")


def test_unit_timeline_chart_draws_queue_and_each_attempt() -> None:
    page = parse(render_unit(unit_view()))
    chart = page.by_id("timeline-chart")
    assert chart.tag == "svg"
    segments = chart.find_all("rect", "segment")
    assert [s.find_all("title")[0].text().split(":")[0].split(" ")[0] for s in segments] == ["queued", "attempt",
                                                                                          "attempt"]
    assert ["wait", "off", "ok"] == [s.attrs["class"].split()[1] for s in segments]
    widths = [float(s.attrs["width"]) for s in segments]
    assert widths[1] > widths[2] > widths[0]  # 2380 ms, then 750 ms, queued 120 ms
    labels = [t.text() for t in chart.find_all("text")]
    assert "0 ms" in labels and "3000 ms" in labels


def test_unit_attempts_of_the_last_invocation() -> None:
    rows = parse(render_unit(unit_view())).rows("attempts", "attempt")
    assert rows == [["1", "exec-llm-2b41", clock(T + 1.12), "–", "–", "taken over: executor died"],
                    ["2", "exec-llm-9d03", clock(T + 3.5), clock(T + 4.25), "750.0 ms", "DONE"]]


def test_unit_tensors_table() -> None:
    page = parse(render_unit(unit_view()))
    rows = page.rows("tensors", "tensor")
    assert [r[:4] for r in rows] == [["get", "emb-91c2", "1×576×4096", "bfloat16"],
                                     ["get", "emb-77aa", "1×590×64", "float32"],
                                     ["put", "out-0c9d", "1×32", "int64"]]
    assert [r[4] for r in rows] == ["4.5 MiB", "147.5 KiB", "256 B"]
    assert [cells(tr)[4].attrs["data-bytes"] for tr in page.row_nodes("tensors", "tensor")] == [
        "4718592", "151040", "256"]
    assert rows[1][5:] == ["cross-node from sidecar-gpu-node-1", "18.4"]


def test_unit_without_tensors_says_so() -> None:
    view = unit_view(invocations=[dataclasses.replace(inv, transfers=[]) for inv in unit_view().invocations])
    page = parse(render_unit(view))
    assert page.row_nodes("tensors", "tensor") == []
    assert page.rows("tensors") == [["no tensors read or written"]]


def test_error_box_only_when_the_last_invocation_failed() -> None:
    view = unit_view()
    assert parse(render_unit(view)).get("error") is None  # the first invocation's error is history
    failed = dataclasses.replace(view.invocations[-1], state="ERROR", error="Engine died: <oom> & more",
                                 error_kind="fatal")
    page = parse(render_unit(unit_view(invocations=[view.invocations[0], failed])))
    assert page.text_of("error") == "fatal: Engine died: <oom> & more"
    assert dict(page.rows("summary"))["state"] == "ERROR"


def test_text_is_escaped() -> None:
    view = unit_view()
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    last = view.invocations[-1]
    ended = TimelineEvent("ERROR", T + 4.25, "exec-llm-9d03", hostile)
    last = dataclasses.replace(last, error=hostile, timeline=[*last.timeline[:-1], ended])
    page = parse(render_unit(unit_view(title="LLMTask <b>tiny</b>", invocations=[view.invocations[0], last])))
    assert not page.root.find_all("script") and not page.root.find_all("img") and not page.root.find_all("b")
    assert page.rows("timeline", "event")[-1][-1] == hostile
    assert page.text_of("error") == hostile
    assert page.root.find_all("h1")[0].text() == "LLMTask <b>tiny</b>"
    assert_self_contained(page, view.links)


def test_links_open_in_a_new_tab_and_only_web_links_are_links() -> None:
    view = unit_view(links=[*unit_view().links, Link("evil", "javascript:alert(1)")])
    page = parse(render_unit(view))
    anchors = page.by_id("links").find_all("a")
    assert [(a.attrs["href"], a.text()) for a in anchors] == [(link.uri, link.name) for link in view.links[:2]]
    assert all(a.attrs["target"] == "_blank" and "noopener" in a.attrs["rel"] for a in anchors)
    assert "javascript:alert(1)" in page.by_id("links").text()


def test_footer_has_generated_at() -> None:
    page = parse(render_unit(unit_view()))
    stamp = page.by_id("generated-at")
    assert datetime.fromisoformat(stamp.attrs["datetime"]).timestamp() == T + 5


# --- the chunk deck -------------------------------------------------------------------------------


def test_chunk_deck_is_self_contained() -> None:
    view = chunk_view()
    page = parse(render_chunk(view))
    assert_self_contained(page, view.links)
    assert page.text_of("message") == "running on 3 executors"
    assert [a.attrs["href"] for a in page.by_id("links").find_all("a")] == [view.links[0].uri]


def test_chunk_counters_parse_to_the_view() -> None:
    view = chunk_view()
    page = parse(render_chunk(view))
    assert int(page.text_of("items-total")) == 100
    assert int(page.text_of("items-done")) == 37
    assert int(page.text_of("items-failed")) == 3
    assert int(page.text_of("items-cancelled")) == 0
    assert float(page.text_of("items-per-s")) == pytest.approx(view.items_per_s, abs=0.05)  # 40 items in 30 s
    assert float(page.text_of("eta").removesuffix(" s")) == pytest.approx(view.eta_s, abs=0.5)  # 60 more: 45 s
    assert page.text_of("chunk-state") == "RUNNING"
    assert float(page.text_of("progress-pct")) == 40.0
    parts = [c for c in page.by_id("progress-bar").children if isinstance(c, Node)]
    bar = [float(d.attrs["style"].removeprefix("width:").rstrip("%")) for d in parts]
    assert bar == [37.0, 3.0, 0.0]


def test_finished_chunk_has_no_eta() -> None:
    page = parse(render_chunk(chunk_view(state="DONE", done=96, failed=4, finished_at=T + 52)))
    assert page.text_of("eta") == "–"
    assert float(page.text_of("items-per-s")) == 2.0  # 100 items in 50 s
    assert page.text_of("chunk-state") == "DONE"


def test_stages_table_has_percentiles_in_ms() -> None:
    view = chunk_view()
    page = parse(render_chunk(view))
    rows = page.rows("stages", "stage")
    assert [r[:3] for r in rows] == [["EncoderTask tiny-llava", "48", "0"], ["LLMTask tiny-llava", "40", "3"]]
    llm = view.stages[1]
    assert float(rows[1][4]) == pytest.approx(llm.queue_s.p90 * 1000, abs=0.05)  # 360 ms
    assert float(rows[1][4]) == 400.0
    assert float(rows[1][11]) == pytest.approx(llm.latency_s.p99 * 1000, abs=0.5)
    raw = [float(td.attrs["data-seconds"]) for td in cells(page.row_nodes("stages", "stage")[0])[3:]]
    encoder = view.stages[0]
    assert raw == [encoder.queue_s.p50, encoder.queue_s.p90, encoder.queue_s.p99, encoder.run_s.p50,
                   encoder.run_s.p90, encoder.run_s.p99, encoder.latency_s.p50, encoder.latency_s.p90,
                   encoder.latency_s.p99]


def test_errors_table_in_order() -> None:
    view = chunk_view()
    page = parse(render_chunk(view))
    assert page.rows("errors", "error") == [[e.item_id, e.error] for e in view.errors]
    page = parse(render_chunk(chunk_view(failed=0, errors=[])))
    assert page.row_nodes("errors", "error") == []
    assert page.rows("errors") == [["no failed items"]]


def test_executors_table() -> None:
    rows = parse(render_chunk(chunk_view())).rows("executors", "executor")
    assert rows == [["exec-enc-0", "EncoderTask tiny-llava", "24"], ["exec-enc-1", "EncoderTask tiny-llava", "24"],
                    ["exec-llm-9d03", "LLMTask tiny-llava", "40"]]


def test_progress_chart_has_a_point_per_sample() -> None:
    view = chunk_view()
    chart = parse(render_chunk(view)).by_id("progress-chart")
    assert chart.tag == "svg"
    done, failed = chart.find_all("polyline", "done"), chart.find_all("polyline", "failed")
    assert len(done) == len(failed) == 1
    assert len(points(done[0])) == len(points(failed[0])) == len(view.progress) == 30
    xs, ys = zip(*points(done[0]))
    assert list(xs) == sorted(xs) and xs[0] < xs[-1]
    assert list(ys) == sorted(ys, reverse=True) and ys[0] > ys[-1]  # cumulative: up the chart (SVG y down)
    labels = [t.text() for t in chart.find_all("text")]
    assert "100" in labels and "0" in labels and "10 s" in labels  # y up to the total, x in seconds
    assert any("done" in label for label in labels) and any("failed" in label for label in labels)


def test_overlap_chart_and_seconds() -> None:
    view = chunk_view()
    page = parse(render_chunk(view))
    assert page.text_of("overlap-s") == f"{view.overlap_s:.1f}" == "7.2"  # stages do overlap
    chart = page.by_id("overlap-chart")
    lanes = chart.find_all("g", "lane")
    assert [g.attrs["data-stage"] for g in lanes] == [s.name for s in view.stages]
    assert [len(g.find_all("rect", "span")) for g in lanes] == [6, 8]
    first = lanes[0].find_all("rect", "span")[0]
    assert float(first.attrs["x"]) == min(float(r.attrs["x"]) for r in chart.find_all("rect", "span"))


def test_big_chunk_stays_small() -> None:
    stages = ["EncoderTask tiny-llava", "LLMTask tiny-llava", "PostprocessTask"]
    progress = [ProgressSample(T + 2 + i * 0.5, i, i // 100) for i in range(2000)]
    spans = [StageSpan(stages[i % 3], f"exec-{i % 7}", T + 2 + i * 0.4, T + 2.3 + i * 0.4, 4) for i in range(2000)]
    view = chunk_view(total=2200, done=1980, failed=19, progress=progress, spans=spans, generated_at=T + 1002)
    document = render_chunk(view)
    assert len(document.encode()) < 300_000
    page = parse(document)
    chart = page.by_id("progress-chart")
    assert len(points(chart.find_all("polyline", "done")[0])) == MAX_POINTS
    labels = {t.text() for t in chart.find_all("text")}
    assert {"0", "500", "1500", "2200"} <= labels and "2000" not in labels  # the total labeled, room for it
    bars = page.by_id("overlap-chart").find_all("rect", "span")
    assert 0 < len(bars) < 500 * 3
    assert float(page.text_of("overlap-s")) == round(view.overlap_s, 1)


def test_empty_queued_chunk_renders() -> None:
    view = ChunkView(title="MLLMTask tiny-llava, chunk of 50 items", batch_id="batch-b2", state="QUEUED", total=50,
                     done=0, failed=0, cancelled=0, created_at=T, started_at=None, finished_at=None,
                     generated_at=T + 1)
    page = parse(render_chunk(view))
    assert_self_contained(page, [])
    assert [page.text_of(i) for i in ("items-total", "items-done", "items-per-s", "eta", "chunk-state")] == [
        "50", "0", "–", "–", "QUEUED"]
    chart = page.by_id("progress-chart")
    assert not chart.find_all("polyline") and len(chart.find_all("line", "axis")) >= 2
    assert any("not enough" in t.text() for t in chart.find_all("text"))
    assert page.rows("stages") == [["no stage ran yet"]]
    assert page.rows("errors") == [["no failed items"]]
    assert page.text_of("overlap-s") == "0.0"
    assert page.get("message") is None
