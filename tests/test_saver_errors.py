"""User mistakes get a clear error that names what is wrong and says what to do, raised
where the mistake is made: a bad config or argument before anything is sent or cached, a
bad option when the saver is built, Kusto not running at the first read or ``setup()``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypedDict

import langgraph.checkpoint.kusto
import langgraph.checkpoint.kusto.aio
import pytest
from azure.kusto.data.exceptions import KustoNetworkError, KustoServiceError
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver
from langgraph.checkpoint.kusto.base import reachability_explained
from langgraph.checkpoint.kusto.kusto import AsyncKustoQueries, KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer, start_local_kusto
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.schema import SchemaError
from langgraph.graph import END, START, StateGraph

NOTHING_LISTENS = "http://127.0.0.1:9"
"""A loopback cluster where nothing listens (the discard port), as when an app starts
before ``langgraph-kusto local up``; tests that must fail before any query use it too, so
a mistake that got through would surface as ``KustoNetworkError`` instead."""
THREAD_ID_MESSAGE = r"config\['configurable'\]\['thread_id'\] must be a non-empty string"


@pytest.fixture
def queue_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture
def saver(queue_url: str) -> Iterator[KustoSaver]:
    with KustoSaver.from_conn_string(queue_url, NOTHING_LISTENS) as built:
        yield built


def _queued(queue_url: str) -> int:
    queue = open_queue(queue_url)
    try:
        return queue.depth()
    finally:
        queue.close()


def _put(saver: KustoSaver, configurable: dict[str, Any]) -> Any:
    return saver.put({"configurable": configurable}, empty_checkpoint(), {}, {})


# -- configs: checked the same way in every mode, cached or not --------------------


@pytest.mark.parametrize("consistency", ["session", "eventual", "strong"])
@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {},
            r"config must be a dict whose 'configurable' dict names the thread "
            r"\('thread_id'\), got \{\}",
        ),
        ({"configurable": {}}, THREAD_ID_MESSAGE + ", got None"),
        ({"configurable": {"thread_id": ["t1"]}}, THREAD_ID_MESSAGE + r", got \['t1'\]"),
        ({"configurable": {"thread_id": ""}}, THREAD_ID_MESSAGE + ", got ''"),
        (
            {"configurable": {"thread_id": "t1", "checkpoint_ns": 5}},
            r"config\['configurable'\]\['checkpoint_ns'\] must be a string, got 5",
        ),
        (
            {"configurable": {"thread_id": "t1", "checkpoint_id": 5}},
            r"config\['configurable'\]\['checkpoint_id'\] must be a string, got 5",
        ),
    ],
    ids=[
        "no configurable",
        "no thread_id",
        "list thread_id",
        "empty thread_id",
        "int namespace",
        "int checkpoint_id",
    ],
)
def test_get_tuple_names_the_config_key_that_is_wrong_in_every_mode(
    queue_url: str, consistency: str, config: Any, message: str
) -> None:
    """``session`` read the cache before checking the config: a missing thread id was a bare
    KeyError, a list one "unhashable type", a non-string namespace or id a silent miss."""
    with KustoSaver.from_conn_string(queue_url, NOTHING_LISTENS, consistency=consistency) as s:
        if consistency == "session":  # a thread in the cache: reads take the cache path
            _put(s, {"thread_id": "t1"})
        with pytest.raises(ValueError, match=message):
            s.get_tuple(config)


async def test_aget_tuple_names_the_missing_thread_id_before_the_cache(queue_url: str) -> None:
    async with AsyncKustoSaver.from_conn_string(queue_url, NOTHING_LISTENS) as saver:
        with pytest.raises(ValueError, match=THREAD_ID_MESSAGE + ", got None"):
            await saver.aget_tuple({"configurable": {}})


@pytest.mark.parametrize(
    ("configurable", "message"),
    [
        (
            {"thread_id": "t1", "checkpoint_ns": 5},
            r"config\['configurable'\]\['checkpoint_ns'\] must be a string, got 5",
        ),
        (
            {"thread_id": "t1", "checkpoint_ns": ["a"]},
            r"config\['configurable'\]\['checkpoint_ns'\] must be a string, got \['a'\]",
        ),
        (
            {"thread_id": "t1", "checkpoint_id": 7},
            r"config\['configurable'\]\['checkpoint_id'\] must be a string, got 7",
        ),
    ],
    ids=["int namespace", "list namespace", "int parent id"],
)
def test_put_refuses_a_non_string_namespace_or_parent_id_before_sending(
    saver: KustoSaver, queue_url: str, configurable: dict[str, Any], message: str
) -> None:
    """Such a put was sent, served back from the cache, then dead-lettered by the worker
    as a malformed envelope, which no replay can fix."""
    with pytest.raises(ValueError, match=message):
        _put(saver, configurable)
    assert _queued(queue_url) == 0


def test_put_writes_refuses_a_non_string_namespace_or_checkpoint_id(
    saver: KustoSaver, queue_url: str
) -> None:
    with pytest.raises(ValueError, match=r"\['checkpoint_ns'\] must be a string, got 5"):
        saver.put_writes(
            {"configurable": {"thread_id": "t1", "checkpoint_ns": 5, "checkpoint_id": "c"}},
            [("a", 1)],
            "task",
        )
    with pytest.raises(ValueError, match=r"\['checkpoint_id'\] must be a string, got 7"):
        saver.put_writes({"configurable": {"thread_id": "t1", "checkpoint_id": 7}}, [("a", 1)], "t")
    with pytest.raises(ValueError, match=r"\['checkpoint_id'\] must be a non-empty string, got N"):
        saver.put_writes({"configurable": {"thread_id": "t1"}}, [("a", 1)], "t")
    assert _queued(queue_url) == 0


def test_put_writes_refuses_what_the_worker_would_dead_letter_as_malformed(
    saver: KustoSaver, queue_url: str
) -> None:
    """A non-string task id or channel was published, then dead-lettered as
    MalformedEnvelope, which no replay fixes."""
    config = {"configurable": {"thread_id": "t1", "checkpoint_id": "c"}}
    with pytest.raises(ValueError, match="task_id and task_path must be strings, got 5"):
        saver.put_writes(config, [("a", 1)], 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"writes must be \(channel, value\) pairs, got \(7, 1\)"):
        saver.put_writes(config, [(7, 1)], "t")  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"pairs, got \('a',\) at 0"):
        saver.put_writes(config, [("a",)], "t")  # type: ignore[list-item]
    assert _queued(queue_url) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda saver: _put(saver, {"thread_id": "t\ud800"}),
        lambda saver: _put(saver, {"thread_id": "t1", "checkpoint_ns": "ns\udfff"}),
        lambda saver: saver.put_writes(
            {"configurable": {"thread_id": "t1", "checkpoint_id": "c"}}, [("ch\ud800", 1)], "t"
        ),
        lambda saver: saver.put_writes(
            {"configurable": {"thread_id": "t1", "checkpoint_id": "c"}}, [("a", 1)], "task\ud800"
        ),
    ],
    ids=["thread id", "namespace", "channel", "task id"],
)
def test_a_lone_surrogate_in_an_id_is_refused_by_name_before_sending(
    saver: KustoSaver, queue_url: str, call: Any
) -> None:
    """Such text (from a bad decode, say) raised the encoder's bare ``TypeError: string
    contains surrogates``, naming nothing."""
    with pytest.raises(ValueError, match=r"cannot publish this put(_writes)? \(string contains "):
        call(saver)
    assert _queued(queue_url) == 0


async def test_an_async_saver_refuses_a_lone_surrogate_in_an_id_before_sending(
    queue_url: str,
) -> None:
    async with AsyncKustoSaver.from_conn_string(queue_url, NOTHING_LISTENS) as saver:
        with pytest.raises(ValueError, match="UTF-8 can encode"):
            await saver.aput({"configurable": {"thread_id": "t\ud800"}}, empty_checkpoint(), {}, {})
    assert _queued(queue_url) == 0


def test_put_refuses_metadata_kusto_cannot_hold_before_sending(
    saver: KustoSaver, queue_url: str
) -> None:
    """It raised a bare ``OverflowError: Integer value out of range`` from the encoder."""
    with pytest.raises(ValueError, match="metadata cannot be stored in Kusto: Integer exceeds"):
        saver.put(
            {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}},
            empty_checkpoint(),
            {"source": "loop", "budget": 2**70},
            {},
        )
    assert _queued(queue_url) == 0


def test_put_refuses_metadata_over_kusto_s_dynamic_limit_before_sending(
    saver: KustoSaver, queue_url: str
) -> None:
    """Kusto ingests a dynamic value over 1 MB as null: the put was accepted and served
    whole from the cache, while other processes read the checkpoint with no metadata."""
    with pytest.raises(ValueError, match=r"its JSON is 1,048,5\d\d bytes, over the 1,048,576"):
        saver.put(
            {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}},
            empty_checkpoint(),
            {"source": "loop", "note": "x" * (1024 * 1024 - 40)},
            {},
        )
    assert _queued(queue_url) == 0
    escaped = "\x01" * (1024 * 1024 // 7)  # 150 KB in msgpack; 7 bytes each in MetadataPairs
    with pytest.raises(ValueError, match="over the 1,048,576 Kusto keeps of a dynamic value"):
        saver.put(
            {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}},
            empty_checkpoint(),
            {"note": escaped},
            {},
        )
    saver.put(  # just under: kept
        {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}},
        empty_checkpoint(),
        {"note": "x" * (1024 * 1024 - 100)},
        {},
    )
    found = saver.get_tuple({"configurable": {"thread_id": "t1"}})
    assert found is not None and len(found.metadata["note"]) == 1024 * 1024 - 100


@pytest.mark.parametrize("checkpoint_id", [123, None, ""])
def test_put_refuses_a_checkpoint_id_that_is_not_a_non_empty_string(
    saver: KustoSaver, queue_url: str, checkpoint_id: object
) -> None:
    """An int was sent (the worker dead-letters it as a malformed envelope, which no replay
    fixes), then the cache raised a bare TypeError comparing it with a string id."""
    checkpoint: Any = empty_checkpoint()
    checkpoint["id"] = checkpoint_id
    with pytest.raises(ValueError, match=r"checkpoint\['id'\] must be a non-empty string"):
        saver.put({"configurable": {"thread_id": "t1"}}, checkpoint, {}, {})
    assert _queued(queue_url) == 0


def test_a_namespace_of_none_still_means_the_root_namespace(saver: KustoSaver) -> None:
    written = _put(saver, {"thread_id": "t1", "checkpoint_ns": None})
    assert written["configurable"]["checkpoint_ns"] == ""
    found = saver.get_tuple({"configurable": {"thread_id": "t1", "checkpoint_ns": None}})
    assert found is not None and found.config == written


# -- other method arguments -------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s: s.delete_thread(""), ValueError, "thread_id must be a non-empty string"),
        (
            lambda s: s.prune([""], strategy="delete"),
            ValueError,
            "thread_ids must not contain an empty string",
        ),
        (
            lambda s: list(s.list(None, filter="x")),
            TypeError,
            "filter must be a dict of metadata keys to values, got str",
        ),
        (
            lambda s: list(s.list(None, before={"configurable": {"checkpoint_id": 5}})),
            ValueError,
            r"before\['configurable'\]\['checkpoint_id'\] must be a string, got 5",
        ),
        (
            lambda s: list(s.list({"configurable": {"thread_id": 123}})),
            ValueError,
            THREAD_ID_MESSAGE + ", got 123",
        ),
        (lambda s: s.copy_thread(5, "t9"), TypeError, "source_thread_id must be a string"),
        (lambda s: s.copy_thread("t1", 5), TypeError, "target_thread_id must be a string"),
        (lambda s: s.copy_thread("t1", ""), ValueError, "target_thread_id must be a non-empty"),
        (
            # Kusto's RunId is "" for every checkpoint without a run: it deleted them all.
            lambda s: s.delete_for_runs(["r1", ""]),
            ValueError,
            "run_ids must not contain an empty string",
        ),
    ],
    ids=[
        "delete_thread empty",
        "prune empty",
        "list str filter",
        "list int before id",
        "list int thread_id",
        "copy int source",
        "copy int target",
        "copy empty target",
        "delete_for_runs empty run id",
    ],
)
def test_method_arguments_are_named_when_wrong(
    saver: KustoSaver, queue_url: str, call: Any, error: type[Exception], message: str
) -> None:
    """These leaked the queue's "session_id must not be empty", an AttributeError, a Kusto
    binder error, or (``copy_thread(5, ...)``) silently did nothing."""
    with pytest.raises(error, match=message):
        call(saver)
    assert _queued(queue_url) == 0


async def test_async_method_arguments_are_named_when_wrong(queue_url: str) -> None:
    async with AsyncKustoSaver.from_conn_string(queue_url, NOTHING_LISTENS) as saver:
        with pytest.raises(ValueError, match="thread_id must be a non-empty string"):
            await saver.adelete_thread("")
        with pytest.raises(TypeError, match="source_thread_id must be a string"):
            await saver.acopy_thread(5, "t9")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="filter must be a dict"):
            [t async for t in saver.alist(None, filter="x")]  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="run_ids must not contain an empty string"):
            await saver.adelete_for_runs([""])
        with pytest.raises(ValueError, match=r"checkpoint\['id'\] must be a non-empty string"):
            await saver.aput(
                {"configurable": {"thread_id": "t1"}}, {**empty_checkpoint(), "id": 5}, {}, {}
            )  # type: ignore[typeddict-item]
    assert _queued(queue_url) == 0


BAD_WAIT_TIMEOUTS = pytest.mark.parametrize(
    ("timeout", "shown"),
    [(-5, "-5"), (0, "0"), (float("nan"), "nan"), (float("inf"), "inf"), ("10", "'10'")],
    ids=["negative", "zero", "nan", "inf", "str"],
)


@pytest.mark.parametrize("consistency", ["session", "eventual", "strong"])
@BAD_WAIT_TIMEOUTS
def test_wait_for_ingestion_names_a_bad_timeout_in_every_mode(
    queue_url: str, consistency: str, timeout: Any, shown: str
) -> None:
    """-5 or 0 waited for nothing and blamed the worker ("After -5s Kusto does not hold 1
    event ... Is the ingestor worker running?"), nan failed inside a query ("cannot convert
    float NaN to integer"), "10" was a TypeError, and a ``strong`` saver accepted them."""
    with KustoSaver.from_conn_string(queue_url, NOTHING_LISTENS, consistency=consistency) as s:
        if consistency == "session":  # something to wait for
            _put(s, {"thread_id": "t1"})
        with pytest.raises(ValueError, match=f"timeout must be .* above 0, got {shown}$"):
            s.wait_for_ingestion(timeout=timeout)
        if consistency == "strong":  # None still means "strong_timeout": nothing to wait for
            s.wait_for_ingestion(timeout=None)


@BAD_WAIT_TIMEOUTS
async def test_async_wait_for_ingestion_names_a_bad_timeout(
    queue_url: str, timeout: Any, shown: str
) -> None:
    async with AsyncKustoSaver.from_conn_string(queue_url, NOTHING_LISTENS) as saver:
        await saver.aput({"configurable": {"thread_id": "t1"}}, empty_checkpoint(), {}, {})
        with pytest.raises(ValueError, match=f"timeout must be .* above 0, got {shown}$"):
            await saver.wait_for_ingestion(timeout=timeout)


# -- the sync saver's async methods -------------------------------------------------


async def _drain(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


class _Count(TypedDict):
    n: int


def test_a_graph_run_with_ainvoke_on_the_sync_saver_points_at_the_async_saver(
    saver: KustoSaver,
) -> None:
    """It raised LangGraph's bare ``NotImplementedError`` with an empty message."""
    builder = StateGraph(_Count)
    builder.add_node("inc", lambda state: {"n": state["n"] + 1})
    builder.add_edge(START, "inc")
    builder.add_edge("inc", END)
    graph = builder.compile(checkpointer=saver)
    with pytest.raises(NotImplementedError, match=r"Use AsyncKustoSaver for graph\.ainvoke"):
        asyncio.run(graph.ainvoke({"n": 1}, {"configurable": {"thread_id": "g1"}}))


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("aget_tuple", lambda s: s.aget_tuple({"configurable": {"thread_id": "t"}})),
        ("aput", lambda s: s.aput({"configurable": {"thread_id": "t"}}, {}, {}, {})),
        ("aput_writes", lambda s: s.aput_writes({"configurable": {}}, [], "task")),
        ("adelete_thread", lambda s: s.adelete_thread("t")),
        ("adelete_for_runs", lambda s: s.adelete_for_runs(["r"])),
        ("acopy_thread", lambda s: s.acopy_thread("t", "u")),
        ("aprune", lambda s: s.aprune(["t"])),
        (
            "aget_delta_channel_history",
            lambda s: s.aget_delta_channel_history(config={}, channels=["c"]),
        ),
        ("alist", lambda s: _drain(s.alist(None))),
    ],
)
def test_every_async_method_of_the_sync_saver_points_at_the_async_saver(
    saver: KustoSaver, method: str, call: Any
) -> None:
    with pytest.raises(NotImplementedError, match=rf"async methods \({method}\)\. Use Async"):
        asyncio.run(call(saver))


