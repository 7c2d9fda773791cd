"""Prometheus text metrics of the server: requests by route and status, a latency histogram per
route, errors, requests in flight; recorded by an ASGI middleware around the whole app."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds: media and clip queries take milliseconds, uploads that are encoded up to seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED = "unmatched"  # every path no route knows shares one label, so labels stay few
PREFIX = "avindex_serve"


def _escape(value: str) -> str:
    """A label value as the text format wants it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**pairs: str) -> str:
    """`{a="x",b="y"}` from keyword pairs."""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs.items()) + "}"


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0


class Metrics:
    """Counters and histograms of finished requests (thread-safe; rendered as Prometheus text)."""

    def __init__(self) -> None:
        """Empty counters; the clock of uptime starts now."""
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self.in_flight = 0
        self.started = time.time()

    def begin(self) -> None:
        """A request came in."""
        with self._lock:
            self.in_flight += 1

    def end(self, method: str, route: str, status: int, seconds: float) -> None:
        """A request finished with `status` after `seconds`."""
        with self._lock:
            self.in_flight -= 1
            self.requests[(method, route, str(status))] += 1
            if status >= 400:
                self.errors[(route, "server" if status >= 500 else "client")] += 1
            hist = self.latency[route]
            index = bisect.bisect_left(BUCKETS, seconds)
            if index < len(BUCKETS):
                hist.counts[index] += 1
            hist.total += seconds
            hist.n += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The text exposition format, with extra `gauges` (name -> (help, value))."""
        lines = [
            f"# HELP {PREFIX}_requests_total HTTP requests by method, route and status.",
            f"# TYPE {PREFIX}_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(
                    f"{PREFIX}_requests_total{_labels(method=method, route=route, status=status)}"
                    f" {n}"
                )
            lines += [
                f"# HELP {PREFIX}_errors_total Responses with status >= 400, by route and side.",
                f"# TYPE {PREFIX}_errors_total counter",
            ]
            for (route, side), n in sorted(self.errors.items()):
                lines.append(f"{PREFIX}_errors_total{_labels(route=route, side=side)} {n}")
            lines += [
                f"# HELP {PREFIX}_request_seconds Request latency by route.",
                f"# TYPE {PREFIX}_request_seconds histogram",
            ]
            for route, hist in sorted(self.latency.items()):
                cumulative = 0
                for bound, count in zip(BUCKETS, hist.counts, strict=True):
                    cumulative += count
                    le = _labels(route=route, le=f"{bound:g}")
                    lines.append(f"{PREFIX}_request_seconds_bucket{le} {cumulative}")
                inf = _labels(route=route, le="+Inf")
                lines.append(f"{PREFIX}_request_seconds_bucket{inf} {hist.n}")
                lines.append(f"{PREFIX}_request_seconds_sum{_labels(route=route)} {hist.total:.6f}")
                lines.append(f"{PREFIX}_request_seconds_count{_labels(route=route)} {hist.n}")
            in_flight = self.in_flight
        gauges = {
            "in_flight_requests": ("Requests being answered now.", in_flight),
            "uptime_seconds": ("Seconds since the server started.", time.time() - self.started),
            **gauges,
        }
        for name, (text, value) in gauges.items():
            lines += [
                f"# HELP {PREFIX}_{name} {text}",
                f"# TYPE {PREFIX}_{name} gauge",
                f"{PREFIX}_{name} {value:g}",
            ]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Times every HTTP request and records it under its route's path template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        """Wrap `app`; finished requests go to `metrics`."""
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, noting the status it got and how long it took."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before any response counts as a server error
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.begin()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or UNMATCHED
            self.metrics.end(scope["method"], name, status, time.perf_counter() - started)
