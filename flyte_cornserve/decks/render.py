"""Render a deck view (`decks.views`) as one self-contained HTML page.

The Flyte console shows a node's deck (`deck.html`) in an iframe, often on a machine that cannot
reach the internet, and keeps the file as the node's record after the run. So a page carries all it
needs: inline CSS, charts as inline SVG drawn here in Python, no scripts, stylesheets, fonts or
images fetched from anywhere. Every piece of text is escaped (errors and notes carry user data).
Stable ids and classes (`#summary`, `#timeline`, `#items-done`, `tr.stage`, ...) let tests and a
headless browser read the page.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from .views import Attempt, ChunkView, InvocationView, Link, StageSpan, UnitNodeView

MAX_POINTS = 300  # progress samples drawn at most per line
MAX_SPANS = 500  # above this many spans, spans closer than MERGE_PX pixels merge within a lane
MERGE_PX = 2.0
DASH = "–"

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
background:#fff;margin:12px 16px;max-width:1100px}
h1{font-size:17px;margin:0 0 8px}h2{font-size:14px;margin:16px 0 4px;color:#444}
table{border-collapse:collapse;margin:2px 0 8px;font-variant-numeric:tabular-nums}
th,td{padding:2px 8px;border-bottom:1px solid #e6e6e6;text-align:left;vertical-align:top}
thead th{color:#666;font-weight:600;border-bottom:1px solid #ccc}
#summary th{color:#777;font-weight:normal}
caption{caption-side:top;text-align:left;color:#888;font-size:12px;padding:2px 0}
td[data-seconds],td[data-bytes]{text-align:right}
tr.empty td{color:#888;font-style:italic}
td{white-space:pre-wrap}
.state{font-weight:600}.ok{color:#2e7d32}.bad{color:#c62828}.off{color:#888}.run{color:#1565c0}
.wait{color:#b26a00}
#error{border:1px solid #e5a1a1;background:#fdf0f0;color:#8a1c1c;padding:6px 10px;margin:8px 0;
white-space:pre-wrap}
#message{color:#555}
.counters{display:flex;gap:20px;flex-wrap:wrap;margin:6px 0}
.counters div{display:flex;flex-direction:column}.counters span{font-size:18px;font-weight:600}
.counters small{color:#777}
.bar{display:flex;height:10px;background:#eee;border-radius:3px;overflow:hidden;max-width:720px}
.bar .ok{background:#43a047}.bar .bad{background:#e53935}.bar .off{background:#bdbdbd}
svg{max-width:100%;height:auto;font:11px system-ui,sans-serif}
svg text{fill:#555}svg .axis{stroke:#999}svg .grid{stroke:#eee}
footer{margin-top:16px;color:#999;font-size:11px}
"""

_STATE_CLASS = {"DONE": "ok", "ERROR": "bad", "FAILED": "bad", "CANCELLED": "off", "CANCELLING": "off",
                "TAKEN OVER": "off", "RUNNING": "run", "QUEUED": "wait", "CREATED": "wait"}
_FILL = {"ok": "#43a047", "bad": "#e53935", "off": "#bdbdbd", "run": "#1e88e5", "wait": "#ffb300"}
_LANE_FILLS = ["#5c6bc0", "#26a69a", "#ef6c00", "#8d6e63", "#ab47bc", "#78909c"]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _state_class(state: str) -> str:
    """The color class of a state ("DONE": "ok"), or of an attempt's outcome ("ERROR: ...", "taken over: ...")."""
    return _STATE_CLASS.get(state.split(":")[0].strip().upper(), "")


def _state(state: str, id_: str = "") -> str:
    attr = f' id="{id_}"' if id_ else ""
    return f'<span{attr} class="state {_state_class(state)}">{_e(state)}</span>'


