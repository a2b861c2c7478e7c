"""Saver benchmark: ours on the local stack next to LangGraph's own savers, in one run.

    python bench/bench_saver.py [--ops 2000] [--runs 60] [--rounds 3]
                                [--stack-priority idle|normal]

Prints per-operation microseconds for put, put_writes, get_tuple (cache hit and miss),
list, and graph steps/s with the no-checkpointer ceiling, then the ratios the project
targets. Two graphs: a minimal model/tool loop whose nodes do no work on plain dicts, and
LangGraph's prebuilt ReAct agent (LangChain messages, a scripted chat model calling one
real tool), so the saver's share is seen both bare and inside a real agent's step. Cache
hits and graph steps/s are the median of ``--rounds`` measurements per saver, taken in
turns with the other savers'. Ours runs in ``session`` mode with a worker ingesting in the
background; "miss" reads come from a fresh ``eventual`` saver (Kusto only).
AsyncPostgresSaver runs on a throwaway local server when PostgreSQL is installed
(``bench/postgres_peer.py``).

The local Kusto server and the worker run as their own processes at idle CPU priority
(``SCHED_IDLE``: they get only CPU time the app leaves): deployed, they run on other
machines, while here they share the two cores with the app being measured. They still
drain the queue concurrently, and the worker imports the saver's spool files as it goes.
``--stack-priority normal`` measures them competing with the app instead.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Annotated, Any, Self, TypedDict

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.schema import provision_commands
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import create_react_agent
from langgraph.warnings import LangGraphDeprecatedSinceV10
from postgres_peer import postgres_saver

DATABASE = "langgraph"
CLI = "langgraph.checkpoint.kusto.ingestor_worker.cli"
SERVICE = "langgraph.checkpoint.kusto.ingestor_worker.service"
TOOL_CALLS = 5  # per ReAct agent run, before its final answer

Run = Callable[[RunnableConfig], Awaitable[int]]
"""One run of a graph on the config's thread; returns the super-steps it took."""


class AgentState(TypedDict, total=False):
    messages: Annotated[list[dict[str, str]], operator.add]
    turns: int


def minimal_graph(checkpointer: Any) -> Run:
    """model -> tool -> model ... a fixed number of turns, like a tool-calling agent."""

    def model(state: AgentState) -> dict[str, Any]:
        turn = state.get("turns", 0)
        return {
            "messages": [{"role": "assistant", "content": f"call tool #{turn}"}],
            "turns": turn + 1,
        }

    def tool(state: AgentState) -> dict[str, Any]:
        return {"messages": [{"role": "tool", "content": "result " * 20}]}

    def route(state: AgentState) -> str:
        return "tool" if state["turns"] < 5 else END

    graph = StateGraph(AgentState)
    graph.add_node("model", model)
    graph.add_node("tool", tool)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", route, ["tool", END])
    graph.add_edge("tool", "model")
    app = graph.compile(checkpointer=checkpointer)

    async def run(config: RunnableConfig) -> int:
        result = await app.ainvoke(
            {"messages": [{"role": "user", "content": "go"}], "turns": 0}, config
        )
        # Super-steps: __start__, ``turns`` model steps and the tool steps between them
        return int(result["turns"]) * 2

    return run


@tool
async def lookup(query: str) -> str:
    """Look up a query in the knowledge base."""
    return f"{query}: " + "result " * 20


class ScriptedChatModel(GenericFakeChatModel):
    """A chat model whose replies are scripted, so tools bound to it change nothing."""

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Self:
        return self

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The inherited one runs ``_generate`` in a worker thread; a real model's client
        # awaits its HTTP call on the event loop instead.
        return self._generate(messages, stop, **kwargs)


def _agent_replies() -> Iterator[AIMessage]:
    """``TOOL_CALLS`` tool calls, then a final answer, for every run. New objects each
    time: ``add_messages`` stamps an id on a message that has none, and a reused message
    would then replace its earlier copy in a conversation instead of being appended."""
    for n in count():
        if n % (TOOL_CALLS + 1) < TOOL_CALLS:
            call = {"name": "lookup", "args": {"query": f"fact {n}"}, "id": f"call-{n}"}
            yield AIMessage("", tool_calls=[call])
        else:
            yield AIMessage("answer " * 20)


