"""The read cache: bounded, never serves state older than this process wrote."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import AsyncKustoSaver, IngestionTimeoutError, KustoSaver
from langgraph.checkpoint.kusto.cache import (
    BLOB_OVERHEAD_BYTES,
    ENTRY_OVERHEAD_BYTES,
    PENDING_EVENT_BYTES,
    RECORD_ITEM_BYTES,
    ReadCache,
)
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.shared.assembly import StoredCheckpoint, StoredWrite
from langgraph.checkpoint.kusto.shared.rows import StoredValue
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer


def _stored(thread: str, checkpoint_id: str, size: int = 10) -> StoredCheckpoint:
    value = StoredValue("e", 1, "bytes", b"x" * size)
    return StoredCheckpoint(
        thread_id=thread,
        checkpoint_ns="",
        checkpoint_id=checkpoint_id,
        parent_checkpoint_id="",
        checkpoint=StoredValue("e", 1, "bytes", b"c"),
        metadata={},
        channel_versions={"v": "1"},
        blobs={"v": value},
    )


@pytest.mark.parametrize("seed", range(20))
def test_a_thread_s_entries_are_what_a_scan_of_all_entries_finds(seed: int) -> None:
    """``of_thread``, deletes and prunes look a thread's entries up instead of scanning all
    of them (10,000 entries: ~3 ms a call, under the lock, against ~6 µs): the lookup must
    agree with the scan through puts, replacements, evictions, deletes and prunes."""
    rng = random.Random(seed)
    cache = ReadCache(max_entries=6)
    threads = ["a", "b", "c"]
    for seq in range(1, 200):
        thread, roll = rng.choice(threads), rng.random()
        if roll < 0.7:
            cache.put(_stored(thread, str(rng.randint(1, 5))), f"ev-{seq}", seq)
        elif roll < 0.8:
            cache.delete_thread(thread, f"ev-{seq}", seq)
        elif roll < 0.9:
            kept = {("", str(n)) for n in range(1, 6) if rng.random() < 0.5}
            cache.prune(thread, kept, f"ev-{seq}", seq)
        else:
            cache.confirm([f"ev-{n}" for n in range(seq)])
        everything = cache.of_thread(None)
        for name in threads:
            found = sorted(stored.key for stored in cache.of_thread(name))
            assert found == sorted(stored.key for stored in everything if stored.thread_id == name)


def test_eviction_is_lru_and_remembers_unconfirmed_keys() -> None:
    cache = ReadCache(max_entries=2)
    assert cache.put(_stored("a", "1"), "ev-a", 1)
    assert cache.put(_stored("b", "1"), "ev-b", 2)
    assert cache.get(("a", "", "1")) is not None  # a is now most recently used
    assert cache.put(_stored("c", "1"), "ev-c", 3)
    assert len(cache) == 2
    assert cache.latest("b", "") is None  # evicted, never served stale
    assert cache.awaited("b", "", None) == {"ev-b": 2}
    assert cache.awaited("a", "", None) == {}
    cache.confirm({"ev-b"})
    assert cache.awaited("b", None, None) == {}


def test_confirmed_entries_evict_without_a_trace() -> None:
    cache = ReadCache(max_entries=1)
    cache.put(_stored("a", "1"), "ev-a", 1)
    cache.confirm({"ev-a"})
    cache.put(_stored("b", "1"), "ev-b", 2)
    assert len(cache) == 1
    assert cache.awaited(None, None, None) == {}


def test_byte_bound_counts_shared_blobs_once() -> None:
    cache = ReadCache(max_bytes=20_000)
    first = _stored("a", "1", size=4000)
    cache.put(first, "e1", 1)
    second = _stored("a", "2", size=0)
    second.blobs = {}  # inherits blob v@1 from the first checkpoint
    assert cache.put(second, "e2", 2)
    entry, blob = ENTRY_OVERHEAD_BYTES + 1, BLOB_OVERHEAD_BYTES + 4000
    assert cache.size_bytes == 2 * entry + blob + 2 * PENDING_EVENT_BYTES
    cache.confirm({"e1", "e2"})
    assert cache.size_bytes == 2 * entry + blob
    cache.put(_stored("b", "1", size=15_000), "e3", 3)
    assert cache.size_bytes <= 20_000


def test_evicted_unconfirmed_write_makes_reads_wait_for_kusto(
    stack: Any, private_queue: str, start_worker: Any
) -> None:
    thread = f"evicted-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread}}
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, cache_max_entries=1, strong_timeout=0.5
    ) as saver:
        checkpoint = empty_checkpoint()
        saver.put(
            {"configurable": {"thread_id": thread, "checkpoint_ns": ""}},
            checkpoint,
            {"step": 0},
            {},
        )
        other = empty_checkpoint()
        saver.put({"configurable": {"thread_id": "other", "checkpoint_ns": ""}}, other, {}, {})
        # Nothing is ingested yet (no worker on this queue): the evicted checkpoint is not
        # in Kusto, and returning "no checkpoint" would be older state than we wrote.
        with pytest.raises(IngestionTimeoutError):
            saver.get_tuple(config)

        start_worker(private_queue)
        saver.strong_timeout = 30
        found = saver.get_tuple(config)
        assert found is not None and found.checkpoint["id"] == checkpoint["id"]


MEMORY_PROBE = r"""
import json, sys, tracemalloc
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import KustoSaver

