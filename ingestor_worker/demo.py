"""``langgraph-kusto demo``: a tour of the whole pipeline on this machine, no Azure, no LLM.

1. The local stack: the local Kusto server, provision.kql, a worker draining a SQLite queue.
2. An agent with tool calls and a human approval (an ``interrupt`` resumed with
   ``Command(resume=...)``) runs through ``KustoSaver``; the model is a script, so every
   run is the same.
3. A thread's history read back from Kusto with KQL, and its state through a second saver
   that has no cache.
4. A KQL analytics query over all demo threads: steps, tool calls and interrupts per thread.
5. Failures: a poison message (random bytes) is dead-lettered and inspected with the code
   of ``langgraph-kusto dlq list`` and ``dlq show``; the table's ingestion mapping is
   dropped, and the worker keeps the events it cannot ingest and retries, dead-lettering
   nothing. After the fix (provision.kql applied again) they land in Kusto, and the poison
   is purged with the code of ``dlq purge``.

Every user value in the KQL travels as a query parameter (``declare query_parameters``).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO, TypedDict
from urllib.parse import quote

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.dlq import (
    Selection,
    run_list,
    run_purge,
    run_show,
)
from langgraph.checkpoint.kusto.ingestor_worker.ingest import JSON_MAPPING, KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.retry import RetryPolicy
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer, start_local_kusto
from langgraph.checkpoint.kusto.outbox import OutboxMessage
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.schema import apply_provision
from langgraph.checkpoint.kusto.settings import DEFAULT_DATABASE
from langgraph.checkpoint.kusto.shared.errors import EnvelopeError
from langgraph.checkpoint.kusto.shared.rows import TABLE
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt

THREAD_HISTORY = """\
declare query_parameters(thread_id:string);
let Next = CheckpointEvents
    | where ThreadId == thread_id and RowKind == "write"
    | extend Node = tostring(split(TaskPath, ", ")[1])
    | where isnotempty(Node)
    | summarize Nodes = make_set(Node) by CheckpointId;
CheckpointEvents
| where ThreadId == thread_id and RowKind == "checkpoint" and Chunk == 0
| summarize arg_max(EventSeq, *) by CheckpointId
| join kind=leftouter Next on CheckpointId
| project CheckpointId, Step = toint(Metadata.step), Source = tostring(Metadata.source),
    Next = strcat_array(Nodes, ","), PublishedAt
| order by CheckpointId asc"""
"""A thread's checkpoints (the latest put of each, so a redelivered copy counts once) with
the nodes that ran from each one: their pending writes are stored against it, and a task's
path (``~__pregel_pull, <node>``) names the node; a resume's writes have no path."""

AGENT_RUNS = """\
declare query_parameters(thread_prefix:string, tool_node:string);
let Events = CheckpointEvents
    | where ThreadId startswith thread_prefix;
let Steps = Events
    | where RowKind == "checkpoint" and Chunk == 0
    | summarize Checkpoints = dcount(CheckpointId), Steps = max(toint(Metadata.step))
        by ThreadId;
let ToolCalls = Events
    | where RowKind == "write" and tostring(split(TaskPath, ", ")[1]) == tool_node
    | summarize ToolCalls = dcount(TaskId) by ThreadId;
let Interrupts = Events
    | where RowKind == "write" and Channel == "__interrupt__"
    | summarize Interrupts = dcount(TaskId) by ThreadId;
Steps
| join kind=leftouter ToolCalls on ThreadId
| join kind=leftouter Interrupts on ThreadId
| project ThreadId, Steps, Checkpoints, ToolCalls = coalesce(ToolCalls, 0),
    Interrupts = coalesce(Interrupts, 0)
| order by ThreadId asc"""
"""Steps, checkpoints, tool calls (runs of the tool node: the scripted model asks for one
tool per turn) and interrupts per thread. Distinct counts, so redelivered rows count once."""

DROP_MAPPING = f".drop table {TABLE} ingestion json mapping '{JSON_MAPPING}'"
"""The demo's misconfiguration: the worker's ingestion then fails until provision.kql is
applied again (it re-creates the mapping)."""

