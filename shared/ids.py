"""Identifiers and ordering.

An event id is fixed when the event is built, so every message of the event and every
row it becomes carry deterministic ids derived from it. Ids are a random per-publisher
prefix plus a counter: a publisher can ask Kusto which of its own events it has ingested
with one prefix query. ``seq`` is a hybrid logical clock: wall-clock nanoseconds,
strictly increasing within a process, so a delete hides exactly what this process wrote
before it.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid

EVENT_ID_PREFIX_LENGTH = 20


class EventIds:
    """``<publisher prefix><counter>``: unique across processes and restarts."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:EVENT_ID_PREFIX_LENGTH]
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self._counter):012x}"


def row_id(event_id: str, index: int) -> str:
    return f"{event_id}/{index}"


class SequenceClock:
    """Strictly increasing nanosecond timestamps, safe across threads."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last

    def observe(self, seq: int) -> None:
        """A sequence made elsewhere (a clock running ahead): later ones exceed it."""
        with self._lock:
            self._last = max(self._last, seq)
