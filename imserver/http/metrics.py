"""``/metrics``: the server's counters in the Prometheus text format.

Nothing is counted here: a collector reads, at scrape time, the counters the
server keeps anyway (``ServerState.stats``, the writer, the hub, the
sessions) and renders them with ``prometheus-client``. One registry per
server (not the library's global one), so several servers in one process
(the tests) never mix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..histogram import Histogram

if TYPE_CHECKING:
    from ..state import ServerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerCollector(Collector):
    """Reads one server's state on every scrape."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (called by the registry at scrape time)."""
        state = self.state
        stats = state.stats
        hub = state.hub
        writer = state.writer

        conns = GaugeMetricFamily(
            "imserver_connections", "Open client connections", labels=["transport"]
        )
        for transport, n in sorted(stats.connections.items()):
            conns.add_metric([transport], n)
        yield conns
        yield GaugeMetricFamily(
            "imserver_sessions", "Authenticated sessions", value=len(state.sessions)
        )
        yield GaugeMetricFamily(
            "imserver_online_users", "Users with a connected device", value=hub.online_count()
        )
        yield CounterMetricFamily(
            "imserver_connections_accepted", "Connections accepted", value=stats.accepted_total
        )
        yield CounterMetricFamily(
            "imserver_messages_accepted",
            "Messages committed (repeats of a stored cid not counted)",
            value=stats.messages_accepted,
        )
        yield CounterMetricFamily(
            "imserver_messages_delivered",
            "Message pushes handed to device connections",
            value=stats.messages_delivered,
        )
        yield CounterMetricFamily(
            "imserver_pushes", "Pushes of every kind handed to connections", value=hub.pushes
        )
        yield CounterMetricFamily("imserver_batches", "Batches committed", value=writer.batches)
        yield CounterMetricFamily(
            "imserver_batches_failed", "Batches that failed", value=writer.failed_batches
        )
        yield _histogram("imserver_batch_rows", "Messages per committed batch", writer.batch_rows)
        yield _histogram(
            "imserver_commit_seconds", "Time to commit one batch", writer.commit_seconds
        )
        yield GaugeMetricFamily(
            "imserver_writer_queue", "Items waiting for the batch writer", value=writer.queued
        )
        depths = [s.queue_depth for s in state.sessions.values()]
        yield GaugeMetricFamily(
            "imserver_outbound_queue_depth", "Frames queued to all connections", value=sum(depths)
        )
        yield GaugeMetricFamily(
            "imserver_outbound_queue_depth_max",
            "Frames queued to the fullest connection",
            value=max(depths, default=0),
        )
        yield GaugeMetricFamily(
            "imserver_http_pollers", "HTTP long-polls waiting", value=len(hub.pollers)
        )
        limited = CounterMetricFamily(
            "imserver_rate_limited", "Requests refused by a rate limit", labels=["kind"]
        )
        for kind, n in sorted(hub.rejections().items()):
            limited.add_metric([kind], n)
        yield limited
        errors = CounterMetricFamily("imserver_errors", "Error replies by code", labels=["code"])
        for code, n in sorted(stats.errors.items()):
            errors.add_metric([code], n)
        yield errors
        kicks = CounterMetricFamily("imserver_kicks", "Connections kicked", labels=["reason"])
        for reason, n in sorted(stats.kicks.items()):
            kicks.add_metric([reason], n)
        yield kicks
        yield GaugeMetricFamily(
            "imserver_storage_up",
            "1 if the last storage call succeeded",
            value=1 if state.storage.up else 0,
        )


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.total)


def registry_for(state: ServerState) -> CollectorRegistry:
    """A registry holding only this server's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry``."""
    return generate_latest(registry)
