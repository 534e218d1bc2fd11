"""The event bus: one small interface (`EventBus`), a Kafka and an embedded SQLite implementation.

The feedback service and the inference service publish through it; the trainer consumes
through it. `open_bus(url)` picks the implementation from a URL.
"""

from fuseloop.bus.base import Assignment, BusConsumer, BusError, BusFull, EventBus, Record, TopicConfig
from fuseloop.bus.dedupe import EventDeduper, dedupe_key
from fuseloop.bus.url import open_bus

__all__ = ["Assignment", "BusConsumer", "BusError", "BusFull", "EventBus", "EventDeduper", "Record", "TopicConfig", "dedupe_key", "open_bus"]
