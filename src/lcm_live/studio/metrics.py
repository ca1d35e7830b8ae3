"""Prometheus metrics of one studio app, in its own CollectorRegistry (two apps in one process never mix)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; frames take from ~10 ms (GPU, 1 step) to tens of seconds (CPU, full VAE).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Frames per engine call (stream batching); 1 whenever batching is off (the default on a CPU).
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class StudioMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge("lcm_live_sessions_active", "Open WebSocket sessions", registry=r)
        self.queue_depth = Gauge("lcm_live_queue_depth", "Generations waiting for the worker", registry=r)
        self.frames_sent = Counter("lcm_live_frames_sent", "Frames sent to clients (previews included)", registry=r)
        self.frames_dropped = Counter(
            "lcm_live_frames_dropped", "Frames replaced by a newer one before a slow client could take them", registry=r
        )
        self.rejected = Counter("lcm_live_rejected", "Requests or messages refused", ["reason"], registry=r)
        self.errors = Counter("lcm_live_errors", "Failed generations", ["type"], registry=r)
        self.cancelled = Counter(
            "lcm_live_cancelled", "Generations stopped at a step (superseded input or disconnect)", registry=r
        )
        self.generation_seconds = Histogram(
            "lcm_live_generation_seconds", "Engine time of one finished generation", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "lcm_live_batch_size", "Generations run together in one engine call (stream batching)",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.first_frame_seconds = Histogram(
            "lcm_live_first_frame_seconds", "Input accepted to the first frame of that input sent",
            buckets=_LATENCY_BUCKETS, registry=r,
        )

        self.broadcast_viewers = Gauge("lcm_live_broadcast_viewers", "Open /broadcast MJPEG streams", registry=r)
        self.broadcast_frames = Counter("lcm_live_broadcast_frames", "Frames published to the broadcast", registry=r)

    def watch_connections(self, closed: Mapping[str, int]) -> None:
        """Export the connection guard's counts (studio/connections.py: why it closed or limited connections)
        as ``lcm_live_connections_closed_total{reason}``, read at each scrape."""
        self.registry.register(_ConnectionsClosed(closed))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ConnectionsClosed:
    """A collector over a live mapping of counts (the guard keeps them; nothing is copied until a scrape)."""

    def __init__(self, closed: Mapping[str, int]):
        self.closed = closed

    def describe(self) -> list:
        return []  # no fixed label set: collected at scrape time only

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("lcm_live_connections_closed", "Connections the guard closed or limited",
                                     labels=["reason"])
        for reason, count in sorted(dict(self.closed).items()):
            family.add_metric([reason], count)
        yield family