def _clock(at: float) -> str:
    t = datetime.fromtimestamp(at)
    return t.strftime("%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _ms(seconds: float | None) -> str:
    """Milliseconds as a bare number: one decimal under a second."""
    if seconds is None:
        return DASH
    return f"{seconds * 1000:.1f}" if abs(seconds) < 1 else f"{seconds * 1000:.0f}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    return f"{_ms(seconds)} ms" if seconds < 10 else f"{seconds:.1f} s"


def format_bytes(n: int) -> str:
    """`147.5 KiB`: binary units, one decimal; under 1 KiB in bytes."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _num(v: float) -> str:
    return f"{round(v)}" if abs(v - round(v)) < 1e-9 else f"{v:.6g}"


# --- tables -------------------------------------------------------------------------------------


class _Td(str):
    """A cell already rendered as `<td ...>...</td>` (attributes or markup of its own)."""


def _td(text: object = "", *, markup: str = "", **attrs: object) -> _Td:
    attributes = "".join(f' {name.replace("_", "-")}="{_e(value)}"' for name, value in attrs.items()
                         if value is not None)
    return _Td(f"<td{attributes}>{markup or _e(text)}</td>")


def _table(table_id: str, headers: list[str], rows: list[list[object]], *, row_class: str = "",
           empty: str = "", caption: str = "") -> str:
    """A table with one header row; a cell is text (escaped) or a `_td`; `empty` when no rows."""
    body = [f'<tr class="{row_class}">' + "".join(c if isinstance(c, _Td) else f"<td>{_e(c)}</td>" for c in row)
            + "</tr>" for row in rows]
    if not body and empty:
        body = [f'<tr class="empty"><td colspan="{len(headers)}">{_e(empty)}</td></tr>']
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<table id="{table_id}">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


# --- charts -------------------------------------------------------------------------------------


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 up to `top` (about `count` of them)."""
    if top <= 0:
        return [0.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


@dataclass(frozen=True)
class _Frame:
    """A plot area inside an SVG: data (0..x_max, 0..y_max) to pixels (y grows upwards)."""

    left: float
    top: float
    width: float
    height: float
    x_max: float
    y_max: float = 1.0

    def x(self, v: float) -> float:
        return self.left + self.width * min(max(v / self.x_max, 0.0), 1.0)

    def y(self, v: float) -> float:
        return self.top + self.height * (1 - min(max(v / self.y_max, 0.0), 1.0))

    def x_axis(self, scale: float, unit: str) -> str:
        """The bottom axis, ticks labeled in `unit` (data value × `scale`)."""
        base = self.top + self.height
        parts = [f'<line class="axis" x1="{self.left}" y1="{base}" x2="{self.left + self.width}" y2="{base}"/>']
        for tick in _ticks(self.x_max * scale):
            x = self.x(tick / scale)
            parts.append(f'<line class="axis" x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}"/>'
                         f'<text x="{x:.1f}" y="{base + 15}" text-anchor="middle">{_num(tick)}{_e(unit)}</text>')
        return "".join(parts)

    def y_axis(self) -> str:
        """The left axis with grid lines, 0..y_max (y_max itself always labeled)."""
        ticks = _ticks(self.y_max)
        step = ticks[1] if len(ticks) > 1 else self.y_max
        ticks = [t for t in ticks if self.y_max - t >= step / 2] + [self.y_max]  # room for y_max's label
        parts = [f'<line class="axis" x1="{self.left}" y1="{self.top}" x2="{self.left}" '
                 f'y2="{self.top + self.height}"/>']
        for tick in ticks:
            y = self.y(tick)
            parts.append(f'<line class="grid" x1="{self.left + 1}" y1="{y:.1f}" x2="{self.left + self.width}" '
                         f'y2="{y:.1f}"/><text x="{self.left - 5}" y="{y + 4:.1f}" text-anchor="end">'
                         f"{_num(tick)}</text>")
        return "".join(parts)


def _svg(svg_id: str, width: float, height: float, parts: list[str]) -> str:
    return (f'<svg id="{svg_id}" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} '
            f'{height:.0f}" role="img">{"".join(parts)}</svg>')


def _text(x: float, y: float, text: str, cls: str = "", fill: str = "", anchor: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' style="fill:{fill}"' if fill else "")
    attrs += f' text-anchor="{anchor}"' if anchor else ""
    return f'<text x="{x:.1f}" y="{y:.1f}"{attrs}>{_e(text)}</text>'


def _bar(frame: _Frame, start: float, end: float, y: float, height: float, fill: str, title: str, cls: str,
         opacity: float = 1.0) -> str:
    """A bar from `start` to `end` (data x), at pixel row `y`, its `title` shown on hover."""
    x = frame.x(start)
    attrs = f' fill-opacity="{opacity:.2f}"' if opacity < 1 else ""
    return (f'<rect class="{cls}" x="{x:.1f}" y="{y:.1f}" width="{max(frame.x(end) - x, 0.5):.1f}" '
            f'height="{height:.1f}" fill="{fill}"{attrs}><title>{_e(title)}</title></rect>')


def _line(frame: _Frame, points: list[tuple[float, float]], cls: str, stroke: str) -> str:
    coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
    return f'<polyline class="{cls}" fill="none" stroke="{stroke}" stroke-width="1.5" points="{coords}"/>'


def _downsample(items: list, limit: int) -> list:
    """At most `limit` items, evenly spread, the first and the last kept."""
    if len(items) <= limit:
        return list(items)
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


@dataclass
class _Bar:
    """One bar of a Gantt lane: a span, or spans merged (drawn as dense as they kept the stage busy)."""

    start: float
    end: float
    executor: str
    spans: int = 1
    items: int = 0
    busy_s: float = 0.0


def _lane_bars(spans: list[StageSpan], merge_gap: float | None) -> list[_Bar]:
    """A bar per span; with a `merge_gap`, spans less than that apart merge into one bar."""
    bars: list[_Bar] = []
    for span in sorted(spans, key=lambda s: s.started_at):
        if bars and merge_gap is not None and span.started_at - bars[-1].end <= merge_gap:
            bar = bars[-1]
            bar.end, bar.spans, bar.items = max(bar.end, span.finished_at), bar.spans + 1, bar.items + span.items
        else:
            bars.append(bar := _Bar(span.started_at, span.finished_at, span.executor, items=span.items))
        bar.busy_s += span.finished_at - span.started_at
    return bars


# --- page ---------------------------------------------------------------------------------------


def _links(links: list[Link]) -> str:
    items = []
    for link in links:
        if urlsplit(link.uri).scheme.lower() in ("", "http", "https"):
            items.append(f'<li><a href="{_e(link.uri)}" target="_blank" rel="noopener">{_e(link.name)}</a></li>')
        else:  # javascript: and the like are shown, never linked
            items.append(f"<li>{_e(link.name)}: {_e(link.uri)}</li>")
    return f'<h2>Links</h2><ul id="links">{"".join(items)}</ul>' if items else '<ul id="links"></ul>'


def _page(title: str, body: list[str], links: list[Link], generated_at: float) -> str:
    stamp = datetime.fromtimestamp(generated_at).astimezone()
    footer = (f'<footer>generated <time id="generated-at" datetime="{stamp.isoformat(timespec="seconds")}">'
              f'{stamp.strftime("%Y-%m-%d %H:%M:%S %Z")}</time></footer>')
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
                      f"<title>{_e(title)}</title>", f"<style>{_CSS}</style></head>", "<body>",
                      *body, _links(links), footer, "</body>", "</html>", ""])