queue, cluster, database, max_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
total, threads = int(sys.argv[5]), int(sys.argv[6])
payload = "x" * 1000
samples = []
with KustoSaver.from_conn_string(
    queue, cluster, database, cache_max_entries=1_000_000, cache_max_bytes=max_bytes
) as saver:
    tracemalloc.start()
    for i in range(total):
        checkpoint = empty_checkpoint()
        checkpoint["id"] = str(uuid6(clock_seq=i))
        checkpoint["channel_values"] = {"state": f"{payload}{i}"}
        checkpoint["channel_versions"] = {"state": f"{i + 1:032}.0"}
        saver.put(
            {"configurable": {"thread_id": f"memory-{i % threads}", "checkpoint_ns": ""}},
            checkpoint,
            {"source": "loop", "step": i},
            checkpoint["channel_versions"],
        )
        if i % 2000 == 0:
            samples.append(tracemalloc.get_traced_memory()[0])
    samples.append(tracemalloc.get_traced_memory()[0])
    print(json.dumps({
        "peak_traced": max(samples),
        "first_traced": samples[1],
        "cache_bytes": saver.cache.size_bytes,
        "entries": len(saver.cache),
        "pending": saver.cache.pending_count(),
    }))
"""


@pytest.mark.slow
def test_memory_stays_under_the_cache_bound_over_100k_checkpoints(
    stack: Any, private_queue: str, start_worker: Any
) -> None:
    """100,000 checkpoints over 10,000 threads through one saver, a worker ingesting."""
    max_bytes = 16 * 1024 * 1024
    start_worker(private_queue)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_PROBE,
            private_queue,
            stack.cluster,
            stack.database,
            str(max_bytes),
            "100000",
            "10000",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["cache_bytes"] <= max_bytes
    # The bound covers what the cache remembers of unconfirmed events too, however far the
    # worker lags (a CI run once peaked 13.8 MB over the bound when it did not).
    # Measured here since: peak 17.3 MB for a 16 MB bound.
    fixed_overhead = 4 * 1024 * 1024
    assert report["peak_traced"] <= max_bytes + fixed_overhead, report


def _put_on_thread(saver: KustoSaver, thread: str) -> str:
    checkpoint = empty_checkpoint()
    saver.put({"configurable": {"thread_id": thread, "checkpoint_ns": ""}}, checkpoint, {}, {})
    return checkpoint["id"]


def test_with_the_worker_down_unconfirmed_events_stay_in_the_bound_and_writes_wait(
    stack: Any, private_queue: str, start_worker: Any
) -> None:
    """No worker: what the cache remembers of unconfirmed events fills the byte bound, then
    a write waits for the ingestor, is refused without being sent, and succeeds once the
    worker runs. Before, the bookkeeping grew ~1 KB an event without limit."""
    max_bytes = 40 * PENDING_EVENT_BYTES
    prefix = f"backlog-{uuid.uuid4().hex[:8]}"
    written: dict[str, str] = {}
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, cache_max_bytes=max_bytes, strong_timeout=0.3
    ) as saver:
        with pytest.raises(IngestionTimeoutError, match="this write was not sent"):
            for i in range(100):
                written[f"{prefix}-{i}"] = _put_on_thread(saver, f"{prefix}-{i}")
        assert saver.cache is not None
        assert len(written) == 40  # what the bound holds: 40 unconfirmed events
        assert saver.cache.size_bytes <= max_bytes
        queue = open_queue(private_queue)
        try:
            assert queue.depth() == len(written)  # the refused write is not in the outbox
        finally:
            queue.close()

        start_worker(private_queue)
        saver.strong_timeout = 30
        refused = f"{prefix}-{len(written)}"
        written[refused] = _put_on_thread(saver, refused)
        for thread, checkpoint_id in written.items():
            found = saver.get_tuple({"configurable": {"thread_id": thread}})
            assert found is not None and found.checkpoint["id"] == checkpoint_id


async def test_concurrent_writes_share_the_room_and_the_rest_are_refused_unsent(
    stack: Any, private_queue: str
) -> None:
    """LangGraph runs a step's put_writes concurrently: each must reserve its room before
    sending, or all of them pass the check and overshoot the bound together."""
    async with AsyncKustoSaver.from_conn_string(
        private_queue,
        stack.cluster,
        stack.database,
        cache_max_bytes=5 * PENDING_EVENT_BYTES,
        strong_timeout=1.0,
    ) as saver:

        async def put(n: int) -> None:
            config = {"configurable": {"thread_id": f"concurrent-{n}", "checkpoint_ns": ""}}
            await saver.aput(config, empty_checkpoint(), {}, {})

        rounds = 0
        confirm = saver._confirm

        async def counted(seqs: Any) -> Any:
            nonlocal rounds
            rounds += 1
            return await confirm(seqs)

        saver._confirm = counted  # type: ignore[method-assign]
        outcomes = await asyncio.gather(*(put(n) for n in range(20)), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, IngestionTimeoutError)]
        assert len(refused) == 15 and outcomes.count(None) == 5
        # The 15 waiters share one confirmation round per 0.5 s (each on its own: ~100).
        assert rounds <= 6
        assert saver.cache is not None and saver.cache.size_bytes <= 5 * PENDING_EVENT_BYTES
        queue = open_queue(private_queue)
        try:
            assert queue.depth() == 5
        finally:
            queue.close()


UNREACHABLE_CLUSTER = "http://127.0.0.1:9"
"""Nothing listens on the discard port: every query fails to connect."""


def test_sync_writes_succeed_while_kusto_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Asking Kusto which events it holds only frees cache room: when Kusto is down, the
    write that asked (already on the queue) must not fail. It raised KustoNetworkError."""
    monkeypatch.setattr("langgraph.checkpoint.kusto.base.PENDING_LIMIT", 2)
    monkeypatch.setattr("langgraph.checkpoint.kusto.base.CONFIRM_INTERVAL", 0.0)
    queue_url = f"sqlite:///{tmp_path / 'q.db'}"
    with KustoSaver.from_conn_string(queue_url, UNREACHABLE_CLUSTER) as saver:
        written = {f"down-{i}": _put_on_thread(saver, f"down-{i}") for i in range(6)}
        for thread, checkpoint_id in written.items():
            found = saver.get_tuple({"configurable": {"thread_id": thread}})
            assert found is not None and found.checkpoint["id"] == checkpoint_id
        assert saver._confirming is not None  # a round ran, on a thread of its own
        saver._confirming.join(timeout=30)
    assert "could not ask Kusto which events it has ingested" in caplog.text
    queue = open_queue(queue_url)
    try:
        assert queue.depth() == 6
    finally:
        queue.close()


