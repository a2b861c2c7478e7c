"""Saver semantics beyond the conformance suite: deletes never resurrect, hostile values,
the sync API's event-loop guard, encryption, and a cache that never hands out its state."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from enum import Enum, IntEnum
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import AsyncKustoSaver, IngestionTimeoutError, KustoSaver
from langgraph.checkpoint.kusto.base import _json_safe
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.queries import Query, select_checkpoints
from langgraph.checkpoint.kusto.shared.ids import SequenceClock
from langgraph.checkpoint.serde.encrypted import EncryptedSerializer
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer


def _checkpoint(values: dict[str, Any], step: int = 0) -> Any:
    checkpoint = empty_checkpoint()
    checkpoint["id"] = str(uuid6(clock_seq=step))
    checkpoint["channel_values"] = values
    checkpoint["channel_versions"] = {k: f"{step + 1:032}.0" for k in values}
    return checkpoint


def _put(saver: Any, thread_id: str, values: dict[str, Any], step: int = 0, ns: str = "") -> Any:
    checkpoint = _checkpoint(values, step)
    return saver.put(
        {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns}},
        checkpoint,
        {"source": "loop", "step": step},
        checkpoint["channel_versions"],
    )


async def _aput(saver: Any, thread_id: str, values: dict[str, Any]) -> Any:
    checkpoint = _checkpoint(values)
    return await saver.aput(
        {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
        checkpoint,
        {"source": "loop", "step": 0},
        checkpoint["channel_versions"],
    )


def _drain(queue_url: str, stack: Any) -> None:
    """Run one worker until the queue is empty."""
    queue = open_queue(queue_url)
    ingestor = KustoIngestor(stack.cluster, stack.database)
    try:
        worker = Worker(queue, ingestor, max_wait=0.05)
        deadline = time.monotonic() + 30
        while queue.depth() and time.monotonic() < deadline:
            worker.run_once()
        assert queue.depth() == 0
    finally:
        ingestor.close()
        queue.close()


def _eventual(stack: Any, queue_url: str) -> Any:
    return KustoSaver.from_conn_string(
        queue_url, stack.cluster, stack.database, consistency="eventual"
    )


def test_older_put_ingested_after_the_delete_stays_deleted(stack: Any, private_queue: str) -> None:
    """LangGraph issue #7206: a late write must not resurrect a deleted thread."""
    thread_id = f"resurrect-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    queue = open_queue(private_queue)
    try:
        with _eventual(stack, private_queue) as saver:
            checkpoint = _checkpoint({"v": "old"})
            late_put, _ = saver._put_event(config, checkpoint, {"step": 0}, {"v": "1"})
            delete = saver._delete_thread_event(thread_id)
            # The delete reaches Kusto first; the older put arrives after it.
            queue.send(saver._messages(delete))
            _drain(private_queue, stack)
            queue.send(saver._messages(late_put))
            _drain(private_queue, stack)
            assert saver.get_tuple(config) is None
            assert list(saver.list(config)) == []

            _put(saver, thread_id, {"v": "new"}, step=1)
            _drain(private_queue, stack)
            found = saver.get_tuple(config)
            assert found is not None and found.checkpoint["channel_values"] == {"v": "new"}
            assert len(list(saver.list(config))) == 1
    finally:
        queue.close()


def test_session_read_hides_what_kusto_has_until_the_delete_arrives(
    stack: Any, private_queue: str
) -> None:
    thread_id = f"session-delete-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    with KustoSaver.from_conn_string(private_queue, stack.cluster, stack.database) as saver:
        _put(saver, thread_id, {"v": "old"})
        _drain(private_queue, stack)
        saver.delete_thread(thread_id)  # queued, not ingested: Kusto still has "old"
        with _eventual(stack, private_queue) as other_process:
            assert other_process.get_tuple(config) is not None
        assert saver.get_tuple(config) is None
        assert list(saver.list(config)) == []
        _put(saver, thread_id, {"v": "new"}, step=1)
        found = saver.get_tuple(config)
        assert found is not None and found.checkpoint["channel_values"] == {"v": "new"}