# -- options: checked when the saver is built ---------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"strong_timeout": "10"},
            "strong_timeout must be a finite number of seconds above 0, got '10'",
        ),
        ({"strong_timeout": -1}, "strong_timeout must be .* above 0, got -1"),
        ({"strong_timeout": 0}, "strong_timeout must be .* above 0, got 0"),
        ({"strong_timeout": float("nan")}, "strong_timeout must be .* above 0, got nan"),
        ({"max_message_bytes": 0}, "max_message_bytes must be an integer of at least 1,024"),
        ({"max_message_bytes": 10}, "max_message_bytes must be an integer of at least 1,024"),
        ({"max_message_bytes": 4096.0}, "max_message_bytes must be an integer of at least"),
        ({"cache_max_entries": "100"}, "cache_max_entries must be an integer of at least 1, got"),
        ({"cache_max_entries": -1}, "cache_max_entries must be an integer of at least 1, got -1"),
        ({"cache_max_bytes": 0}, "cache_max_bytes must be an integer of at least 1, got 0"),
        (
            {"consistency": "strong", "cache_max_entries": 5},
            "cache_max_entries: only consistency='session' has a read cache to bound, got "
            "consistency='strong'",
        ),
        (
            {"consistency": "eventual", "cache_max_entries": 5, "cache_max_bytes": 10_000},
            "cache_max_entries and cache_max_bytes: only consistency='session' has a read "
            "cache to bound, got consistency='eventual'",
        ),
    ],
    ids=[
        "timeout str",
        "timeout negative",
        "timeout zero",
        "timeout nan",
        "message bytes zero",
        "message bytes small",
        "message bytes float",
        "entries str",
        "entries negative",
        "bytes zero",
        "strong with cache bound",
        "eventual with cache bounds",
    ],
)
def test_saver_options_are_checked_when_the_saver_is_built(
    queue_url: str, options: dict[str, Any], message: str
) -> None:
    """They failed at the first read or put (a TypeError from deep inside), were silently
    accepted (a negative timeout, cache bounds of a saver without a cache), or named no
    option ("cache bounds must be positive")."""
    with (
        pytest.raises(ValueError, match=message),
        KustoSaver.from_conn_string(queue_url, NOTHING_LISTENS, **options),
    ):
        pass


