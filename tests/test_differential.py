"""Real LangGraph graphs run with InMemorySaver and with ours: the histories must match.

Each scenario runs twice from scratch, once per checkpointer. Ours is read back twice:
through the saver that wrote (session mode: cache plus Kusto) and through a fresh
``eventual`` saver after ingestion (Kusto only), so both read paths are compared.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, RetryPolicy, Send, interrupt

Scenario = Callable[[BaseCheckpointSaver, str], Awaitable[Any]]


class State(TypedDict, total=False):
    log: Annotated[list[str], operator.add]
    answer: str


def _chain(checkpointer: BaseCheckpointSaver) -> Any:
    graph = StateGraph(State)
    graph.add_node("a", lambda s: {"log": ["a"]})
    graph.add_node("b", lambda s: {"log": ["b"], "answer": "done"})
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", END)
    return graph.compile(checkpointer=checkpointer)


async def interrupt_and_resume(checkpointer: BaseCheckpointSaver, thread: str) -> Any:
    def ask(state: State) -> dict[str, Any]:
        approved = interrupt({"question": "ship it?"})
        return {"log": [f"approved={approved}"]}

    graph = StateGraph(State)
    graph.add_node("plan", lambda s: {"log": ["plan"]})
    graph.add_node("ask", ask)
    graph.add_node("ship", lambda s: {"log": ["ship"], "answer": "shipped"})
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "ask")
    graph.add_edge("ask", "ship")
    graph.add_edge("ship", END)
    app = graph.compile(checkpointer=checkpointer)
    config = {"configurable": {"thread_id": thread}}
    await app.ainvoke({"log": ["start"]}, config)
    await app.ainvoke(Command(resume="yes"), config)
    return app


async def subgraphs(checkpointer: BaseCheckpointSaver, thread: str) -> Any:
    inner = StateGraph(State)
    inner.add_node("inner_step", lambda s: {"log": ["inner"]})
    inner.add_edge(START, "inner_step")
    inner.add_edge("inner_step", END)
    graph = StateGraph(State)
    graph.add_node("outer", lambda s: {"log": ["outer"]})
    graph.add_node("child", inner.compile())
    graph.add_edge(START, "outer")
    graph.add_edge("outer", "child")
    graph.add_edge("child", END)
    app = graph.compile(checkpointer=checkpointer)
    await app.ainvoke({"log": ["start"]}, {"configurable": {"thread_id": thread}})
    return app


async def send_fan_out(checkpointer: BaseCheckpointSaver, thread: str) -> Any:
    def fan_out(state: State) -> list[Send]:
        return [Send("work", {"log": [f"item-{i}"]}) for i in range(4)]

    graph = StateGraph(State)
    graph.add_node("start", lambda s: {"log": ["start"]})
    graph.add_node("work", lambda s: {"log": [f"done-{s['log'][-1]}"]})
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", fan_out, ["work"])
    graph.add_edge("work", END)
    app = graph.compile(checkpointer=checkpointer)
    await app.ainvoke({"log": []}, {"configurable": {"thread_id": thread}})
    return app


async def update_state_and_time_travel(checkpointer: BaseCheckpointSaver, thread: str) -> Any:
    app = _chain(checkpointer)
    config = {"configurable": {"thread_id": thread}}
    await app.ainvoke({"log": ["start"]}, config)
    history = [s async for s in app.aget_state_history(config)]
    after_a = next(s for s in history if s.next == ("b",))
    forked = await app.aupdate_state(after_a.config, {"log": ["edited"]})
    await app.ainvoke(None, forked)
    return app


async def failing_node_retried(checkpointer: BaseCheckpointSaver, thread: str) -> Any:
    attempts = {"flaky": 0, "broken": 0}

    def flaky(state: State) -> dict[str, Any]:
        attempts["flaky"] += 1
        if attempts["flaky"] < 2:
            raise ConnectionError("transient")
        return {"log": ["flaky ok"]}

    def broken_once(state: State) -> dict[str, Any]:
        attempts["broken"] += 1
        if attempts["broken"] == 1:
            raise ValueError("first run fails")
        return {"log": ["recovered"]}

    graph = StateGraph(State)
    graph.add_node("flaky", flaky, retry_policy=RetryPolicy(max_attempts=3, initial_interval=0))
    graph.add_node("broken", broken_once)
    graph.add_edge(START, "flaky")
    graph.add_edge("flaky", "broken")
    graph.add_edge("broken", END)
    app = graph.compile(checkpointer=checkpointer)
    config = {"configurable": {"thread_id": thread}}
    with pytest.raises(ValueError):
        await app.ainvoke({"log": ["start"]}, config)
    await app.ainvoke(None, config)
    return app


class DeltaState(TypedDict, total=False):
    items: Annotated[list[str], DeltaChannel(operator.add, snapshot_frequency=2)]


async def delta_channel(checkpointer: BaseCheckpointSaver, thread: str) -> Any:
    graph = StateGraph(DeltaState)
    for name in ("one", "two", "three", "four", "five"):
        graph.add_node(name, lambda s, name=name: {"items": [name]})
    graph.add_edge(START, "one")
    graph.add_edge("one", "two")
    graph.add_edge("two", "three")
    graph.add_edge("three", "four")
    graph.add_edge("four", "five")
    graph.add_edge("five", END)
    app = graph.compile(checkpointer=checkpointer)
    config = {"configurable": {"thread_id": thread}}
    await app.ainvoke({"items": ["input"]}, config)
    await app.ainvoke({"items": ["again"]}, config)
    return app


SCENARIOS = [
    interrupt_and_resume,
    subgraphs,
    send_fan_out,
    update_state_and_time_travel,
    failing_node_retried,
    delta_channel,
]


async def _history(app: Any, thread: str) -> list[Any]:
    """The thread's history without ids and timestamps (those differ between runs)."""
    config = {"configurable": {"thread_id": thread}}
    snapshots = [s async for s in app.aget_state_history(config)]
    ids = [s.config["configurable"]["checkpoint_id"] for s in snapshots]
    described = []
    for snapshot in snapshots:
        parent = (
            snapshot.parent_config["configurable"]["checkpoint_id"]
            if (snapshot.parent_config)
            else None
        )
        described.append(
            {
                "values": snapshot.values,
                "next": snapshot.next,
                "step": snapshot.metadata.get("step"),
                "source": snapshot.metadata.get("source"),
                "parent": ids.index(parent) if parent in ids else None,
                "tasks": [
                    (t.name, t.error is not None, [i.value for i in t.interrupts])
                    for t in snapshot.tasks
                ],
                "interrupts": [i.value for i in snapshot.interrupts],
            }
        )
    current = await app.aget_state(config, subgraphs=True)
    subgraph_values = [
        task.state.values for task in current.tasks if getattr(task.state, "values", None)
    ]
    return [described, subgraph_values]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_histories_match_in_memory_saver(stack: Any, scenario: Scenario) -> None:
    reference_thread = f"ref-{uuid.uuid4().hex[:8]}"
    reference = await scenario(InMemorySaver(), reference_thread)
    expected = await _history(reference, reference_thread)

    thread = f"diff-{uuid.uuid4().hex[:8]}"
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        app = await scenario(saver, thread)
        assert await _history(app, thread) == expected
        await saver.wait_for_ingestion(timeout=60)

    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="eventual"
    ) as reader:
        from_kusto = app.copy(update={"checkpointer": reader})
        assert await _history(from_kusto, thread) == expected


async def test_delta_channel_history_is_one_query_and_matches(stack: Any) -> None:
    reference = InMemorySaver()
    await delta_channel(reference, "delta")
    thread = f"delta-{uuid.uuid4().hex[:8]}"
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        await delta_channel(saver, thread)
        latest_ours = await saver.aget_tuple({"configurable": {"thread_id": thread}})
        latest_ref = await reference.aget_tuple({"configurable": {"thread_id": "delta"}})
        assert latest_ours is not None and latest_ref is not None
        ours = await saver.aget_delta_channel_history(config=latest_ours.config, channels=["items"])
        ref = reference.get_delta_channel_history(config=latest_ref.config, channels=["items"])
        assert [w[1:] for w in ours["items"]["writes"]] == [w[1:] for w in ref["items"]["writes"]]
        assert ours["items"].get("seed") == ref["items"].get("seed")

        calls = 0
        run = saver.queries.run

        async def counting(query: Any) -> Any:
            nonlocal calls
            calls += 1
            return await run(query)

        saver.queries.run = counting  # type: ignore[method-assign]
        await saver.aget_delta_channel_history(config=latest_ours.config, channels=["items"])
        assert calls == 1