HOSTILE = [
    'it\'s "quoted"',
    "pipe | where 1==1",
    "semi; .drop table CheckpointEvents",
    "new\nline\r\n",
    "// comment",
    "unicode ✓ 漢字 🚀 \u200b",
    "unit\x1fseparator",  # the separator of blob keys (channel<US>version)
    "x" * 10_240,
]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v[:20]))
def test_hostile_values_round_trip_and_never_change_the_query(
    stack: Any, private_queue: str, value: str
) -> None:
    thread_id = f"{value}-{uuid.uuid4().hex[:6]}"
    namespace = f"ns:{value}"
    metadata_key = f"key {value}"
    with _eventual(stack, private_queue) as saver:
        values = {"v": value, f"channel {value}": value}
        checkpoint = _checkpoint(values)
        checkpoint["id"] = f"{checkpoint['id']}{value}"
        stored = saver.put(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": namespace}},
            checkpoint,
            {"source": "loop", "step": 0, metadata_key: value},
            checkpoint["channel_versions"],
        )
        _drain(private_queue, stack)
        found = saver.get_tuple(stored)
        assert found is not None
        assert found.config["configurable"] == {
            "thread_id": thread_id,
            "checkpoint_ns": namespace,
            "checkpoint_id": checkpoint["id"],
        }
        assert found.checkpoint["channel_values"] == values
        assert found.metadata[metadata_key] == value
        listed = list(
            saver.list(
                {"configurable": {"thread_id": thread_id, "checkpoint_ns": namespace}},
                filter={metadata_key: value},
            )
        )
        assert [t.checkpoint["id"] for t in listed] == [checkpoint["id"]]

    hostile = select_checkpoints(
        thread_id=thread_id,
        checkpoint_ns=namespace,
        checkpoint_id=checkpoint["id"],
        before_id=value,
        metadata_filter={metadata_key: value},
        limit=3,
    )
    benign = select_checkpoints(
        thread_id="t",
        checkpoint_ns="n",
        checkpoint_id="c",
        before_id="b",
        metadata_filter={"k": "v"},
        limit=3,
    )
    assert hostile.text == benign.text
    assert value not in hostile.text


CONFIG = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "c"}}
SYNC_CALLS = [
    ("get_tuple", lambda s: s.get_tuple(CONFIG)),
    ("list", lambda s: list(s.list(CONFIG))),
    ("put", lambda s: s.put(CONFIG, empty_checkpoint(), {}, {})),
    ("put_writes", lambda s: s.put_writes(CONFIG, [("a", 1)], "task")),
    ("delete_thread", lambda s: s.delete_thread("t")),
    ("delete_for_runs", lambda s: s.delete_for_runs(["r"])),
    ("copy_thread", lambda s: s.copy_thread("t", "u")),
    ("prune", lambda s: s.prune(["t"])),
    (
        "get_delta_channel_history",
        lambda s: s.get_delta_channel_history(config=CONFIG, channels=["a"]),
    ),
]


@pytest.mark.parametrize(("name", "call"), SYNC_CALLS, ids=[n for n, _ in SYNC_CALLS])
async def test_sync_calls_on_the_event_loop_thread_raise_instead_of_deadlocking(
    stack: Any, name: str, call: Any
) -> None:
    with (
        KustoSaver.from_conn_string(stack.queue_url, stack.cluster, stack.database) as saver,
        pytest.raises(RuntimeError, match="a\\* methods"),
    ):
        call(saver)
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as async_saver:
        with pytest.raises(RuntimeError, match="a\\* methods"):
            call(async_saver)


async def test_sync_setup_on_the_event_loop_thread_raises_too(stack: Any) -> None:
    """It ran, blocking the loop for its Kusto round trips (up to ``query_timeout`` each)."""
    with (
        KustoSaver.from_conn_string(stack.queue_url, stack.cluster, stack.database) as saver,
        pytest.raises(RuntimeError, match="a\\* methods"),
    ):
        saver.setup()