async def test_async_saver_options_are_checked_when_the_saver_is_built(queue_url: str) -> None:
    with pytest.raises(ValueError, match="strong_timeout must be a finite number of seconds"):
        async with AsyncKustoSaver.from_conn_string(queue_url, strong_timeout="10"):
            pass


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"queue": ""}, r"queue must be a non-empty string, or None for \$LANGGRAPH_KUSTO_QUEUE"),
        ({"cluster": ""}, r"cluster must be a non-empty string, or None for \$LANGGRAPH_KUSTO_"),
        ({"database": " "}, r"database must be a non-empty string, or None for \$LANGGRAPH_KUS"),
    ],
    ids=["queue", "cluster", "database"],
)
async def test_an_empty_connection_argument_is_refused_not_replaced_by_the_default(
    where: dict[str, str], message: str, queue_url: str
) -> None:
    arguments = {"queue": queue_url, "cluster": NOTHING_LISTENS, **where}
    with pytest.raises(ValueError, match=message), KustoSaver.from_conn_string(**arguments):
        pass
    with pytest.raises(ValueError, match=message):
        async with AsyncKustoSaver.from_conn_string(**arguments):
            pass


@pytest.fixture
def unclosed_kusto_clients(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The Kusto clients savers opened and have not closed."""
    unclosed: list[object] = []

    class RecordedQueries(KustoQueries):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            unclosed.append(self)

        def close(self) -> None:
            unclosed.remove(self)
            super().close()

    class RecordedAsyncQueries(AsyncKustoQueries):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            unclosed.append(self)

        async def close(self) -> None:
            unclosed.remove(self)
            await super().close()

    monkeypatch.setattr(langgraph.checkpoint.kusto, "KustoQueries", RecordedQueries)
    monkeypatch.setattr(langgraph.checkpoint.kusto.aio, "AsyncKustoQueries", RecordedAsyncQueries)
    return unclosed


async def test_a_bad_queue_url_leaves_no_kusto_client_open(
    unclosed_kusto_clients: list[object],
) -> None:
    """The Kusto client was opened before the queue and not closed when the queue URL was
    refused: the async saver's ValueError was followed by aiohttp's "Unclosed client
    session" on stderr."""
    message = r"Not a SQLite queue URL: 'sqlite:outbox\.db'"
    with (
        pytest.raises(ValueError, match=message),
        KustoSaver.from_conn_string("sqlite:outbox.db", NOTHING_LISTENS),
    ):
        pass
    with pytest.raises(ValueError, match=message):
        async with AsyncKustoSaver.from_conn_string("sqlite:outbox.db", NOTHING_LISTENS):
            pass
    assert unclosed_kusto_clients == []


# -- Kusto not running, or not what the saver expects ---------------------------------

NOT_RUNNING = (
    r"The local Kusto server is not running at http://127\.0\.0\.1:9 \(or does not answer\): "
    r"start it with `langgraph-kusto local up`\."
)


def test_the_first_read_without_the_local_server_says_to_start_it(saver: KustoSaver) -> None:
    """It was a raw "Failed to process network request for the endpoint" with no hint;
    the type stays, as callers may catch it."""
    with pytest.raises(KustoNetworkError, match=NOT_RUNNING) as raised:
        saver.get_tuple({"configurable": {"thread_id": "t1"}})
    assert str(raised.value).startswith("Failed to process network request for the endpoint")
    with pytest.raises(KustoNetworkError, match=NOT_RUNNING):
        list(saver.list({"configurable": {"thread_id": "t1"}}))


async def test_the_first_async_read_without_the_local_server_says_to_start_it(
    queue_url: str,
) -> None:
    async with AsyncKustoSaver.from_conn_string(queue_url, NOTHING_LISTENS) as saver:
        with pytest.raises(KustoNetworkError, match=NOT_RUNNING):
            await saver.aget_tuple({"configurable": {"thread_id": "t1"}})
        with pytest.raises(KustoNetworkError, match=NOT_RUNNING):
            await saver.aget_delta_channel_history(
                config={"configurable": {"thread_id": "t1"}}, channels=["c"]
            )


def test_a_remote_cluster_that_does_not_answer_is_named_without_the_local_advice() -> None:
    with (
        pytest.raises(KustoNetworkError, match=r"Kusto at https://c\.kusto\.windows\.net did n"),
        reachability_explained(),
    ):
        raise KustoNetworkError("https://c.kusto.windows.net/v2/rest/query")


def test_setup_says_the_local_server_is_not_running_not_that_the_table_is_missing(
    saver: KustoSaver,
) -> None:
    with pytest.raises(KustoNetworkError, match=NOT_RUNNING):
        saver.setup()


async def test_async_setup_says_the_local_server_is_not_running(queue_url: str) -> None:
    async with AsyncKustoSaver.from_conn_string(queue_url, NOTHING_LISTENS) as saver:
        with pytest.raises(KustoNetworkError, match=NOT_RUNNING):
            await saver.setup()


async def test_setup_names_a_database_kusto_does_not_know(
    kusto_server: LocalKustoServer, queue_url: str
) -> None:
    """An unknown database was reported as "table CheckpointEvents is missing or out of
    date ... Run langgraph-kusto provision", which cannot create a database."""
    message = r"Check the database name 'nosuch' \(database= or LANGGRAPH_KUSTO_DATABASE\)"
    with KustoSaver.from_conn_string(queue_url, kusto_server.url, "nosuch") as saver:
        with pytest.raises(KustoServiceError, match=message) as raised:
            await asyncio.to_thread(saver.setup)
        assert not isinstance(raised.value, SchemaError)
    async with AsyncKustoSaver.from_conn_string(queue_url, kusto_server.url, "nosuch") as aio:
        with pytest.raises(KustoServiceError, match=message):
            await aio.setup()


@pytest.fixture
def unprovisioned(tmp_path: Path) -> Iterator[LocalKustoServer]:
    server = start_local_kusto(tmp_path / "kusto", port=0)
    yield server
    server.close()


PROVISION_MESSAGE = (
    r"table CheckpointEvents is missing or out of date .*\. Run `langgraph-kusto provision"
)
A_THREAD: Any = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}