async def test_async_writes_neither_wait_for_nor_fail_on_kusto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The async saver asks Kusto in the background: a write returns while the round is
    still waiting for Kusto, and a failed round is logged, not raised."""
    monkeypatch.setattr("langgraph.checkpoint.kusto.base.PENDING_LIMIT", 2)
    monkeypatch.setattr("langgraph.checkpoint.kusto.base.CONFIRM_INTERVAL", 0.0)
    async with AsyncKustoSaver.from_conn_string(
        f"sqlite:///{tmp_path / 'q.db'}", UNREACHABLE_CLUSTER
    ) as saver:
        kusto_answers = asyncio.Event()
        confirm = saver._confirm

        async def slow_kusto(events: Any) -> Any:
            await kusto_answers.wait()
            return await confirm(events)

        saver._confirm = slow_kusto  # type: ignore[method-assign]
        ids = []
        for i in range(6):
            checkpoint = empty_checkpoint()
            config = {"configurable": {"thread_id": f"down-{i}", "checkpoint_ns": ""}}
            await asyncio.wait_for(saver.aput(config, checkpoint, {}, {}), timeout=5)
            ids.append(checkpoint["id"])
        assert saver._confirming is not None  # one round, still waiting for Kusto
        kusto_answers.set()
        await asyncio.wait_for(saver._confirming, timeout=30)
        for i, checkpoint_id in enumerate(ids):
            found = await saver.aget_tuple({"configurable": {"thread_id": f"down-{i}"}})
            assert found is not None and found.checkpoint["id"] == checkpoint_id
    assert "could not ask Kusto which events it has ingested" in caplog.text


@pytest.mark.parametrize("saver_class", [KustoSaver, AsyncKustoSaver])
async def test_a_write_waiting_for_room_while_kusto_is_unreachable_is_refused_unsent(
    tmp_path: Path, saver_class: Any
) -> None:
    """It raised the connection error from a confirmation round instead of waiting out
    ``strong_timeout`` for Kusto to come back and refusing the write."""
    options = {"cache_max_bytes": 3 * PENDING_EVENT_BYTES, "strong_timeout": 0.3}
    queue_url = f"sqlite:///{tmp_path / 'q.db'}"
    with pytest.raises(IngestionTimeoutError, match="this write was not sent"):
        if saver_class is KustoSaver:
            with KustoSaver.from_conn_string(queue_url, UNREACHABLE_CLUSTER, **options) as sync:
                for i in range(4):
                    await asyncio.to_thread(_put_on_thread, sync, f"room-{i}")
        else:
            async with AsyncKustoSaver.from_conn_string(
                queue_url, UNREACHABLE_CLUSTER, **options
            ) as saver:
                for i in range(4):
                    config = {"configurable": {"thread_id": f"room-{i}", "checkpoint_ns": ""}}
                    await saver.aput(config, empty_checkpoint(), {}, {})
    queue = open_queue(queue_url)
    try:
        assert queue.depth() == 3
    finally:
        queue.close()


def test_reserved_room_is_counted_once_and_given_back_when_not_sent() -> None:
    cache = ReadCache(max_bytes=3 * PENDING_EVENT_BYTES)
    assert cache.reserve(2) and cache.size_bytes == 2 * PENDING_EVENT_BYTES
    assert not cache.reserve(2)  # 4 would not fit
    cache.delete_thread("t", "e1", 1)  # one reserved event remembered: counted already
    assert cache.size_bytes == 2 * PENDING_EVENT_BYTES
    cache.release(1)  # the other was not sent
    assert cache.size_bytes == PENDING_EVENT_BYTES
    assert cache.reserve(2) and not cache.reserve(1)
    cache.release(2)
    cache.confirm(["e1"])
    assert cache.size_bytes == 0
    assert cache.reserve(10)  # larger than the bound: goes alone, nothing else unconfirmed
    assert not cache.reserve(1)


def test_put_writes_without_writes_publishes_nothing(stack: Any, private_queue: str) -> None:
    """An event without rows would never be confirmed by Kusto: it would hold its room
    in the cache for good, and reads of its checkpoint would wait for it."""
    with KustoSaver.from_conn_string(private_queue, stack.cluster, stack.database) as saver:
        config = {"configurable": {"thread_id": "no-writes", "checkpoint_ns": ""}}
        config = saver.put(config, empty_checkpoint(), {}, {})
        saver.put_writes(config, [], "task")
        assert saver.cache is not None and saver.cache.pending_count() == 1  # the put only
    queue = open_queue(private_queue)
    try:
        assert queue.depth() == 1
    finally:
        queue.close()


def test_snapshot_is_made_on_the_second_read_counted_and_remade_after_new_writes() -> None:
    """Not on the first: an agent reads most checkpoints once (its next run's start)."""
    made: list[int] = []

    def snapshot(stored: StoredCheckpoint) -> tuple[str, bytes]:
        made.append(len(stored.writes))
        return ("writes", str(len(stored.writes)).encode() * 100)

    cache = ReadCache(snapshot=snapshot)
    cache.put(_stored("a", "1"), "ev-a", 1)
    before = cache.size_bytes
    first = cache.get(("a", "", "1"))
    assert isinstance(first, StoredCheckpoint) and first.checkpoint_id == "1"
    assert made == [] and cache.size_bytes == before
    assert cache.get(("a", "", "1")) == ("writes", b"0" * 100)
    assert cache.latest("a", "") == ("writes", b"0" * 100)
    assert made == [0] and cache.size_bytes == before + 100
    write = StoredWrite("task", "", 0, "v", StoredValue("ev-w", 2, "bytes", b"w"))
    cache.put_writes(("a", "", "1"), [write], "ev-w", 2)
    changed = cache.get(("a", "", "1"))
    assert isinstance(changed, StoredCheckpoint) and len(changed.writes) == 1
    assert cache.get(("a", "", "1")) == ("writes", b"1" * 100)
    assert made == [0, 1]
    assert cache.size_bytes == before + len(b"w") + 100 + PENDING_EVENT_BYTES


def test_without_a_snapshot_the_stored_form_is_served_and_not_asked_again() -> None:
    asked: list[str] = []

    def decline(stored: StoredCheckpoint) -> None:
        asked.append(stored.checkpoint_id)

    cache = ReadCache(snapshot=decline)
    cache.put(_stored("a", "1"), "ev-a", 1)
    for _ in range(4):
        found = cache.get(("a", "", "1"))
        assert isinstance(found, StoredCheckpoint) and found.checkpoint_id == "1"
    assert asked == ["1"]  # by the second read


async def test_a_tuple_the_serde_cannot_encode_whole_is_served_value_by_value(
    tmp_path: Path,
) -> None:
    class RefusesWholeTuples(JsonPlusSerializer):
        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            if isinstance(obj, list) and len(obj) == 5:
                raise TypeError("not as a whole")
            return super().dumps_typed(obj)

    async with AsyncKustoSaver.from_conn_string(
        f"sqlite:///{tmp_path / 'q.db'}", "http://127.0.0.1:9", serde=RefusesWholeTuples()
    ) as saver:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"v": [1]}
        checkpoint["channel_versions"] = {"v": "1"}
        config = await saver.aput(
            {"configurable": {"thread_id": "t", "checkpoint_ns": ""}},
            checkpoint,
            {},
            {"v": "1"},
        )
        for _ in range(2):
            found = await saver.aget_tuple(config)
            assert found is not None and found.checkpoint["channel_values"] == {"v": [1]}
            found.checkpoint["channel_values"]["v"].append(2)