async def test_async_saver_sync_api_works_from_another_thread(stack: Any) -> None:
    thread_id = f"bridge-{uuid.uuid4().hex[:8]}"
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        found: list[Any] = []

        def app_thread() -> None:
            _put(saver, thread_id, {"v": 1})
            found.append(saver.get_tuple({"configurable": {"thread_id": thread_id}}))

        worker = threading.Thread(target=app_thread)
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.01)
        assert found[0] is not None and found[0].checkpoint["channel_values"] == {"v": 1}


async def test_encrypted_serializer_round_trips_and_kusto_never_sees_plaintext(
    stack: Any,
) -> None:
    serde = EncryptedSerializer.from_pycryptodome_aes(key=b"0123456789abcdef")
    thread_id = f"encrypted-{uuid.uuid4().hex[:8]}"
    secret = "the launch code is 0000"
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, serde=serde
    ) as saver:
        await _aput(saver, thread_id, {"secret": secret})
        await saver.wait_for_ingestion(timeout=30)
        raw = await saver.queries.run(
            Query(
                "declare query_parameters(t:string);\n"
                "CheckpointEvents | where ThreadId == t | project Payload",
                {"t": thread_id},
            )
        )
        assert raw and all(secret.encode().hex() not in str(r["Payload"]) for r in raw)
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="eventual", serde=serde
    ) as reader:
        found = await reader.aget_tuple({"configurable": {"thread_id": thread_id}})
        assert found is not None and found.checkpoint["channel_values"] == {"secret": secret}


@pytest.mark.parametrize(
    "first_message",
    [pytest.param("hello", id="plain values"), pytest.param(HumanMessage("hello"), id="objects")],
)
async def test_cached_reads_hand_out_fresh_objects(stack: Any, first_message: Any) -> None:
    """Plain values and objects are snapshotted differently (msgpack, pickle): both."""
    thread_id = f"fresh-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        _checkpoint_values = {"messages": [first_message], "nested": {"k": [1, 2]}}
        checkpoint = _checkpoint(copy.deepcopy(_checkpoint_values))
        written = await saver.aput(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
            checkpoint,
            {"step": 0, "tags": ["a"]},
            checkpoint["channel_versions"],
        )
        await saver.aput_writes(written, [("messages", {"note": ["w"]})], "task-1")
        first = await saver.aget_tuple(config)
        assert first is not None
        assert first.checkpoint["channel_values"] == _checkpoint_values
        assert first.metadata["tags"] == ["a"]
        expected = copy.deepcopy(first)
        # The first read decodes the stored values, the second makes the cache's snapshot,
        # later reads decode that: mutate what each of them hands out.
        for read in range(4):
            found = first if read == 0 else await saver.aget_tuple(config)
            assert found == expected
            assert found.pending_writes[0] == ("task-1", "messages", {"note": ["w"]})
            if isinstance(
                message := found.checkpoint["channel_values"]["messages"][0], HumanMessage
            ):
                message.content = "mutated"
            found.checkpoint["channel_values"]["messages"].append("mutated")
            found.checkpoint["channel_values"]["nested"]["k"].clear()
            found.checkpoint["channel_versions"]["messages"] = "999"
            found.metadata["tags"].append("mutated")
            found.config["configurable"]["checkpoint_id"] = "other"
            found.pending_writes[0][2]["note"].append("mutated")
            found.pending_writes.clear()