def test_a_read_of_a_database_never_provisioned_says_to_provision(
    unprovisioned: LocalKustoServer, queue_url: str
) -> None:
    """It raised Kusto's refusal of the query (locally: "schema error for 'Scope' (unknown
    table; ...)"), which names neither the table nor the fix."""
    with KustoSaver.from_conn_string(queue_url, unprovisioned.url) as saver:
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            saver.get_tuple(A_THREAD)
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            list(saver.list(A_THREAD))
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            saver.get_delta_channel_history(config=A_THREAD, channels=["items"])


async def test_an_async_read_of_a_database_never_provisioned_says_to_provision(
    unprovisioned: LocalKustoServer, queue_url: str
) -> None:
    async with AsyncKustoSaver.from_conn_string(queue_url, unprovisioned.url) as saver:
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            await saver.aget_tuple(A_THREAD)
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            [found async for found in saver.alist(A_THREAD)]
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            await saver.aget_delta_channel_history(config=A_THREAD, channels=["items"])


REFUSAL = KustoServiceError("Request is invalid and cannot be executed")


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise REFUSAL


async def _refuse_async(*args: Any, **kwargs: Any) -> Any:
    raise REFUSAL


class _Answer:
    """What the sync SDK keeps of Kusto's HTTP answer (``status_code``)."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


def _check_fails_too(*args: Any, **kwargs: Any) -> Any:
    raise KustoServiceError("Request was throttled")


async def _check_fails_too_async(*args: Any, **kwargs: Any) -> Any:
    raise KustoServiceError("Request was throttled")


@pytest.mark.parametrize("check_fails_too", [False, True])
def test_a_read_kusto_refuses_for_another_reason_keeps_kusto_s_error(
    kusto_server: LocalKustoServer,
    queue_url: str,
    monkeypatch: pytest.MonkeyPatch,
    check_fails_too: bool,
) -> None:
    """The schema is checked only when Kusto refuses a read; a sound one does not replace
    the refusal, nor does the check's own failure (it did: throttled, a 5xx)."""
    monkeypatch.setattr(KustoQueries, "run", _refuse)
    if check_fails_too:
        monkeypatch.setattr(KustoQueries, "command", _check_fails_too)
    with (
        KustoSaver.from_conn_string(queue_url, kusto_server.url) as saver,
        pytest.raises(KustoServiceError) as raised,
    ):
        saver.get_tuple(A_THREAD)
    assert raised.value is REFUSAL