def test_a_replaced_special_write_counts_its_bytes_once() -> None:
    cache = ReadCache()
    cache.put(_stored("t", "c1"), "e0", 0)
    before = cache.size_bytes
    for n in range(1, 101):
        write = StoredWrite(
            "task", "", -3, "__interrupt__", StoredValue(f"e{n}", n, "b", b"x" * 1000)
        )
        cache.put_writes(("t", "", "c1"), [write], f"e{n}", n)  # each replaces the last
    assert cache.size_bytes == before + 1000 + 100 * PENDING_EVENT_BYTES


def test_writes_to_checkpoints_it_does_not_hold_count_against_the_bound() -> None:
    max_bytes = 200 * PENDING_EVENT_BYTES + 50_000  # room for 200 events and ~35 writes
    cache = ReadCache(max_bytes=max_bytes)
    for n in range(200):
        write = StoredWrite("task", "", 0, "v", StoredValue(f"e{n}", n, "b", b"x" * 1000))
        cache.put_writes(("t", "", f"c{n}"), [write], f"e{n}", n)
    assert cache.size_bytes <= max_bytes
    assert cache.orphan_writes(("t", "", "c199"))  # the newest are held
    assert not cache.orphan_writes(("t", "", "c0"))  # the oldest were let go...
    assert cache.awaited("t", "", "c0") == {"e0": 0}  # ...so reads of them wait for Kusto
    cache.confirm(f"e{n}" for n in range(200))
    assert cache.size_bytes == 0