def _typed(value: Any) -> Any:
    """``value`` with the type of every part, so that equal values of other types differ."""
    if isinstance(value, dict):
        return dict, sorted((repr(_typed(k)), _typed(v)) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return type(value), [_typed(item) for item in value]
    return type(value), value


SNAPSHOT_VALUES = {
    "bytearray": bytearray(b"\x00\x01"),
    "number keys": {1: "one"},
    "datetime": datetime(2026, 1, 1, tzinfo=UTC),
    "uuid": uuid.UUID(int=7),
    "set": {"a"},
    "message": HumanMessage("hi"),
    "plain": {"k": [1.5, None, True, b"x", -(2**63), "é"]},
}


@pytest.mark.parametrize("value", SNAPSHOT_VALUES.values(), ids=SNAPSHOT_VALUES.keys())
async def test_cached_reads_return_the_values_and_types_a_kusto_read_returns(
    stack: Any, value: Any
) -> None:
    """The snapshot behind cache hits must not change a type a Kusto read keeps: msgpack
    would turn a bytearray into bytes, and a dict with number keys is not plain."""
    thread_id = f"types-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    values = {"value": value, "plain": ["a", 1]}
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        written = await _aput(saver, thread_id, values)
        await saver.aput_writes(written, [("value", value)], "task-1")
        # A read of the stored values, the snapshot's maker, a hit
        cached = [await saver.aget_tuple(config) for _ in range(3)]
        await saver.wait_for_ingestion(timeout=30)
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="eventual"
    ) as reader:
        from_kusto = await reader.aget_tuple(config)
    assert from_kusto is not None
    assert _typed(from_kusto.checkpoint["channel_values"]) == _typed(values)
    for found in cached:
        assert found is not None
        assert _typed(list(found)) == _typed(list(from_kusto))


class Colour(Enum):
    RED = "red"


METADATA = {
    "plain": {"source": "loop", "step": 3, "parents": {"": "1f0"}, "tags": ["a"], "x": 1.5},
    "bytes": {"raw": b"\x00", "again": bytearray(b"a")},
    "tuple, int keys": {"pair": (1, "a"), "by_id": {7: "seven", None: 0}},
    "datetime, uuid, enum": {"at": datetime(2026, 1, 1), "id": uuid.UUID(int=7), "c": Colour.RED},
    "subclasses": {"flag": OrderedDict(a=True), "n": IntEnum("N", "ONE").ONE},
    "bin header bytes in text and numbers": {"name": "Łódź ąę", "n": 50_000, "f": 1e-300},
    "nan and -0.0": {"nan": math.nan, "zero": -0.0, "inf": math.inf},
    "deep": {"d": functools.reduce(lambda inner, _: [inner], range(200), [])},
}


@pytest.mark.parametrize("metadata", METADATA.values(), ids=METADATA.keys())
def test_metadata_is_stored_as_json_makes_it_whichever_way_it_is_copied(
    metadata: dict[str, Any],
) -> None:
    """Plain metadata takes a msgpack round trip, the rest JSON's: the same values either
    way, and a copy the caller's later changes do not reach."""
    safe = _json_safe(metadata)
    expected = json.loads(json.dumps(metadata, default=str))
    assert repr(_typed(safe)) == repr(_typed(expected))  # by repr: nan equals no nan
    metadata.setdefault("plain", {})["later"] = 1
    assert "later" not in json.dumps(safe)


@dataclasses.dataclass
class ToolError(Exception):
    """Pickles, but does not unpickle: pickle calls ``ToolError(*args)``, args is ()."""

    code: int


def _holding_itself() -> list[Any]:
    looped: list[Any] = ["a"]
    looped.append(looped)
    return looped


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("value", "serde"),
    [
        pytest.param(
            ToolError(429),
            JsonPlusSerializer(allowed_msgpack_modules=[(__name__, "ToolError")]),
            id="an object pickle cannot load",
        ),
        pytest.param(
            _holding_itself(), JsonPlusSerializer(pickle_fallback=True), id="a list in itself"
        ),
    ],
)
async def test_cached_reads_of_values_no_snapshot_carries_back_still_work(
    stack: Any, value: Any, serde: Any
) -> None:
    """They are served value by value: a snapshot of them failed every read, or hung."""
    thread_id = f"unsnapped-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, serde=serde
    ) as saver:
        await _aput(saver, thread_id, {"value": value})
        for _ in range(3):  # the second read would make the snapshot
            found = await saver.aget_tuple(config)
            assert found is not None
            assert repr(found.checkpoint["channel_values"]["value"]) == repr(value)