@pytest.mark.parametrize("check_fails_too", [False, True])
async def test_an_async_read_kusto_refuses_for_another_reason_keeps_kusto_s_error(
    kusto_server: LocalKustoServer,
    queue_url: str,
    monkeypatch: pytest.MonkeyPatch,
    check_fails_too: bool,
) -> None:
    monkeypatch.setattr(AsyncKustoQueries, "run", _refuse_async)
    if check_fails_too:
        monkeypatch.setattr(AsyncKustoQueries, "command", _check_fails_too_async)
    async with AsyncKustoSaver.from_conn_string(queue_url, kusto_server.url) as saver:
        with pytest.raises(KustoServiceError) as raised:
            await saver.aget_tuple(A_THREAD)
    assert raised.value is REFUSAL


def test_a_read_kusto_asks_to_retry_does_not_check_the_schema(
    kusto_server: LocalKustoServer, queue_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kusto answering 503 is not a schema question: asking it for the schema as well only
    adds load to a cluster that is already struggling."""
    busy = KustoServiceError("Service unavailable", http_response=_Answer(503))  # type: ignore[arg-type]
    checks: list[str] = []

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise busy

    monkeypatch.setattr(KustoQueries, "run", unavailable)
    monkeypatch.setattr(KustoQueries, "command", lambda self, text: checks.append(text))
    with (
        KustoSaver.from_conn_string(queue_url, kusto_server.url) as saver,
        pytest.raises(KustoServiceError) as raised,
    ):
        saver.get_tuple(A_THREAD)
    assert raised.value is busy
    assert checks == []


def test_a_strong_delete_or_put_on_a_database_never_provisioned_says_to_provision(
    unprovisioned: LocalKustoServer, queue_url: str
) -> None:
    """Their reads of Kusto (the newest sequence before a delete, the wait for ingestion
    after a put) raised Kusto's refusal of the query."""
    with KustoSaver.from_conn_string(
        queue_url, unprovisioned.url, consistency="strong", strong_timeout=5
    ) as saver:
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            saver.delete_thread("t1")
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            saver.put(A_THREAD, empty_checkpoint(), {}, {})


async def test_an_async_strong_delete_or_put_on_a_database_never_provisioned_says_to_provision(
    unprovisioned: LocalKustoServer, queue_url: str
) -> None:
    async with AsyncKustoSaver.from_conn_string(
        queue_url, unprovisioned.url, consistency="strong", strong_timeout=5
    ) as saver:
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            await saver.adelete_thread("t1")
        with pytest.raises(SchemaError, match=PROVISION_MESSAGE):
            await saver.aput(A_THREAD, empty_checkpoint(), {}, {})


async def test_setup_still_says_to_provision_when_the_table_is_missing(
    tmp_path: Path, queue_url: str
) -> None:
    server = start_local_kusto(tmp_path / "kusto", port=0)
    message = r"table CheckpointEvents is missing or out of date .*\. Run `langgraph-kusto provis"
    try:
        with (
            KustoSaver.from_conn_string(queue_url, server.url) as saver,
            pytest.raises(SchemaError, match=message),
        ):
            await asyncio.to_thread(saver.setup)
        async with AsyncKustoSaver.from_conn_string(queue_url, server.url) as aio:
            with pytest.raises(SchemaError, match=message):
                await aio.setup()
    finally:
        server.close()
