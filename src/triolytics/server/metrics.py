"""`GET /metrics`: what the server already counts, as Prometheus text (docs/metrics.md).

Rules:
- Nothing here runs per event. The HTTP server, the API, the WebSocket server and the
  writer keep plain integers (per request, message, group or load); `ServerCollector`
  reads them when Prometheus scrapes, on the event loop, so no lock is needed.
- A private `CollectorRegistry` (never prometheus_client's global one) holds our
  collector and the process collector, so a test or an embedding program sees only ours.
- Label sets stay bounded: routes are the route table's paths or "other"; refusal
  causes are the error codes of errors.py; transports are http and websocket.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from triolytics.core.sessions import Sessions
from triolytics.server.api import Api
from triolytics.server.http_server import HttpServer
from triolytics.server.ws_server import RealtimeServer
from triolytics.storage.writer import Timings, Writer

P = "triolytics_"
# The classic text format, which `generate_latest` writes (every Prometheus reads it)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _histogram(name: str, doc: str, t: Timings) -> HistogramMetricFamily:
    buckets, seen = [], 0
    for bound, count in zip((*t.bounds, float("inf")), t.counts, strict=True):
        seen += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), seen))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=t.total)


class ServerCollector(Collector):
    def __init__(self, api: Api, http: HttpServer, realtime: RealtimeServer,
                 writer: Writer, sessions: Sessions) -> None:
        self.api, self.http, self.realtime = api, http, realtime
        self.writer, self.sessions = writer, sessions

    def collect(self) -> Iterator[Metric]:
        http, realtime, writer = self.http, self.realtime, self.writer
        s = writer.stats

        requests = CounterMetricFamily(P + "http_requests", "HTTP responses by route "
                                       "(a path that is no route: other) and status",
                                       labels=("route", "status"))
        for (route, status), n in sorted(http.responses.items()):
            requests.add_metric((route.decode("latin-1"), str(status)), n)
        yield requests

        received = CounterMetricFamily(P + "events_received", "Events answered as stored "
                                       "(repeats of a messageId included)",
                                       labels=("transport",))
        received.add_metric(("http",), self.api.events_received)
        received.add_metric(("websocket",), realtime.events_received)
        yield received

        refused = CounterMetricFamily(P + "events_refused", "Events refused, by error "
                                      "code (a request or message refused whole: one)",
                                      labels=("transport", "code"))
        for transport, counts in (("http", self.api.refused),
                                  ("websocket", realtime.refused)):
            for code, n in sorted(counts.items()):
                refused.add_metric((transport, code), n)
        yield refused

        def counter(name: str, doc: str, n: int) -> CounterMetricFamily:
            return CounterMetricFamily(P + name, doc, value=n)

        def gauge(name: str, doc: str, n: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, value=n)

        yield counter("duplicates", "Events not stored again: their messageId was seen "
                      "within dedup_window_s", writer.dedup.repeats)
        yield counter("busy_refusals", "Requests refused with 503 after waiting "
                      "backpressure_wait_ms for room in the writer", s.rejected_busy)
        yield counter("journaled_rows", "Rows made durable in the journal (events and "
                      "session rows)", s.journaled_rows)
        yield counter("loaded_rows", "Rows loaded into DuckDB", s.loaded_rows)
        yield counter("journal_groups", "Journal writes (each one group of requests)",
                      s.groups)
        yield counter("journal_syncs", "Journal fdatasyncs completed", s.syncs)
        yield counter("duckdb_loads", "DuckDB loads that succeeded", s.loads)
        yield counter("duckdb_load_errors", "DuckDB loads that failed (retried)",
                      s.load_errors)
        yield gauge("pending_rows", "Rows accepted, not yet journaled", s.pending_rows)
        yield gauge("unloaded_rows", "Rows journaled, not yet in DuckDB", s.unloaded_rows)
        yield gauge("unloaded_bytes", "Journal bytes not yet in DuckDB", s.unloaded_bytes)
        yield gauge("load_lag_seconds", "Age of the oldest row not yet in DuckDB (0: none)",
                    writer.load_lag())
        yield gauge("ready", "1 while events can be stored (as /readyz), else 0",
                    0 if writer.closing or writer.fault is not None else 1)
        yield gauge("http_connections", "Open HTTP connections (not upgraded)",
                    http.connections.count)
        yield gauge("ws_connections", "Open WebSocket connections", len(realtime.peers))
        yield gauge("sessions", "Live sessions (not yet ended)", len(self.sessions))
        yield _histogram(P + "duckdb_load_duration_seconds", "Time one DuckDB load took",
                         writer.load_seconds)
        yield _histogram(P + "journal_ack_duration_seconds", "A group's journal write to "
                         "its acknowledgement (fsync included)", writer.ack_seconds)


class Metrics:
    """The registry behind `GET /metrics`."""

    def __init__(self, api: Api, http: HttpServer, realtime: RealtimeServer,
                 writer: Writer, sessions: Sessions) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(api, http, realtime, writer, sessions))
        ProcessCollector(registry=self.registry)

    def render(self) -> tuple[bytes, bytes]:
        """(content type, body) of one scrape."""
        return CONTENT_TYPE, generate_latest(self.registry)