def test_with_allowlist_returns_a_working_saver(stack: Any) -> None:
    thread_id = f"allow-{uuid.uuid4().hex[:8]}"
    with KustoSaver.from_conn_string(stack.queue_url, stack.cluster, stack.database) as saver:
        clone = saver.with_allowlist([("builtins", "dict")])
        _put(clone, thread_id, {"v": 1})
        found = clone.get_tuple({"configurable": {"thread_id": thread_id}})
        assert found is not None and found.checkpoint["channel_values"] == {"v": 1}


# --- this process's reads while Kusto lags behind its writes (found in review) -----------


def _session(stack: Any, queue_url: str, **options: Any) -> Any:
    return KustoSaver.from_conn_string(queue_url, stack.cluster, stack.database, **options)


def _ids(tuples: Any) -> list[str]:
    return [t.checkpoint["id"] for t in tuples]


def test_wait_for_ingestion_waits_for_deletes_too(stack: Any, private_queue: str) -> None:
    thread_id = f"wait-delete-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    with _session(stack, private_queue) as saver:
        _put(saver, thread_id, {"v": 1})
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)
        saver.delete_thread(thread_id)
        with pytest.raises(IngestionTimeoutError):
            saver.wait_for_ingestion(timeout=0.3)
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)
    with _eventual(stack, private_queue) as other:
        assert other.get_tuple(config) is None


def test_reads_after_a_run_delete_or_prune_kusto_lacks_still_fill_their_page(
    stack: Any, private_queue: str
) -> None:
    """Kusto picks the top rows before this process's hides apply: such reads wait for
    the delete or prune (one round of the worker here) instead of coming back short."""
    thread_id = f"hidden-page-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    with _session(stack, private_queue, cache_max_entries=1) as saver:
        first, second = _checkpoint({"v": "kept"}, 0), _checkpoint({"v": "gone"}, 1)
        kept = saver.put(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
            first,
            {"run_id": "run-kept"},  # type: ignore[typeddict-unknown-key]
            first["channel_versions"],
        )
        saver.put(kept, second, {"run_id": "run-gone"}, second["channel_versions"])  # type: ignore[typeddict-unknown-key]
        _put(saver, f"other-{thread_id}", {"x": 0})  # evicts the thread's entries
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)

        saver.delete_for_runs(["run-gone"])
        threading.Timer(0.2, _drain, args=(private_queue, stack)).start()
        found = saver.get_tuple(config)
        assert found is not None and found.checkpoint["channel_values"] == {"v": "kept"}
        assert _ids(saver.list(config, limit=1)) == [found.checkpoint["id"]]

        child = _put(saver, thread_id, {"v": "child"}, step=2, ns="child")
        _put(saver, thread_id, {"v": "newer"}, step=3)
        _drain(private_queue, stack)
        saver.prune([thread_id])  # keeps "newer" and "child"
        threading.Timer(0.2, _drain, args=(private_queue, stack)).start()
        assert len(_ids(saver.list(config, limit=2))) == 2
        assert child["configurable"]["checkpoint_id"] in _ids(saver.list(config, limit=2))


def test_a_list_of_all_threads_after_a_thread_delete_kusto_lacks_still_fills_its_page(
    stack: Any, private_queue: str
) -> None:
    """A thread delete hides rows between other threads' rows too: Kusto's top 1 was the
    deleted thread's checkpoint, dropped by the cache afterwards, so the page came back
    empty. Reads of all threads now wait for it, as they wait for run deletes."""
    tag = uuid.uuid4().hex
    with _eventual(stack, private_queue) as other_process:
        first = _checkpoint({"v": 1}, 0)
        kept = other_process.put(
            {"configurable": {"thread_id": f"kept-{tag[:8]}", "checkpoint_ns": ""}},
            first,
            {"tag": tag},
            first["channel_versions"],
        )
    with _session(stack, private_queue) as saver:
        newer = _checkpoint({"v": 2}, 1)
        deleted_thread = f"deleted-{tag[:8]}"
        saver.put(
            {"configurable": {"thread_id": deleted_thread, "checkpoint_ns": ""}},
            newer,
            {"tag": tag},
            newer["channel_versions"],
        )
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)
        saver.delete_thread(deleted_thread)
        threading.Timer(0.2, _drain, args=(private_queue, stack)).start()
        found = _ids(saver.list(None, filter={"tag": tag}, limit=1))
        assert found == [kept["configurable"]["checkpoint_id"]]