THREAD_PREFIX = "demo-"
DEMO_THREAD = "demo-thread"
LATE_THREAD = "demo-thread-late"
TOOL_NODE = "tools"
APPROVAL_TOOLS = frozenset({"book_table"})

INGESTION_TIMEOUT = 60.0
POLL_INTERVAL = 0.1
DEMO_RETRY = RetryPolicy(max_attempts=2, budget=2.0, initial_backoff=0.05, max_backoff=0.1)
"""Short rounds of retries, so the worker reports a failing ingestion within a second."""
HELD_ROUNDS = 2
"""Rounds of retries the tour watches the worker keep the events through."""
POISON_BYTES = 48


# --- the agent -------------------------------------------------------------------------------


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One conversation: the tool calls the scripted model asks for, one per turn, then its
    answer; ``decision`` is what the human answers when a tool needs approval."""

    thread_id: str
    question: str
    plan: tuple[tuple[str, dict[str, Any]], ...]
    answer: str
    decision: str = "approve"


SCENARIOS = (
    Scenario(
        DEMO_THREAD,
        "Find a dinner spot in Seattle for tonight and book it for two.",
        (
            ("weather", {"city": "Seattle"}),
            ("find_restaurant", {"city": "Seattle", "indoor": True}),
            ("book_table", {"restaurant": "Canlis", "party": 2}),
        ),
        "Rain tonight, so I booked an indoor table for two at Canlis, 19:30.",
    ),
    Scenario(
        "demo-thread-umbrella",
        "Do I need an umbrella in Seattle today?",
        (("weather", {"city": "Seattle"}),),
        "Yes: rain and 9°C in Seattle.",
    ),
    Scenario(
        "demo-thread-declined",
        "Book a table for four at Canlis.",
        (("book_table", {"restaurant": "Canlis", "party": 4}),),
        "I did not book anything: you declined.",
        decision="reject",
    ),
)
LATE_SCENARIO = Scenario(
    LATE_THREAD,
    "Is it raining in Seattle?",
    (("weather", {"city": "Seattle"}),),
    "Yes, it is raining in Seattle.",
)
_BY_THREAD = {s.thread_id: s for s in (*SCENARIOS, LATE_SCENARIO)}

TOOLS: dict[str, Callable[..., str]] = {
    "weather": lambda city: f"{city}: rain, 9°C",
    "find_restaurant": lambda city, indoor: "Canlis (indoor seating)",
    "book_table": lambda restaurant, party: f"booked {restaurant} for {party} at 19:30",
}


def _model(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
    """The scripted model: the next tool call of the thread's plan, then the answer."""
    scenario = _BY_THREAD[config["configurable"]["thread_id"]]
    done = sum(isinstance(m, ToolMessage) for m in state["messages"])
    if done < len(scenario.plan):
        name, args = scenario.plan[done]
        call = {"name": name, "args": args, "id": f"call-{done}", "type": "tool_call"}
        return {"messages": [AIMessage("", tool_calls=[call])]}
    return {"messages": [AIMessage(scenario.answer)]}


def _tools(state: AgentState) -> dict[str, Any]:
    """Runs the tool the model asked for; a booking first asks the human (``interrupt``)."""
    last = state["messages"][-1]
    assert isinstance(last, AIMessage) and last.tool_calls
    call = last.tool_calls[0]
    if call["name"] in APPROVAL_TOOLS:
        decision = interrupt({"approve": call["name"], "args": call["args"]})
        if decision != "approve":
            result = f"not done: the user answered {decision!r}"
            return {"messages": [ToolMessage(result, tool_call_id=call["id"], name=call["name"])]}
    result = TOOLS[call["name"]](**call["args"])
    return {"messages": [ToolMessage(result, tool_call_id=call["id"], name=call["name"])]}


def _route(state: AgentState) -> str:
    last = state["messages"][-1]
    return TOOL_NODE if isinstance(last, AIMessage) and last.tool_calls else END


