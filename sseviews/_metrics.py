"""`Metrics`: counters of an app's streams, per view, with a Prometheus text export."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ._lifecycle import DisconnectReason

__all__ = ["Metrics", "ViewCounters"]

_PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ViewCounters:
    """The counters of one view class. Read them through `Metrics.snapshot()`."""

    __slots__ = ("bytes", "disconnects", "events", "open", "pings", "refused", "streams")

    def __init__(self) -> None:
        self.open = 0
        self.streams = 0
        self.events = 0
        self.bytes = 0
        self.pings = 0
        self.disconnects: dict[DisconnectReason, int] = dict.fromkeys(DisconnectReason, 0)
        self.refused: dict[int, int] = {}

    def refuse(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "streams": self.streams,
            "events": self.events,
            "bytes": self.bytes,
            "pings": self.pings,
            "disconnects": {reason.value: count for reason, count in self.disconnects.items()},
            "refused": dict(sorted(self.refused.items())),
        }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters of the streams of one app, per view class.

    Give the same instance to your views (`metrics = app_metrics` on a base view),
    then read `snapshot()`, or serve `endpoint` for Prometheus:

        metrics = Metrics()
        app = Starlette(routes=[Route("/metrics", metrics.endpoint), ...])

    Per view it counts open streams, streams served, events and bytes sent,
    pings, disconnects by `DisconnectReason`, and refused requests by status.
    """

    def __init__(self) -> None:
        self._views: dict[str, ViewCounters] = {}

    def for_view(self, name: str) -> ViewCounters:
        """Return (creating if needed) the counters of the view named `name`."""
        counters = self._views.get(name)
        if counters is None:
            counters = self._views[name] = ViewCounters()
        return counters

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Return every view's counters as plain data, by view name."""
        return {name: counters.as_dict() for name, counters in sorted(self._views.items())}

    def prometheus(self) -> str:
        """Return the counters in the Prometheus text exposition format."""
        lines: list[str] = []
        views = sorted(self._views.items())

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, int]]) -> None:
            lines.append(f"# HELP sseviews_{name} {help_text}")
            lines.append(f"# TYPE sseviews_{name} {kind}")
            lines.extend(f"sseviews_{name}{{{labels}}} {value}" for labels, value in samples)

        def per_view(attribute: str) -> list[tuple[str, int]]:
            return [(f'view="{_label(n)}"', getattr(c, attribute)) for n, c in views]

        family("open_streams", "gauge", "Streams open now.", per_view("open"))
        family("streams_total", "counter", "Streams served.", per_view("streams"))
        family("events_sent_total", "counter", "Events written.", per_view("events"))
        family("bytes_sent_total", "counter", "Body bytes written.", per_view("bytes"))
        family("pings_sent_total", "counter", "Keep-alive pings written.", per_view("pings"))
        family(
            "disconnects_total",
            "counter",
            "Streams ended, by reason.",
            [
                (f'view="{_label(n)}",reason="{reason.value}"', count)
                for n, c in views
                for reason, count in c.disconnects.items()
            ],
        )
        family(
            "refused_total",
            "counter",
            "Stream requests answered without a stream, by status.",
            [
                (f'view="{_label(n)}",status="{status}"', count)
                for n, c in views
                for status, count in sorted(c.refused.items())
            ],
        )
        return "\n".join(lines) + "\n"

    async def endpoint(self, request: Request) -> Response:
        """A Starlette endpoint serving `prometheus()`: `Route("/metrics", metrics.endpoint)`."""
        return Response(self.prometheus(), media_type=_PROMETHEUS_TYPE)
