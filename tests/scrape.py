"""Reading the processes' Prometheus metrics in tests: scrape over HTTP and parse."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

#: a sample, as `scrape()` keys it: its name and its labels as sorted (name, value) pairs
Series = tuple[str, tuple[tuple[str, str], ...]]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def scrape(url: str) -> dict[Series, float]:
    """Every sample the endpoint serves now."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(fetch(url)) for s in family.samples}


def exported_names(url: str) -> set[str]:
    """The sample names an endpoint exports, also for families that have no sample yet: a counter's
    `_total`, a histogram's `_bucket`, `_sum` and `_count`, a summary's `_sum` and `_count`."""
    names = set()
    for family in text_string_to_metric_families(fetch(url)):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in {
            "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
        }.get(family.type, ("",))}
    return names


def series(name: str, **labels: str) -> Series:
    return name, tuple(sorted(labels.items()))


def eventually(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Wait for another process to make `condition` true (a metric it updates right after the Redis
    write a test waits on); fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