def build_agent(checkpointer: Any) -> Any:
    """model -> tools -> model ... -> answer: a tool-calling agent that needs no model service."""
    graph = StateGraph(AgentState)
    graph.add_node("model", _model)
    graph.add_node(TOOL_NODE, _tools)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", _route, [TOOL_NODE, END])
    graph.add_edge(TOOL_NODE, "model")
    return graph.compile(checkpointer=checkpointer)


def _converse(agent: Any, scenario: Scenario, out: TextIO) -> None:
    config = {"configurable": {"thread_id": scenario.thread_id}}
    print(f"\n  thread {scenario.thread_id!r}", file=out)
    result = agent.invoke({"messages": [HumanMessage(scenario.question)]}, config)
    shown = _print_messages(result["messages"], 0, out)
    while result.get("__interrupt__"):
        request = result["__interrupt__"][0].value
        print(
            f"    interrupt: approval asked for {_call(request['approve'], request['args'])}\n"
            f"    resumed with Command(resume={scenario.decision!r})",
            file=out,
        )
        result = agent.invoke(Command(resume=scenario.decision), config)
        shown = _print_messages(result["messages"], shown, out)


def _print_messages(messages: Sequence[AnyMessage], shown: int, out: TextIO) -> int:
    for message in messages[shown:]:
        print(f"    {_line(message)}", file=out)
    return len(messages)


