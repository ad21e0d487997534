"""Faust's own Prometheus sensors, made cheap enough for every event.

Faust's ``PrometheusMonitor`` runs for every message and every stream event:
several ``labels()`` lookups, a regular-expression normalisation of the
stream's name, and the base monitor's per-event bookkeeping (a state dict and
two clock reads per event). In a worker doing tens of thousands of events a
second that was about a tenth of its main thread (py-spy; see the README's
throughput notes). :class:`LeanMonitor` keeps the same ``faust_*`` metrics
with the label children cached, and skips what nothing here reads: the
per-event runtime (``faust_events_runtime_ms``; agents here take events in
batches, timed by ``wal_batch_size`` and ``wal_delivery_seconds``) and the
base monitor's per-stream/task/time dictionaries.
"""

from __future__ import annotations

from typing import Any

from faust.sensors.prometheus import PrometheusMonitor, setup_prometheus_sensors
from faust.types import TP


class LeanMonitor(PrometheusMonitor):
    """``PrometheusMonitor`` with cached label children and no per-event timing."""

    def __init__(self, metrics: Any, **kwargs: Any) -> None:
        super().__init__(metrics=metrics, **kwargs)
        self._by_topic: dict[str, Any] = {}
        self._read_offset: dict[TP, Any] = {}
        self._end_offset: dict[TP, Any] = {}
        self._by_stream: dict[Any, Any] = {}

    def on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        self._metrics.active_messages.inc()
        self.on_records_in(tp, 1, offset)

    def on_records_in(self, tp: TP, count: int, last_offset: int) -> None:
        """``on_message_in`` for a lane's chunk (:mod:`~app.engine.lanes`): ``count`` at once."""
        m = self._metrics
        m.messages_received.inc(count)
        received = self._by_topic.get(tp.topic)
        if received is None:
            received = m.messages_received_per_topics.labels(topic=tp.topic)
            self._by_topic[tp.topic] = received
        received.inc(count)
        read = self._read_offset.get(tp)
        if read is None:
            read = m.messages_received_per_topics_partition.labels(
                topic=tp.topic, partition=tp.partition
            )
            self._read_offset[tp] = read
        read.set(last_offset)
        self.messages_received_total += count
        self.tp_read_offsets[tp] = last_offset

    def on_stream_event_in(self, tp: TP, offset: int, stream: Any, event: Any) -> None:
        m = self._metrics
        m.total_events.inc()
        m.total_active_events.inc()
        events = self._by_stream.get(stream)
        if events is None:
            label = f"stream.{self._stream_label(stream)}.events"
            events = m.total_events_per_stream.labels(stream=label)
            self._by_stream[stream] = events
        events.inc()
        self.events_total += 1
        return None

    def on_stream_event_out(
        self, tp: TP, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        self._metrics.total_active_events.dec()

    def on_message_out(self, tp: TP, offset: int, message: Any) -> None:
        self._metrics.active_messages.dec()

    def track_tp_end_offset(self, tp: TP, offset: int) -> None:
        end = self._end_offset.get(tp)
        if end is None:
            end = self._metrics.topic_partition_end_offset.labels(
                topic=tp.topic, partition=tp.partition
            )
            self._end_offset[tp] = end
        end.set(offset)
        self.tp_end_offsets[tp] = offset


def install_monitor(app: Any) -> None:
    """Faust's Prometheus sensors at ``/metrics`` (``faust_*``), with :class:`LeanMonitor`
    in place of its monitor (it takes over the monitor's metric objects)."""
    setup_prometheus_sensors(app, pattern="/metrics", name_prefix="faust")
    app.monitor = LeanMonitor(metrics=app.monitor._metrics)