def react_agent(checkpointer: Any) -> Run:
    """LangGraph's prebuilt tool-calling agent, its state LangChain messages."""
    # Its successor, ``create_agent``, is in the ``langchain`` package, which this project
    # does not depend on; this one is still LangGraph 1.x's own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LangGraphDeprecatedSinceV10)
        app = create_react_agent(
            ScriptedChatModel(messages=_agent_replies()), [lookup], checkpointer=checkpointer
        )

    async def run(config: RunnableConfig) -> int:
        result = await app.ainvoke({"messages": [HumanMessage("what do you know?")]}, config)
        messages = result["messages"]
        # Each super-step adds one message (__start__ the question, the agent a reply, the
        # tools node its one call's result): those from this run's question on.
        question = max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage))
        return len(messages) - question

    return run


GRAPHS: dict[str, Callable[[Any], Run]] = {
    "minimal graph": minimal_graph,
    "ReAct agent": react_agent,
}


def _checkpoint(step: int) -> Any:
    checkpoint = empty_checkpoint()
    checkpoint["id"] = str(uuid6(clock_seq=step))
    checkpoint["channel_values"] = {
        "messages": [{"role": "user", "content": "hello " * 30}] * 4,
        "turns": step,
    }
    checkpoint["channel_versions"] = {"messages": f"{step:032}.0", "turns": f"{step:032}.0"}
    return checkpoint


def _agent_checkpoint(step: int) -> Any:
    """A checkpoint of an agent's conversation: LangChain message objects, as real agents
    hold (serializers encode them as objects, not plain values)."""
    checkpoint = _checkpoint(step)
    call = {"name": "lookup", "args": {"query": "fact"}, "id": f"call-{step}"}
    checkpoint["channel_values"] = {
        "messages": [
            HumanMessage("hello " * 30, id=f"h-{step}"),
            AIMessage("", tool_calls=[call], id=f"a-{step}"),
            ToolMessage("result " * 20, tool_call_id=f"call-{step}", id=f"t-{step}"),
            AIMessage("answer " * 20, id=f"f-{step}"),
        ]
    }
    checkpoint["channel_versions"] = {"messages": f"{step:032}.0"}
    return checkpoint


HITS = ("get_tuple (hit)", "get_tuple (hit, messages)")
"""Cache hits of the plain-dict checkpoint and of the LangChain-messages one."""