def test_a_list_with_a_namespace_of_none_includes_own_writes_of_every_namespace(
    stack: Any, private_queue: str
) -> None:
    """``checkpoint_ns: None`` means every namespace, to Kusto's query and to
    InMemorySaver; the cache compared each entry's namespace with None and dropped it."""
    thread_id = f"ns-none-{uuid.uuid4().hex[:8]}"
    with _session(stack, private_queue) as saver:
        root = _put(saver, thread_id, {"v": 1})
        child = _put(saver, thread_id, {"v": 2}, step=1, ns="child:1")
        config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": None}}
        assert sorted(_ids(saver.list(config))) == sorted(
            written["configurable"]["checkpoint_id"] for written in (root, child)
        )


def test_delta_channel_history_after_a_thread_delete_kusto_lacks_reads_nothing_deleted(
    stack: Any, private_queue: str
) -> None:
    """get_tuple answered None after the delete, but the history walked Kusto's rows of
    the deleted thread: its seed and writes came back."""
    thread_id = f"history-deleted-{uuid.uuid4().hex[:8]}"
    with _session(stack, private_queue) as saver:
        parent = _put(saver, thread_id, {"v": "secret"}, step=0)
        saver.put_writes(parent, [("v", "secret write")], "task")
        child = saver.put(parent, _checkpoint({}, 1), {"step": 1}, {})
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)
        saver.delete_thread(thread_id)  # on the queue, not in Kusto yet
        assert saver.get_tuple({"configurable": {"thread_id": thread_id}}) is None
        for config in (child, {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}):
            assert saver.get_delta_channel_history(config=config, channels=["v"]) == {
                "v": {"writes": []}
            }
        after = _put(saver, thread_id, {"v": "new"}, step=2)  # what follows the delete counts
        saver.put_writes(after, [("v", "new write")], "task")
        latest = saver.put(after, _checkpoint({}, 3), {"step": 3}, {})
        assert saver.get_delta_channel_history(config=latest, channels=["v"]) == {
            "v": {"writes": [("task", "v", "new write")], "seed": "new"}
        }


def test_writes_saved_before_their_checkpoint_are_read_once_the_cache_forgot_them(
    stack: Any, private_queue: str
) -> None:
    """LangGraph may save a step's writes before their checkpoint. Once Kusto holds them
    the cache lets them go and remembers the key (up to ``max_entries`` keys), so the put
    is not served whole from the cache; past that many, the put was served without them."""
    thread_id = f"early-writes-{uuid.uuid4().hex[:8]}"
    checkpoint = _checkpoint({"v": 1})
    config = {
        "configurable": {
            "thread_id": thread_id,
            "checkpoint_ns": "",
            "checkpoint_id": checkpoint["id"],
        }
    }
    with _session(stack, private_queue, cache_max_entries=1) as saver:
        saver.put_writes(config, [("v", "written first")], "task")
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)  # Kusto holds them: the cache lets them go
        newer = _checkpoint({"v": 0}, 1)["id"]
        saver.put_writes(
            {
                "configurable": {
                    "thread_id": f"other-{thread_id}",
                    "checkpoint_ns": "",
                    "checkpoint_id": newer,
                }
            },
            [("v", "other")],
            "task",
        )
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)  # one more key let go: the first is forgotten
        saver.put(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
            checkpoint,
            {"step": 0},
            checkpoint["channel_versions"],
        )
        threading.Timer(0.2, _drain, args=(private_queue, stack)).start()
        found = saver.get_tuple(config)
        assert found is not None
        assert found.pending_writes == [("task", "v", "written first")]


