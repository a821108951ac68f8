"""The example's dashboard in headless Chromium: its sparklines follow the `metrics` events.

The page draws each chart itself, from the events, as an inline SVG polyline. The
test records every `metrics` event the page's `EventSource` receives (a listener
added before the page's own) and checks each chart against the same arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.slow

OpenPage = Callable[[str], Page]
MakeServer = Callable[..., Any]  # tests/browser/conftest.py: the example under uvicorn

# Runs before the page's scripts: every EventSource the page opens also records its
# `metrics` events, in a listener that runs before the page's own.
RECORD_METRICS = """
window.seenMetrics = [];
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(...args) {
    super(...args);
    this.addEventListener("metrics", (event) => window.seenMetrics.push(JSON.parse(event.data)));
  }
};
"""
# Read in one go, so no event is dispatched between the two reads.
SNAPSHOT = """() => ({
  metrics: window.seenMetrics,
  cpu: document.querySelector("#chart-cpu polyline").getAttribute("points"),
  rss: document.querySelector("#chart-rss polyline").getAttribute("points"),
  cpuTitle: document.querySelector("#chart-cpu title").textContent,
})"""
LIMIT, WIDTH, HEIGHT, PAD = 60, 300, 60, 4


def expected_points(values: list[float]) -> list[tuple[float, float]]:
    """The chart's arithmetic: the last LIMIT values, x evenly spread, y from min to max."""
    values = values[-LIMIT:]
    low, high = min(values), max(values)

    def y(value: float) -> float:
        if high == low:
            return HEIGHT / 2
        return HEIGHT - PAD - (value - low) / (high - low) * (HEIGHT - 2 * PAD)

    return [(index * WIDTH / (LIMIT - 1), y(value)) for index, value in enumerate(values)]


def parse_points(text: str) -> list[tuple[float, float]]:
    pairs = [pair.split(",") for pair in text.split()]
    return [(float(x), float(y)) for x, y in pairs]


def assert_chart(points: str, values: list[float]) -> None:
    drawn, expected = parse_points(points), expected_points(values)
    assert len(drawn) == len(expected)
    for (x, y), (want_x, want_y) in zip(drawn, expected, strict=True):
        # The page rounds to one decimal.
        assert abs(x - want_x) <= 0.051 and abs(y - want_y) <= 0.051, (drawn, expected)


def test_dashboard_sparklines_follow_the_metrics_events(
    make_server: MakeServer, open_page: OpenPage
) -> None:
    server = make_server(METRICS_INTERVAL="0.05")
    server.start()
    page = open_page("about:blank")
    page.add_init_script(RECORD_METRICS)
    page.goto(server.url("/dashboard"))
    expect(page.locator("#status")).to_have_text("live")

    page.wait_for_function("window.seenMetrics.length >= 5")
    early = page.evaluate(SNAPSHOT)
    assert 5 <= len(early["metrics"]) < LIMIT
    assert_chart(early["cpu"], [m["cpu_percent"] for m in early["metrics"]])
    assert_chart(early["rss"], [m["rss_bytes"] / 1048576 for m in early["metrics"]])
    last_cpu = early["metrics"][-1]["cpu_percent"]
    assert early["cpuTitle"].startswith(f"CPU, the last {len(early['metrics'])} samples: from ")
    assert early["cpuTitle"].endswith(f"now {last_cpu:.1f} %")

    # Past the chart's 60 samples: it keeps the newest 60, and still follows each event.
    page.wait_for_function(f"window.seenMetrics.length >= {LIMIT + 10}", timeout=20_000)
    late = page.evaluate(SNAPSHOT)
    assert len(parse_points(late["cpu"])) == LIMIT
    assert_chart(late["cpu"], [m["cpu_percent"] for m in late["metrics"]])
    assert_chart(late["rss"], [m["rss_bytes"] / 1048576 for m in late["metrics"]])

    chart = page.locator("#chart-cpu")
    assert chart.get_attribute("role") == "img"
    expect(page.get_by_role("img", name=re.compile(r"^CPU, the last 60 samples"))).to_be_visible()
    cpu_range = re.compile(r"^\d+\.\d % to \d+\.\d %$")
    expect(page.locator(".chart .range").first).to_have_text(cpu_range)
