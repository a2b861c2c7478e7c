"""Identifiers and ordering.

Event ids are random (uuid4) but fixed when the event is built, so every message of
the event and every row it becomes carry deterministic ids derived from it. ``seq`` is a
hybrid logical clock: wall-clock nanoseconds, strictly increasing within a process, so
a delete hides exactly what this process wrote before it.
"""

from __future__ import annotations

import threading
import time
import uuid


def new_event_id() -> str:
    return uuid.uuid4().hex


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