def test_a_checkpoint_whose_earlier_writes_were_let_go_is_not_served_whole() -> None:
    """LangGraph saves a step's writes before its checkpoint: if Kusto confirms the writes
    in between, the cache drops them, and the put must not then look complete."""
    cache = ReadCache()
    write = StoredWrite("task", "", 0, "v", StoredValue("e1", 1, "b", b"w"))
    cache.put_writes(("t", "", "c1"), [write], "e1", 1)
    cache.confirm(["e1"])
    assert not cache.put(_stored("t", "c1"), "e2", 2)
    assert cache.get(("t", "", "c1")) is None
    assert cache.awaited("t", "", "c1") == {"e2": 2}
    cache.delete_thread("t", "e3", 3)
    cache.confirm(["e2", "e3"])
    assert cache.size_bytes == 0  # the put held no blob it did not keep


def test_a_put_older_than_a_confirmed_delete_stays_hidden() -> None:
    cache = ReadCache()
    cache.delete_thread("t", "delete", 10)
    cache.confirm(["delete"])  # Kusto has the delete; its record stays (bounded)
    older = _stored("t", "c1")
    older.checkpoint = StoredValue("put", 5, "bytes", b"c")
    assert not cache.put(older, "put", 5)
    assert cache.get(("t", "", "c1")) is None
    assert cache.size_bytes == PENDING_EVENT_BYTES  # the put's event, until Kusto confirms it


