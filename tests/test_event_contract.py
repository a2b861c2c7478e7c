"""The event contract in shared/: envelope codec, framing, rows and assembly."""

from __future__ import annotations

import os
from dataclasses import replace

import msgpack
import pytest
from langgraph.checkpoint.kusto.shared.assembly import assemble
from langgraph.checkpoint.kusto.shared.envelope import (
    Blob,
    Event,
    EventKind,
    Write,
    decode_event,
    encode_event,
)
from langgraph.checkpoint.kusto.shared.errors import (
    EnvelopeError,
    IncompleteEventError,
    UnknownEnvelopeVersionError,
)
from langgraph.checkpoint.kusto.shared.framing import (
    decode_frame,
    encode_frame,
    event_id_of,
    join_frames,
    split_frames,
)
from langgraph.checkpoint.kusto.shared.rows import KEY_SEPARATOR, ROW_CHUNK_BYTES, event_rows


def _put(event_id: str = "e1", seq: int = 1, data: bytes = b"cp", blob: bytes = b"v") -> Event:
    return Event(
        kind=EventKind.PUT,
        event_id=event_id,
        seq=seq,
        published_at=1_700_000_000.5,
        thread_id="t|'\n;",
        checkpoint_ns="",
        checkpoint_id="c1",
        checkpoint_type="msgpack",
        checkpoint_data=data,
        channel_versions={"a": "1"},
        metadata={"source": "loop", "step": 1},
        blobs=(Blob("a", "1", "msgpack", blob),),
    )


def test_envelope_round_trips_every_field() -> None:
    event = Event(
        kind=EventKind.PUT_WRITES,
        event_id="e",
        seq=42,
        published_at=1.25,
        thread_id="t",
        checkpoint_ns="ns",
        checkpoint_id="c",
        writes=(Write("task", "path", -1, "__error__", "msgpack", b"\x00\xff"),),
    )
    assert decode_event(encode_event(event)) == event
    assert decode_event(encode_event(_put())) == _put()


@pytest.mark.parametrize(
    "body",
    [
        os.urandom(64),
        b"",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1, "kind": "put"}),
        msgpack.packb({"v": 1, "kind": "nonsense", "id": "x"}),
    ],
)
def test_malformed_envelopes_raise_typed_error(body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_event(body)


def test_unknown_version_is_its_own_reason() -> None:
    raw = msgpack.unpackb(encode_event(_put()))
    raw["v"] = 99
    with pytest.raises(UnknownEnvelopeVersionError) as caught:
        decode_event(msgpack.packb(raw, use_bin_type=True))
    assert caught.value.reason == "UnknownEnvelopeVersion"


def test_frames_respect_max_size_and_rejoin_in_any_order() -> None:
    envelope = os.urandom(100_000)
    frames = split_frames("event", envelope, max_message_bytes=4096)
    bodies = [encode_frame(f) for f in frames]
    assert len(frames) > 20
    assert max(len(b) for b in bodies) <= 4096
    assert len({f.message_id for f in frames}) == len(frames)
    decoded = [decode_frame(b) for b in reversed(bodies)]
    assert join_frames(decoded) == envelope


def test_missing_frame_is_incomplete() -> None:
    frames = split_frames("event", os.urandom(10_000), max_message_bytes=2048)
    with pytest.raises(IncompleteEventError):
        join_frames(frames[1:])


def test_random_bytes_are_not_a_frame() -> None:
    with pytest.raises(EnvelopeError):
        decode_frame(os.urandom(32))


def test_large_payload_is_chunked_below_kusto_string_limit_and_reassembles() -> None:
    data = os.urandom(3 * ROW_CHUNK_BYTES + 7)
    rows = event_rows(_put(data=data))
    checkpoint_rows = [r for r in rows if r["RowKind"] == "checkpoint"]
    assert len(checkpoint_rows) == 4
    assert max(len(r["Payload"]) for r in rows) < 1_000_000
    [stored] = assemble(rows)
    assert stored.checkpoint.data == data
    assert stored.blobs["a"].data == b"v"


def test_a_channel_name_holding_the_key_separator_reads_back_whole() -> None:
    """A blob key is ``channel<US>version``; split at its first separator, a channel
    named ``a<US>b`` read back as channel ``a`` at version ``b<US>1``. Versions hold no
    separator (the saver makes them of digits and a dot), channel names may."""
    channel = f"a{KEY_SEPARATOR}b"
    event = replace(
        _put(), channel_versions={channel: "1"}, blobs=(Blob(channel, "1", "msgpack", b"v"),)
    )
    [stored] = assemble(event_rows(event))
    assert stored.channel_versions == {channel: "1"}
    assert stored.blobs[channel].data == b"v"


def test_assembly_drops_redelivered_copies_and_torn_payloads() -> None:
    rows = event_rows(_put(data=os.urandom(2 * ROW_CHUNK_BYTES)))
    [stored] = assemble(rows + rows)
    assert stored.checkpoint.event_id == "e1"
    # A later put of the same checkpoint with a missing chunk is ignored, not torn.
    later = [r for r in event_rows(_put("e2", 2, os.urandom(2 * ROW_CHUNK_BYTES))) if r["Chunk"]]
    [stored_again] = assemble(rows + later)
    assert stored_again.checkpoint.event_id == "e1"


def test_writes_keep_first_regular_and_last_special() -> None:
    def writes(event_id: str, seq: int, value: bytes) -> Event:
        return Event(
            kind=EventKind.PUT_WRITES,
            event_id=event_id,
            seq=seq,
            published_at=0.0,
            thread_id="t|'\n;",
            checkpoint_id="c1",
            writes=(
                Write("task", "", 0, "a", "bytes", value),
                Write("task", "", -1, "__error__", "bytes", value),
            ),
        )

    rows = (
        event_rows(_put())
        + event_rows(writes("w1", 5, b"first"))
        + event_rows(writes("w2", 6, b"second"))
    )
    [stored] = assemble(rows)
    by_idx = {w.idx: w.value.data for w in stored.writes}
    assert by_idx == {0: b"first", -1: b"second"}


def test_a_message_id_names_its_event_also_in_a_replayed_copy() -> None:
    (frame,) = split_frames("ab12", b"envelope", 1024)
    assert event_id_of(frame.message_id) == "ab12"
    assert event_id_of(f"{frame.message_id}/replay-7") == "ab12"
    for foreign in ("no-index", "ab12.x", ".0", "sha256:" + "0" * 64):
        assert event_id_of(foreign) is None