async def _timed(n: int, call: Callable[[int], Awaitable[Any]]) -> float:
    """Median microseconds per call over ``n`` calls (after a short warm-up)."""
    for i in range(min(20, n)):
        await call(i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


async def measure(
    saver: BaseCheckpointSaver, reader: BaseCheckpointSaver, ops: int
) -> tuple[dict[str, float], dict[str, Callable[[int], Awaitable[None]]]]:
    """Median µs per call of each operation but the cache hits, and the cache-hit reads
    themselves (``HITS``), which the caller times in turns with the other savers' (a few
    µs: a single run swung 2x with the machine's moments)."""
    configs: list[Any] = []

    async def put(i: int) -> None:
        checkpoint = _checkpoint(i)
        config: RunnableConfig = {
            "configurable": {"thread_id": f"bench-{i % 50}", "checkpoint_ns": ""}
        }
        configs.append(
            await saver.aput(
                config, checkpoint, {"source": "loop", "step": i}, checkpoint["channel_versions"]
            )
        )

    results = {"put": await _timed(ops, put)}

    async def put_writes(i: int) -> None:
        await saver.aput_writes(configs[i % len(configs)], [("messages", {"i": i})], f"task-{i}")

    results["put_writes"] = await _timed(ops, put_writes)

    async def get_hit(i: int) -> None:
        assert await saver.aget_tuple(configs[-1 - (i % 50)]) is not None

    agent_configs = []
    for i in range(50):
        checkpoint = _agent_checkpoint(i)
        written = await saver.aput(
            {"configurable": {"thread_id": f"bench-agent-{i}", "checkpoint_ns": ""}},
            checkpoint,
            {"source": "loop", "step": i},
            checkpoint["channel_versions"],
        )
        await saver.aput_writes(written, [("messages", [AIMessage(f"w{i}")])], f"task-{i}")
        agent_configs.append(written)

    async def get_agent_hit(i: int) -> None:
        assert await saver.aget_tuple(agent_configs[i % 50]) is not None

    if reader is not saver:  # Kusto's reads below; the hits are timed with the worker idle
        await saver.wait_for_ingestion()  # type: ignore[attr-defined]

    async def get_miss(i: int) -> None:
        assert await reader.aget_tuple(configs[-1 - (i % 50)]) is not None

    results["get_tuple (miss)"] = await _timed(max(ops // 10, 20), get_miss)

    async def list_ten(i: int) -> None:
        found = [
            t
            async for t in reader.alist(
                {"configurable": {"thread_id": f"bench-{i % 50}"}}, limit=10
            )
        ]
        assert found

    results["list (limit 10)"] = await _timed(max(ops // 20, 20), list_ten)
    return results, dict(zip(HITS, (get_hit, get_agent_hit), strict=True))


async def steps_per_second(
    graph: Callable[[Any], Run], checkpointer: Any, runs: int, *, threads: int | None
) -> float:
    """Graph steps per second over ``runs`` invocations.

    ``threads=None``: every run starts a new thread, so a saver's first read of it misses
    (for ours, a KQL round trip). Otherwise runs continue ``threads`` conversations, as
    a chat app does: each conversation has had one (untimed) turn before the clock starts,
    so what is timed is later turns, whose state the saver already holds.
    """
    run = graph(checkpointer)
    stamp = time.time_ns()

    async def turn(thread: int) -> int:
        return await run({"configurable": {"thread_id": f"graph-{stamp}-{thread}"}})

    if threads is not None:
        for thread in range(threads):
            await turn(thread)
    steps = 0
    start = time.perf_counter()
    for i in range(runs):
        steps += await turn(i if threads is None else i % threads)
    return steps / (time.perf_counter() - start)


def _idle_priority() -> None:
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # not Linux: the lowest nice level is the nearest thing
        os.nice(19)


@asynccontextmanager
async def local_stack(root: Path, *, idle: bool = True) -> AsyncIterator[tuple[str, str]]:
    """The local Kusto server and a worker as their own processes, as deployed: in this
    process they would compete with the app for the GIL."""
    server = subprocess.Popen(
        [sys.executable, "-m", CLI, "local-kusto", "--port", "0", "--data", str(root / "kusto")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=_idle_priority if idle else None,
    )
    processes: list[subprocess.Popen[Any]] = [server]
    try:
        assert server.stdout is not None
        cluster = server.stdout.readline().strip()
        queries = KustoQueries(cluster, DATABASE)
        for command in provision_commands():
            queries.command(command)
        queries.close()
        queue_url = f"sqlite:///{root / 'outbox.db'}"
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    SERVICE,
                    "--queue",
                    queue_url,
                    "--cluster",
                    cluster,
                    "--database",
                    DATABASE,
                    "--health-port",
                    "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_idle_priority if idle else None,
            )
        )
        yield queue_url, cluster
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=60, help="runs of each graph per saver")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="graph measurements per saver, taken in turns; the median is reported",
    )
    parser.add_argument(
        "--stack-priority",
        choices=("idle", "normal"),
        default="idle",
        help="CPU priority of the local Kusto server and worker (normal: they compete with "
        "the app for this machine's cores)",
    )
    args = parser.parse_args()

    rows: dict[str, dict[str, float]] = {}
    root = Path(tempfile.mkdtemp(prefix="bench-saver-"))
    try:
        async with AsyncExitStack() as stack:
            memory = InMemorySaver()
            savers: dict[str, tuple[Any, Any]] = {"InMemorySaver": (memory, memory)}
            sqlite = await stack.enter_async_context(
                AsyncSqliteSaver.from_conn_string(str(root / "sqlite.db"))
            )
            savers["AsyncSqliteSaver"] = (sqlite, sqlite)
            queue_url, cluster = await stack.enter_async_context(
                local_stack(root, idle=args.stack_priority == "idle")
            )
            ours = await stack.enter_async_context(
                AsyncKustoSaver.from_conn_string(queue_url, cluster, DATABASE)
            )
            reader = await stack.enter_async_context(
                AsyncKustoSaver.from_conn_string(
                    queue_url, cluster, DATABASE, consistency="eventual"
                )
            )
            savers["AsyncKustoSaver"] = (ours, reader)
            postgres = await stack.enter_async_context(postgres_saver(root))
            if isinstance(postgres, str):
                print(postgres + "\n")
            else:
                savers["AsyncPostgresSaver"] = (postgres, postgres)
            hits: dict[str, dict[str, Callable[[int], Awaitable[None]]]] = {}
            for name, (saver, peer_reader) in savers.items():
                rows[name], hits[name] = await measure(saver, peer_reader, args.ops)
            hit_times: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
            for _ in range(args.rounds):
                for hit in HITS:
                    for name, get_hits in hits.items():
                        hit_times[name, hit].append(await _timed(args.ops, get_hits[hit]))
            for (name, hit), found in hit_times.items():
                rows[name][hit] = statistics.median(found)
            # In turns, so that the machine's slow and fast moments fall on every saver.
            # Keyed (graph, "no checkpointer" or saver, threads): threads None is a new
            # thread per run; the ceiling has no conversations to continue.
            found_steps: defaultdict[tuple[str, str, int | None], list[float]] = defaultdict(list)
            for _ in range(args.rounds):
                for label, graph in GRAPHS.items():
                    found_steps[label, "no checkpointer", None].append(
                        await steps_per_second(graph, None, args.runs, threads=None)
                    )
                    for name, (saver, _) in savers.items():
                        for threads in (10, None):
                            found_steps[label, name, threads].append(
                                await steps_per_second(
                                    graph,
                                    InMemorySaver() if saver is memory else saver,
                                    args.runs,
                                    threads=threads,
                                )
                            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    steps = {key: statistics.median(found) for key, found in found_steps.items()}

    names = list(rows)
    print(f"{'µs per call (median)':<28}" + "".join(f"{n:>20}" for n in names))
    for op in ("put", "put_writes", *HITS, "get_tuple (miss)", "list (limit 10)"):
        print(f"{op:<28}" + "".join(f"{rows[n][op]:>20.1f}" for n in names))
    print()
    print(f"{'graph steps/s':<36}" + "".join(f"{n:>20}" for n in ["no checkpointer", *names]))
    for label in GRAPHS:
        # In both rows: without a checkpointer there is no conversation to continue.
        ceiling = steps[label, "no checkpointer", None]
        for threads, variant in ((10, "10 conversations"), (None, "new thread per run")):
            cells = [ceiling, *(steps[label, n, threads] for n in names)]
            print(f"{f'  {label}, {variant}':<36}" + "".join(f"{c:>20.0f}" for c in cells))
    print(f"(cache hits and graph steps: median of {args.rounds} rounds, taken in turns)")
    print()
    ours_row = rows["AsyncKustoSaver"]
    targets = [
        (
            f"steps/s vs {peer} ({label})",
            steps[label, "AsyncKustoSaver", 10] / steps[label, peer, 10],
            target,
        )
        for label in GRAPHS
        for peer, target in (("AsyncSqliteSaver", 1.5), ("InMemorySaver", 0.8))
    ]
    targets += [
        (
            f"{hit} speed-up vs InMemorySaver",
            rows["InMemorySaver"][hit] / ours_row[hit],
            2.0,
        )
        for hit in HITS
    ]
    for name, ratio, target in targets:
        verdict = "meets" if ratio >= target else "MISSES"
        print(f"{name:<52} {ratio:6.2f}x  (target >= {target}x: {verdict})")


if __name__ == "__main__":
    asyncio.run(main())