# --- unit deck ----------------------------------------------------------------------------------


def render_unit(view: UnitNodeView) -> str:
    """The deck of a unit-task node: summary of the last invocation, the timeline of all of them."""
    last = view.invocations[-1] if view.invocations else None
    body = [f"<h1>{_e(view.title)}</h1>", _unit_summary(view, last)]
    if last is not None and last.error:
        kind = f"{last.error_kind}: " if last.error_kind else ""
        body.append(f'<div id="error">{_e(kind + last.error)}</div>')
    body += ["<h2>Timeline</h2>", _timeline_chart(view, last), _timeline_table(view),
             "<h2>Attempts</h2>", _attempts_table(last), "<h2>Tensors</h2>", _tensors_table(view)]
    return _page(view.title, body, view.links, view.generated_at)


def _unit_summary(view: UnitNodeView, inv: InvocationView | None) -> str:
    rows = [("state", _state(inv.state) if inv else DASH), ("task class", _e(view.task_class)),
            ("model", _e(view.model)),
            ("deployment", _e(inv.deployment_id if inv and inv.deployment_id else view.deployment_id)),
            ("routing", _e(view.routing)), ("executor", _e(inv.executor) if inv else DASH),
            ("node", _e(inv.node) if inv else DASH),
            ("queue wait", _e(_dur(inv.queue_wait_s)) if inv else DASH),
            ("run time", _e(_dur(inv.run_s)) if inv else DASH),
            ("total", _e(_dur(inv.total_s)) if inv else DASH),
            ("attempts", str(len(inv.attempts)) if inv else "0")]
    caption = (f"<caption>invocation {_e(inv.invocation_id)} ({len(view.invocations)} of "
               f"{len(view.invocations)})</caption>" if inv else "")
    trs = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    return f'<table id="summary">{caption}<tbody>{trs}</tbody></table>'