@pytest.mark.parametrize(("run_id", "deleted"), [(5, "5"), ("r1", "r1"), (0, None), ("", None)])
def test_a_run_delete_drops_and_hides_what_kusto_s_run_id_column_matches(
    run_id: object, deleted: str | None
) -> None:
    """Kusto matches ``str(run_id or "")``; the cache compared the raw value, so a
    checkpoint with ``run_id`` 5 stayed readable here after ``delete_for_runs(["5"])``."""
    cache = ReadCache()
    cached = _stored("t", "c1")
    cached.metadata = {"run_id": run_id}
    cache.put(cached, "put", 1)
    cache.delete_runs(["5", "r1"], "delete", 10)
    assert (cache.get(("t", "", "c1")) is None) == (deleted is not None)
    late = _stored("t2", "c2")
    late.metadata = {"run_id": run_id}
    late.checkpoint = StoredValue("late", 5, "bytes", b"c")
    assert cache.put(late, "late", 5) == (deleted is None)  # sent before the delete


def test_reads_stop_waiting_for_a_run_delete_after_the_given_time() -> None:
    cache = ReadCache()
    cache.delete_runs(["run"], "delete", 10)
    assert cache.awaited("any", "", None) == {"delete": 10}
    assert cache.awaited("any", "", None, hides_since=time.monotonic() + 1) == {}


def test_confirming_events_releases_exactly_what_waited_on_them() -> None:
    cache = ReadCache(max_entries=1)
    for n in range(100):
        cache.put(_stored("t", f"c{n:03}"), f"e{n}", n)  # each put evicts the one before
        write = StoredWrite("task", "", 0, "v", StoredValue(f"w{n}", n, "b", b"w"))
        cache.put_writes(("other", "", f"c{n:03}"), [write], f"w{n}", n)
    assert cache.awaited("t", "", "c000") == {"e0": 0}
    cache.confirm([f"e{n}" for n in range(50)] + [f"w{n}" for n in range(50)])
    assert cache.awaited("t", "", "c010") == {}
    assert cache.awaited("t", "", "c060") == {"e60": 60}
    assert not cache.orphan_writes(("other", "", "c010"))
    assert cache.orphan_writes(("other", "", "c060"))
    cache.confirm([f"e{n}" for n in range(100)] + [f"w{n}" for n in range(100)])
    assert cache.awaited("t", None, None) == {} and cache.pending_count() == 0
    assert cache._waiting_on == {} and cache._awaited == {}


def test_eviction_is_least_recently_used_across_entries_and_orphan_writes() -> None:
    max_bytes = 15 * PENDING_EVENT_BYTES + 20_000
    cache = ReadCache(max_bytes=max_bytes)
    for n in range(10):  # older: writes to checkpoints it does not hold
        write = StoredWrite("task", "", 0, "v", StoredValue(f"w{n}", n, "b", b"w" * 1000))
        cache.put_writes(("other", "", f"c{n}"), [write], f"w{n}", n)
    for n in range(5):  # newer: checkpoints it wrote, which push the cache over its bound
        cache.put(_stored("t", f"c{n}", size=1000), f"e{n}", 10 + n)
    assert all(cache.get(("t", "", f"c{n}")) is not None for n in range(5))
    assert not cache.orphan_writes(("other", "", "c0"))  # the oldest went first
    assert cache.size_bytes <= max_bytes


