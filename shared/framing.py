"""Message framing: an envelope split into queue messages no larger than the queue allows.

Each message body is a small msgpack frame ``[magic, frame_version, event_id, index, count,
data]``. Message ids are ``<event_id>.<index>``, so a re-publish of the same event is
dropped by the queue's duplicate detection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import ormsgpack

from .errors import EnvelopeError, IncompleteEventError, UnknownEnvelopeVersionError

FRAME_MAGIC = "lgk"
FRAME_VERSION = 1
FRAME_OVERHEAD_BYTES = 256
"""Upper bound of a frame's bytes beyond its data slice (magic, ids, msgpack headers)."""

DEFAULT_MAX_MESSAGE_BYTES = 192 * 1024
"""Fits a Standard-tier Service Bus message (256 KB) with room for headers and properties."""


@dataclass(frozen=True, slots=True)
class Frame:
    event_id: str
    index: int
    count: int
    data: bytes

    @property
    def message_id(self) -> str:
        return message_id(self.event_id, self.index)


def message_id(event_id: str, index: int) -> str:
    return f"{event_id}.{index}"


def event_id_of(message_id: str) -> str | None:
    """The event a message id names, also a replayed copy's (``<message id>/replay-<n>``);
    ``None`` for an id this framing did not make."""
    event_id, dot, index = message_id.split("/", 1)[0].rpartition(".")
    return event_id if event_id and dot and index.isdigit() else None


def split_frames(event_id: str, envelope: bytes, max_message_bytes: int) -> list[Frame]:
    """Cut ``envelope`` into frames whose encoded size stays within ``max_message_bytes``."""
    room = max_message_bytes - FRAME_OVERHEAD_BYTES - len(event_id.encode())
    if room <= 0:
        raise ValueError(f"max_message_bytes={max_message_bytes} leaves no room for data")
    if len(envelope) <= room:  # the common case: one frame, and no copy of the bytes
        return [Frame(event_id, 0, 1, envelope)]
    slices = [envelope[i : i + room] for i in range(0, len(envelope), room)]
    return [Frame(event_id, i, len(slices), part) for i, part in enumerate(slices)]


def encode_frame(frame: Frame) -> bytes:
    """Like envelopes, encoded by ormsgpack (faster) and decoded by msgpack (stricter)."""
    return ormsgpack.packb(
        [FRAME_MAGIC, FRAME_VERSION, frame.event_id, frame.index, frame.count, frame.data]
    )


def decode_frame(body: bytes) -> Frame:
    """Parse one message body; anything that is not our frame raises ``EnvelopeError``."""
    try:
        raw = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise EnvelopeError(f"message body is not a msgpack frame: {type(exc).__name__}") from exc
    if not isinstance(raw, list) or len(raw) != 6 or raw[0] != FRAME_MAGIC:
        raise EnvelopeError("message body is not a langgraph-checkpoint-kusto frame")
    _, version, event_id, index, count, data = raw
    if version != FRAME_VERSION:
        raise UnknownEnvelopeVersionError(
            f"frame version {version!r} is not supported (this build reads {FRAME_VERSION})"
        )
    if not (
        isinstance(event_id, str)
        and isinstance(index, int)
        and isinstance(count, int)
        and isinstance(data, bytes)
        and 0 <= index < count
    ):
        raise EnvelopeError("frame fields have the wrong types or an index out of range")
    return Frame(event_id, index, count, data)


def join_frames(frames: Sequence[Frame]) -> bytes:
    """The envelope bytes of one event from all of its frames, in any order."""
    if not frames:
        raise IncompleteEventError("no frames to join")
    count = frames[0].count
    by_index = {f.index: f for f in frames if f.event_id == frames[0].event_id}
    if len(by_index) != count or any(f.count != count for f in frames):
        raise IncompleteEventError(
            f"event {frames[0].event_id} has {len(by_index)} of {count} parts"
        )
    return b"".join(by_index[i].data for i in range(count))