def _timeline_table(view: UnitNodeView) -> str:
    rows: list[list[object]] = []
    for inv in view.invocations:
        events = inv.timeline
        for i, event in enumerate(events):
            until_next = events[i + 1].at - event.at if i + 1 < len(events) else None
            rows.append([_td(inv.invocation_id[:8], title=inv.invocation_id), _td(markup=_state(event.state)),
                         _clock(event.at), _td("+" + _ms(event.at - inv.created_at),
                                               data_seconds=event.at - inv.created_at),
                         _td(_ms(until_next), data_seconds=until_next), event.executor, event.note])
    first = next((inv.created_at for inv in view.invocations), view.generated_at)
    day = datetime.fromtimestamp(first).astimezone().strftime("%Y-%m-%d, UTC%z")
    return _table("timeline", ["invocation", "state", "time", "+ms", "ms", "executor", "note"], rows,
                  row_class="event", empty="no events", caption=f"local times on {day}")


def _timeline_chart(view: UnitNodeView, inv: InvocationView | None) -> str:
    """The last invocation on a time axis: queued, then each attempt's run."""
    if inv is None:
        return _svg("timeline-chart", 720, 30, [_text(10, 18, "no invocation yet", "note")])
    picked = inv.started_at is not None or any(e.state == "RUNNING" for e in inv.timeline)
    queued_until = inv.first_start if picked else (inv.finished_at or view.generated_at)
    attempts = list(inv.attempts)
    if not attempts and inv.started_at is not None:
        attempts = [Attempt(1, inv.executor, inv.started_at, inv.finished_at, inv.state)]
    segments = [(inv.created_at, queued_until, "wait", f"queued {_dur(queued_until - inv.created_at)}")]
    for i, attempt in enumerate(attempts):
        following = attempts[i + 1].started_at if i + 1 < len(attempts) else None
        end = attempt.ended_at or following or inv.finished_at or view.generated_at
        segments.append((attempt.started_at, end, _state_class(attempt.outcome) or "run",
                         f"attempt {attempt.number} on {attempt.executor}: {_dur(end - attempt.started_at)}, "
                         f"{attempt.outcome}"))
    frame = _Frame(20, 8, 680, 20, max(max(end for _, end, _, _ in segments) - inv.created_at, 1e-3))
    parts = [_bar(frame, start - inv.created_at, end - inv.created_at, frame.top, frame.height, _FILL[cls], title,
                  f"segment {cls}") for start, end, cls, title in segments]
    parts.append(frame.x_axis(1000, " ms"))
    for i, (_, _, cls, title) in enumerate(segments):  # the legend: a line per segment
        parts.append(f'<rect x="20" y="{52 + 15 * i}" width="10" height="10" fill="{_FILL[cls]}"/>'
                     + _text(36, 61 + 15 * i, title))
    return _svg("timeline-chart", 720, 56 + 15 * len(segments), parts)