def test_list_keeps_own_writes_evicted_while_kusto_is_asked(stack: Any, private_queue: str) -> None:
    thread_id = f"evicted-meanwhile-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    with _session(stack, private_queue, cache_max_entries=1) as saver:
        _put(saver, thread_id, {"v": "mine"})
        ask_kusto = saver.queries.run

        def another_thread_writes_meanwhile(query: Query, within: float | None = None) -> Any:
            saver.queries.run = ask_kusto
            _put(saver, f"other-{thread_id}", {"x": 0})  # evicts the entry, unconfirmed
            return ask_kusto(query, within)

        saver.queries.run = another_thread_writes_meanwhile
        assert [t.checkpoint["channel_values"] for t in saver.list(config)] == [{"v": "mine"}]


def test_a_put_applied_after_this_process_deleted_its_thread_stays_deleted(
    stack: Any, private_queue: str
) -> None:
    thread_id = f"late-put-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    with _session(stack, private_queue) as saver:
        late_put, _ = saver._put_event(config, _checkpoint({"v": "old"}), {"step": 0}, {"v": "1"})
        saver.delete_thread(thread_id)
        saver._publish(late_put)  # its send finished after the delete's
        assert saver.get_tuple(config) is None
        assert list(saver.list(config)) == []
        _drain(private_queue, stack)
        assert saver.get_tuple(config) is None


def test_get_tuple_without_a_namespace_reads_the_root_namespace(
    stack: Any, private_queue: str
) -> None:
    thread_id = f"root-ns-{uuid.uuid4().hex[:8]}"
    with _session(stack, private_queue, cache_max_entries=1) as saver:
        _put(saver, thread_id, {"v": "root"}, step=0)
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)
        _put(saver, thread_id, {"v": "child"}, step=1, ns="child:1")  # evicts the root entry
        found = saver.get_tuple({"configurable": {"thread_id": thread_id}})
        assert found is not None and found.checkpoint["channel_values"] == {"v": "root"}


def test_delta_channel_history_includes_own_writes_kusto_lacks(
    stack: Any, private_queue: str
) -> None:
    """Writes this process made to a checkpoint another process wrote."""
    thread_id = f"history-{uuid.uuid4().hex[:8]}"
    with _eventual(stack, private_queue) as other:
        parent = _put(other, thread_id, {"v": "seed"}, step=0)
        child = other.put(parent, _checkpoint({}, 1), {"step": 1}, {})
    _drain(private_queue, stack)
    with _session(stack, private_queue) as saver:
        saver.put_writes(parent, [("v", "mine")], "task")
        history = saver.get_delta_channel_history(config=child, channels=["v"])
        assert history["v"] == {"writes": [("task", "v", "mine")], "seed": "seed"}


def test_a_prune_spares_what_another_process_published_that_it_did_not_see(
    stack: Any, private_queue: str
) -> None:
    """Deletes never over-delete: a prune hides only checkpoints as new as it saw."""
    thread_id = f"prune-race-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    with _session(stack, private_queue) as writer:
        _put(writer, thread_id, {"v": "seen"}, step=0)
        _drain(private_queue, stack)
        _put(writer, thread_id, {"v": "not yet in Kusto"}, step=1)
        with _eventual(stack, private_queue) as pruner:
            pruner.prune([thread_id])
        _drain(private_queue, stack)
    with _eventual(stack, private_queue) as reader:
        found = reader.get_tuple(config)
        assert found is not None
        assert found.checkpoint["channel_values"] == {"v": "not yet in Kusto"}