async def test_a_write_whose_caller_was_cancelled_is_still_read_back(
    stack: Any, private_queue: str
) -> None:
    """Cancelling an ``aput`` does not take its events off the queue once the send has
    started (the commit goes ahead): the cache must then learn them, or this process reads
    older state than it wrote, for good."""
    async with AsyncKustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, strong_timeout=0.5
    ) as saver:
        thread = f"cancelled-{uuid.uuid4().hex[:8]}"
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        written = await saver.aput(config, empty_checkpoint(), {}, {})
        second = empty_checkpoint()
        task = asyncio.create_task(saver.aput(written, second, {}, {}))
        await asyncio.sleep(0)  # the task runs up to the send it awaits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        queue = open_queue(private_queue)
        try:
            assert queue.depth() == 2  # the second put was committed all the same
        finally:
            queue.close()
        for _ in range(100):  # the send finishes on its own, a few loop turns later
            found = await saver.aget_tuple(config)
            assert found is not None
            if found.checkpoint["id"] == second["id"]:
                break
            await asyncio.sleep(0.01)
        assert found.checkpoint["id"] == second["id"]


def _kusto_row(thread: str, checkpoint_id: str, seq: int, run_id: str = "") -> StoredCheckpoint:
    """A checkpoint as read back from Kusto, written at ``seq``."""
    row = _stored(thread, checkpoint_id)
    row.checkpoint = StoredValue("kusto", seq, "bytes", b"c")
    row.metadata = {"run_id": run_id} if run_id else {}
    return row


def _delete_and_prune(cache: ReadCache, count: int) -> None:
    """``count`` thread deletes, run deletes and prunes, none of them confirmed yet."""
    for n in range(count):
        cache.delete_thread(f"t{n}", f"delete-t{n}", 100 + n)
        cache.delete_runs([f"run{n}"], f"delete-run{n}", 100 + n)
        cache.prune(f"p{n}", [("", "kept")], f"prune-p{n}", 100 + n)


def test_unconfirmed_deletes_past_the_entry_bound_still_hide_kustos_rows() -> None:
    """With the ingestor behind, Kusto still returns what this process deleted or pruned:
    every delete and prune it has not confirmed must keep hiding those rows, however many
    there are (forgetting the oldest made deleted threads readable again)."""
    cache = ReadCache(max_entries=3)
    _delete_and_prune(cache, 5)
    for n in range(5):
        assert cache.hides(_kusto_row(f"t{n}", "c", seq=1)), f"t{n}"
        assert cache.hides(_kusto_row("any", "c", seq=1, run_id=f"run{n}")), f"run{n}"
        assert cache.hides(_kusto_row(f"p{n}", "old", seq=1)), f"p{n}"


def test_confirmed_deletes_are_let_go_past_the_entry_bound() -> None:
    cache = ReadCache(max_entries=3)
    _delete_and_prune(cache, 5)
    events = {n: [f"delete-t{n}", f"delete-run{n}", f"prune-p{n}"] for n in range(5)}
    cache.confirm(e for n in range(1, 5) for e in events[n])
    # The newest three confirmed stay, and so do the unconfirmed; Kusto applies the rest.
    assert not cache.hides(_kusto_row("t1", "c", seq=1))
    assert not cache.hides(_kusto_row("any", "c", seq=1, run_id="run1"))
    assert not cache.hides(_kusto_row("p1", "old", seq=1))
    for n in (0, 2, 3, 4):
        assert cache.hides(_kusto_row(f"t{n}", "c", seq=1))
    cache.confirm(events[0])  # confirmed last, so kept over the oldest other
    assert not cache.hides(_kusto_row("t2", "c", seq=1))
    assert cache.hides(_kusto_row("t0", "c", seq=1))
    for records in (cache._deleted, cache._deleted_runs, cache._pruned):
        assert len(records.by_key) == 3 and not records.unconfirmed
    assert cache.size_bytes == 0


def test_unconfirmed_run_deletes_and_prunes_of_many_count_against_the_bound() -> None:
    cache = ReadCache(max_bytes=10 * PENDING_EVENT_BYTES)
    cache.delete_runs([f"run{n}" for n in range(10)], "delete", 10)
    cache.prune("t", [(f"ns{n}", "kept") for n in range(10)], "prune", 11)
    assert cache.size_bytes == 2 * (PENDING_EVENT_BYTES + 9 * RECORD_ITEM_BYTES)
    # Two events, but their records take the room of almost seven: four more do not fit.
    assert not cache.reserve(4)
    cache.confirm(["delete", "prune"])
    assert cache.size_bytes == 0
    assert cache.reserve(4)