def _attempts_table(inv: InvocationView | None) -> str:
    rows = [[a.number, a.executor, _clock(a.started_at), _clock(a.ended_at) if a.ended_at else DASH,
             _dur(None if a.ended_at is None else a.ended_at - a.started_at), _td(markup=_state(a.outcome))]
            for a in (inv.attempts if inv else [])]
    return _table("attempts", ["#", "executor", "started", "ended", "duration", "outcome"], rows,
                  row_class="attempt", empty="no attempt yet", caption=f"invocation {inv.invocation_id}" if inv else "")


def _tensors_table(view: UnitNodeView) -> str:
    rows = [[t.op, _td(t.tensor_id[:8], title=t.tensor_id),
             "×".join(str(d) for d in t.shape) or "scalar", t.dtype,
             _td(format_bytes(t.nbytes), data_bytes=t.nbytes, title=f"{t.nbytes} bytes"), t.path,
             _td(_ms(t.seconds), data_seconds=t.seconds)]
            for inv in view.invocations for t in inv.transfers]
    return _table("tensors", ["op", "tensor", "shape", "dtype", "bytes", "path", "ms"], rows,
                  row_class="tensor", empty="no tensors read or written")


# --- chunk deck ---------------------------------------------------------------------------------


def render_chunk(view: ChunkView) -> str:
    """The deck of a batch chunk node: counters, progress over time, stages and their overlap."""
    rate, eta = view.items_per_s, view.eta_s
    counters = [("items-total", view.total, "items"), ("items-done", view.done, "done"),
                ("items-failed", view.failed, "failed"), ("items-cancelled", view.cancelled, "cancelled"),
                ("items-per-s", DASH if rate is None else f"{rate:.1f}", "items/s"),
                ("eta", DASH if eta is None else f"{eta:.0f} s", "ETA")]
    boxes = "".join(f'<div><span id="{id_}">{_e(value)}</span><small>{label}</small></div>'
                    for id_, value, label in counters)
    boxes += f'<div>{_state(view.state, "chunk-state")}<small>state</small></div>'
    share = [(n / view.total * 100 if view.total else 0.0) for n in (view.done, view.failed, view.cancelled)]
    bar = "".join(f'<div class="{cls}" style="width:{pct:.2f}%"></div>' for cls, pct in zip(("ok", "bad", "off"),
                                                                                          share))
    body = [f"<h1>{_e(view.title)}</h1>",
            f'<p id="message">{_e(view.message)}</p>' if view.message else "",
            f'<div class="counters">{boxes}</div>',
            f'<div id="progress-bar" class="bar" title="{sum(share):.1f}% ended">{bar}</div>'
            f'<small><span id="progress-pct">{sum(share):.1f}</span>% ended, batch {_e(view.batch_id)}</small>',
            "<h2>Progress</h2>", _progress_chart(view),
            "<h2>Stages</h2>", _stages_table(view), "<h2>Stage overlap</h2>", _overlap_chart(view),
            f'<p>stages overlapped for <span id="overlap-s">{view.overlap_s:.1f}</span> s</p>',
            "<h2>Failed items</h2>",
            _table("errors", ["item", "error"], [[e.item_id, e.error] for e in view.errors], row_class="error",
                   empty="no failed items", caption=f"the first {len(view.errors)} of {view.failed}"
                   if view.failed > len(view.errors) else ""),
            "<h2>Executors</h2>",
            _table("executors", ["executor", "stage", "items"],
                   [[x.executor, x.stage, x.items] for x in view.executors], row_class="executor",
                   empty="no executor ran an item yet")]
    return _page(view.title, body, view.links, view.generated_at)