def test_run_ids_and_thread_ids_may_come_from_an_iterator(stack: Any, private_queue: str) -> None:
    thread_id = f"iter-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    with _session(stack, private_queue) as saver:
        checkpoint = _checkpoint({"v": 1})
        saver.put(config, checkpoint, {"run_id": "run-1"}, checkpoint["channel_versions"])  # type: ignore[typeddict-unknown-key]
        saver.delete_for_runs(iter(["run-1"]))
        saver.prune(iter([thread_id]), strategy="delete")
        _drain(private_queue, stack)
        saver.wait_for_ingestion(timeout=10)  # each event reached Kusto: none was empty
        assert saver.get_tuple(config) is None
    with _eventual(stack, private_queue) as other:
        assert other.get_tuple(config) is None


class _ClockBehind(SequenceClock):
    """The sequence clock of a replica whose wall clock runs 200 ms behind the others'."""

    def next(self) -> int:
        with self._lock:
            self._last = max(time.time_ns() - 200_000_000, self._last + 1)
            return self._last


@pytest.mark.parametrize("delete", ["delete_thread", "prune"])
def test_a_strong_delete_from_a_replica_whose_clock_runs_behind_still_deletes(
    stack: Any, private_queue: str, start_worker: Any, delete: str
) -> None:
    """A delete hides rows with a smaller sequence. Stamped by a clock 200 ms behind, a
    strong delete made right after another replica's write hid nothing: both replicas read
    the deleted state back. A strong delete is now stamped above the thread's newest row
    (``prune(strategy="delete")`` was not, until it became ``delete_thread`` per thread)."""
    start_worker(private_queue)
    thread_id = f"skew-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    strong = (private_queue, stack.cluster, stack.database)
    with (
        KustoSaver.from_conn_string(*strong, consistency="strong") as writer,
        KustoSaver.from_conn_string(*strong, consistency="strong") as deleter,
    ):
        deleter._clock = _ClockBehind()
        _put(writer, thread_id, {"secret": "pii"})
        if delete == "prune":
            deleter.prune([thread_id], strategy="delete")
        else:
            deleter.delete_thread(thread_id)
        assert deleter.get_tuple(config) is None
        assert writer.get_tuple(config) is None


def test_a_delete_after_reading_a_thread_sorts_after_what_was_read(
    stack: Any, private_queue: str, start_worker: Any
) -> None:
    """Reads advance the clock past the rows they return (a Lamport clock), so a session
    replica that read a thread and then deleted it hides what it read, whatever its clock."""
    start_worker(private_queue)
    thread_id = f"skew-read-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id}}
    with (
        KustoSaver.from_conn_string(
            private_queue, stack.cluster, stack.database, consistency="strong"
        ) as writer,
        KustoSaver.from_conn_string(private_queue, stack.cluster, stack.database) as deleter,
    ):
        deleter._clock = _ClockBehind()
        _put(writer, thread_id, {"secret": "pii"})
        assert deleter.get_tuple(config) is not None
        deleter.delete_thread(thread_id)
        deleter.wait_for_ingestion(timeout=30)
        with _eventual(stack, private_queue) as reader:
            assert reader.get_tuple(config) is None


@pytest.mark.parametrize("delete", ["adelete_thread", "aprune"])
async def test_an_async_strong_delete_from_a_replica_whose_clock_runs_behind_still_deletes(
    stack: Any, private_queue: str, start_worker: Any, delete: str
) -> None:
    start_worker(private_queue)
    thread_id = f"skew-async-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    strong = (private_queue, stack.cluster, stack.database)
    async with (
        AsyncKustoSaver.from_conn_string(*strong, consistency="strong") as writer,
        AsyncKustoSaver.from_conn_string(*strong, consistency="strong") as deleter,
    ):
        deleter._clock = _ClockBehind()
        checkpoint = _checkpoint({"secret": "pii"})
        await writer.aput(config, checkpoint, {"step": 0}, checkpoint["channel_versions"])
        if delete == "aprune":
            await deleter.aprune([thread_id], strategy="delete")
        else:
            await deleter.adelete_thread(thread_id)
        assert await deleter.aget_tuple(config) is None
        assert await writer.aget_tuple(config) is None