def _call(name: str, args: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def _line(message: AnyMessage) -> str:
    if isinstance(message, HumanMessage):
        return f"user:      {message.content}"
    if isinstance(message, AIMessage) and message.tool_calls:
        return "model:     calls " + ", ".join(
            _call(c["name"], c["args"]) for c in message.tool_calls
        )
    if isinstance(message, ToolMessage):
        return f"tool:      {message.name} -> {message.content}"
    return f"assistant: {message.content}"


# --- the tour --------------------------------------------------------------------------------


@dataclass
class _Stack:
    server: LocalKustoServer
    queue_url: str
    queue: SqliteQueue
    """The worker's queue; also what the tour watches for an empty queue."""
    queries: KustoQueries


def run_demo(data_dir: Path | None = None, out: TextIO | None = None) -> list[dict[str, Any]]:
    """Run the tour; returns the demo thread's history as read from Kusto."""
    stream = sys.stdout if out is None else out
    with tempfile.TemporaryDirectory(prefix="langgraph-kusto-demo-") as scratch:
        root = Path(data_dir) if data_dir is not None else Path(scratch)
        _prepare_data_dir(root)
        with _local_stack(root, stream) as stack, _worker_log() as worker_log:
            history = _agent_runs(stack, stream)
            _failures(stack, worker_log, stream)
            return history


def _prepare_data_dir(root: Path) -> None:
    """Create the data directory, or a one-line ``UsageError``: it holds an earlier demo's
    data, or it cannot be a directory (a file, an unwritable or missing parent)."""
    from .cli import UsageError

    if (root / "kusto").exists() or (root / "outbox.db").exists():
        raise UsageError(
            f"{root} holds an earlier demo's data (its threads would mix with this run's); "
            "remove it or give --data an empty directory"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot keep the demo's data in {root}: {exc}") from None


@contextmanager
def _local_stack(root: Path, out: TextIO) -> Iterator[_Stack]:
    _heading(out, "1. The local stack (what `langgraph-kusto local up` runs)")
    server = start_local_kusto(root / "kusto", port=0, database=DEFAULT_DATABASE)
    # Quoted: '#', '?' and '%' in a path would otherwise end it or be decoded in the URL.
    queue_url = f"sqlite:///{quote(str((root / 'outbox.db').resolve()))}"
    queries = KustoQueries(server.url, DEFAULT_DATABASE)
    queue = SqliteQueue.from_url(queue_url)
    ingestor = KustoIngestor(server.url, DEFAULT_DATABASE)
    stop = threading.Event()
    worker_thread: threading.Thread | None = None
    try:
        print(f"  local Kusto server  {server.url} (database {DEFAULT_DATABASE})", file=out)
        apply_provision(queries)
        print("  schema              provision.kql applied", file=out)
        worker = Worker(queue, ingestor, max_wait=0.2, retry=DEMO_RETRY)
        worker_thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        worker_thread.start()
        print(f"  worker              {queue_url} -> Kusto", file=out)
        yield _Stack(server, queue_url, queue, queries)
    finally:
        stop.set()
        if worker_thread is not None:
            worker_thread.join(timeout=10)
        ingestor.close()
        queue.close()
        queries.close()
        server.close()


def _agent_runs(stack: _Stack, out: TextIO) -> list[dict[str, Any]]:
    _heading(out, "2. An agent with tool calls and an approval step, through KustoSaver")
    print("  (the model is a script: same run every time, no LLM)", file=out)
    with KustoSaver.from_conn_string(stack.queue_url, stack.server.url, DEFAULT_DATABASE) as saver:
        agent = build_agent(saver)
        for scenario in SCENARIOS:
            _converse(agent, scenario, out)
        written = len(list(saver.list({"configurable": {"thread_id": DEMO_THREAD}})))
    _wait_for_empty_queue(stack.queue)

    _heading(out, f"3. History of thread {DEMO_THREAD!r}, read back from Kusto with KQL")
    history = _wait_for_rows(stack.queries, _history_query(DEMO_THREAD), written)
    _table(out, history, ("CheckpointId", "Step", "Source", "Next"))
    with KustoSaver.from_conn_string(
        stack.queue_url, stack.server.url, DEFAULT_DATABASE, consistency="eventual"
    ) as reader:
        state = build_agent(reader).get_state({"configurable": {"thread_id": DEMO_THREAD}})
    messages = state.values["messages"]
    print(
        f"\n  a second saver without a cache (consistency='eventual') reads the state from "
        f"Kusto: {len(messages)} messages, the last: {messages[-1].content!r}",
        file=out,
    )

    _heading(out, "4. Analytics over all demo threads, in KQL")
    _table(out, stack.queries.run(_runs_query()), _RUN_COLUMNS)
    return history


def _failures(stack: _Stack, worker_log: list[logging.LogRecord], out: TextIO) -> None:
    from .dlq import open_store

    _heading(out, "5. Failures: a poison message, then a misconfigured Kusto")
    stack.queue.send([OutboxMessage(os.urandom(POISON_BYTES), "demo-poison", "demo-poison", {})])
    print(f"  a poison message ({POISON_BYTES} random bytes) is published to the queue", file=out)
    _wait_for_empty_queue(stack.queue)
    print("  the worker dead-letters it: its body is no event", file=out)
    store = open_store(stack.queue_url)
    try:
        _command(out, f"dlq list --queue {stack.queue_url}")
        _indented(out, lambda o: run_list(store, stack.queue_url, Selection(), o))
        poison = store.list_dead_letters(limit=1)[0]
        _command(out, f"dlq show {poison.sequence_number} --queue {stack.queue_url}")
        _indented(out, lambda o: run_show(store, stack.queue_url, poison.sequence_number, o))

        stack.queries.command(DROP_MAPPING)
        print(f"\n  an operator drops the table's ingestion mapping:\n    {DROP_MAPPING}", file=out)
        saver_options = (stack.queue_url, stack.server.url, DEFAULT_DATABASE)
        with KustoSaver.from_conn_string(*saver_options) as saver:
            _converse(build_agent(saver), LATE_SCENARIO, out)
            late_written = len(list(saver.list({"configurable": {"thread_id": LATE_THREAD}})))
        print("  (the app did not notice: its writes went to the queue)", file=out)
        _wait_for_held_rounds(worker_log)
        print(
            f"  the worker cannot ingest the thread's events ({_ingest_errors(worker_log)});\n"
            f"  it keeps them and retries for as long as Kusto refuses: the queue still holds "
            f"{stack.queue.depth()} messages, and nothing more is dead-lettered",
            file=out,
        )

        _heading(out, "6. The fix")
        apply_provision(stack.queries)
        print("  provision.kql applied again: the mapping is back", file=out)
        _wait_for_empty_queue(stack.queue)
        rows = _wait_for_rows(stack.queries, _history_query(LATE_THREAD), late_written)
        print(f"  thread {LATE_THREAD!r} is in Kusto now: {len(rows)} checkpoints", file=out)
        reason = EnvelopeError.reason
        _command(out, f"dlq purge --reason {reason} --queue {stack.queue_url}")
        purged = Selection(reason=reason)
        _indented(out, lambda o: run_purge(store, stack.queue_url, purged, o, o))
        _command(out, f"dlq list --queue {stack.queue_url}")
        _indented(out, lambda o: run_list(store, stack.queue_url, Selection(), o))
    finally:
        store.close()
    print("\n  analytics again, the late thread included:", file=out)
    _table(out, stack.queries.run(_runs_query()), _RUN_COLUMNS)


_RUN_COLUMNS = ("ThreadId", "Steps", "Checkpoints", "ToolCalls", "Interrupts")


def _history_query(thread_id: str) -> Query:
    return Query(THREAD_HISTORY, {"thread_id": thread_id})


def _runs_query() -> Query:
    return Query(AGENT_RUNS, {"thread_prefix": THREAD_PREFIX, "tool_node": TOOL_NODE})


@contextmanager
def _worker_log() -> Iterator[list[logging.LogRecord]]:
    """The worker's log records during the tour, kept for the tour to summarise instead of
    interleaving JSON lines with its output."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    worker_logger = logging.getLogger("langgraph.checkpoint.kusto.worker")
    handler = Keep(logging.INFO)
    worker_logger.addHandler(handler)
    saved = (worker_logger.propagate, worker_logger.level)
    worker_logger.propagate = False
    worker_logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        worker_logger.removeHandler(handler)
        worker_logger.propagate, level = saved
        worker_logger.setLevel(level)


def _ingest_errors(records: Sequence[logging.LogRecord]) -> str:
    """The distinct causes of failed ingestion attempts, as the worker logged them."""
    causes = {
        f"{record.__dict__.get('cause')}: {record.__dict__.get('error')}"
        for record in records
        if record.getMessage() == "ingestion attempt failed; retrying"
    }
    return "; ".join(sorted(causes)) or "no failure logged"


def _wait_for_held_rounds(records: Sequence[logging.LogRecord]) -> None:
    """Until the worker has kept the events it cannot ingest through ``HELD_ROUNDS``."""
    deadline = time.monotonic() + INGESTION_TIMEOUT
    while time.monotonic() < deadline:
        held = [r for r in records if r.getMessage().endswith("retrying with the batch in hand")]
        if len(held) >= HELD_ROUNDS:
            return
        time.sleep(POLL_INTERVAL)


def _wait_for_empty_queue(queue: SqliteQueue) -> None:
    """Until the worker has settled everything: ingested (then completed) or dead-lettered."""
    deadline = time.monotonic() + INGESTION_TIMEOUT
    while queue.depth() and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)


def _wait_for_rows(queries: KustoQueries, query: Query, expected: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + INGESTION_TIMEOUT
    while True:
        rows = queries.run(query)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(POLL_INTERVAL)


def _heading(out: TextIO, title: str) -> None:
    print(f"\n{title}", file=out)


def _command(out: TextIO, arguments: str) -> None:
    print(f"\n  $ langgraph-kusto {arguments}", file=out)


def _indented(out: TextIO, command: Callable[[TextIO], int]) -> None:
    """What a ``dlq`` command prints (its progress lines included), indented in the tour."""
    buffer = io.StringIO()
    command(buffer)
    for line in buffer.getvalue().splitlines():
        print(f"    {line}".rstrip(), file=out)


def _table(out: TextIO, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(x) for x in [c, *(r[i] for r in cells)]) for i, c in enumerate(columns)]
    for line in [list(columns), *cells]:
        print(
            "  " + "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip(),
            file=out,
        )


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)