def _progress_chart(view: ChunkView) -> str:
    """Items done and failed (cumulative) over seconds since the chunk started."""
    t0 = view.started_at or view.created_at
    samples = _downsample(view.progress, MAX_POINTS)
    end = max([view.finished_at or view.generated_at] + [s.at for s in samples])
    frame = _Frame(44, 10, 640, 160, max(end - t0, 1.0), max(view.total, 1))
    parts = [frame.y_axis(), frame.x_axis(1, " s")]
    if len(samples) < 2:
        parts.append(_text(frame.left + 10, frame.top + 20, "not enough progress samples yet", "note"))
    else:
        parts.append(_line(frame, [(s.at - t0, s.done) for s in samples], "done", _FILL["ok"]))
        parts.append(_line(frame, [(s.at - t0, s.failed) for s in samples], "failed", _FILL["bad"]))
    parts += [_text(frame.left + 10, 206, "— done", fill=_FILL["ok"]),
              _text(frame.left + 70, 206, "— failed", fill=_FILL["bad"]),
              _text(frame.left + frame.width, 206, "seconds since start", "note", anchor="end")]
    return _svg("progress-chart", 720, 212, parts)


def _stages_table(view: ChunkView) -> str:
    rows = []
    for stage in view.stages:
        cells = [_td(_ms(v), data_seconds=v) for p in (stage.queue_s, stage.run_s, stage.latency_s)
                 for v in (p.p50, p.p90, p.p99)]
        rows.append([stage.name, stage.items, stage.failed, *cells])
    headers = ["stage", "items", "failed"] + [f"{what} {p}" for what in ("queue", "run", "latency")
                                               for p in ("p50", "p90", "p99")]
    return _table("stages", headers, rows, row_class="stage", empty="no stage ran yet",
                  caption="per item, in ms: queue = submitted to picked up, run = picked up to outcome")


def _overlap_chart(view: ChunkView) -> str:
    """A Gantt chart: one lane per stage, a bar per batch invocation (close ones merge when many)."""
    if not view.spans:
        return _svg("overlap-chart", 720, 30, [_text(10, 18, "no stage ran yet", "note")])
    lanes: dict[str, list[StageSpan]] = {stage.name: [] for stage in view.stages}
    for span in view.spans:
        lanes.setdefault(span.stage, []).append(span)
    t0 = min(s.started_at for s in view.spans)
    lane_h = 22
    frame = _Frame(190, 6, 520, lane_h * len(lanes), max(max(s.finished_at for s in view.spans) - t0, 1e-3))
    merge_gap = MERGE_PX * frame.x_max / frame.width if len(view.spans) > MAX_SPANS else None
    parts = []
    for i, (stage, spans) in enumerate(lanes.items()):
        y = frame.top + i * lane_h
        label = stage if len(stage) <= 30 else stage[:29] + "…"
        bars = []
        for bar in _lane_bars(spans, merge_gap):
            length = bar.end - bar.start
            who = bar.executor if bar.spans == 1 else f"{bar.spans} invocations"
            bars.append(_bar(frame, bar.start - t0, bar.end - t0, y + 3, lane_h - 6, _LANE_FILLS[i % len(_LANE_FILLS)],
                             f"{stage}: {who}, {bar.items} items, {_dur(length)}", "span",
                             opacity=max(0.15, min(1.0, bar.busy_s / length)) if length > 0 else 1.0))
        parts.append(f'<g class="lane" data-stage="{_e(stage)}"><title>{_e(stage)}</title>'
                     f'{_text(6, y + lane_h / 2 + 4, label)}{"".join(bars)}</g>')
    parts.append(frame.x_axis(1, " s"))
    return _svg("overlap-chart", 720, frame.top + frame.height + 22, parts)
