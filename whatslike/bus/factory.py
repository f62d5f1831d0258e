"""The bus a process uses, chosen by `bus_url` alone."""

from __future__ import annotations

from whatslike.bus import Bus
from whatslike.bus.kafka import KafkaBus
from whatslike.bus.memory import MemoryBus
from whatslike.metrics import Metrics
from whatslike.settings import Settings


def open_bus(settings: Settings, metrics: Metrics) -> Bus:
    """memory:// → the in-process bus; kafka://host:port[,…] → the Kafka bus (not yet
    connected: `start` reaches the brokers)."""
    if settings.bus_url.startswith("kafka://"):
        return KafkaBus(settings, metrics)
    return MemoryBus(settings, metrics)
