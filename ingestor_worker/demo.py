"""``langgraph-kusto demo``: the whole pipeline on this machine, no Azure, no LLM.

Starts the local Kusto server and a worker, runs a small deterministic agent through
``KustoSaver``, waits until the worker has ingested every checkpoint, then prints the
thread's history read back from Kusto with KQL.
"""

from __future__ import annotations

import operator
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import start_local_kusto
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.schema import provision_commands
from langgraph.checkpoint.kusto.settings import DEFAULT_DATABASE

THREAD_HISTORY = """\
declare query_parameters(thread_id:string);
CheckpointEvents
| where ThreadId == thread_id and RowKind == "checkpoint" and Chunk == 0
| summarize arg_max(EventSeq, *) by CheckpointId
| project CheckpointId, Step = toint(Metadata.step), Source = tostring(Metadata.source),
    PublishedAt
| order by CheckpointId asc"""

DEMO_THREAD = "demo-thread"
INGESTION_TIMEOUT = 60.0


class AgentState(TypedDict):
    messages: Annotated[list[str], operator.add]
    answer: str


def _plan(state: AgentState) -> dict[str, Any]:
    return {"messages": [f"plan: look up the weather for '{state['messages'][0]}'"]}


def _call_tool(state: AgentState) -> dict[str, Any]:
    return {"messages": ["tool weather(city='Seattle') -> 'rain, 9°C'"]}


def _respond(state: AgentState) -> dict[str, Any]:
    return {"messages": ["assistant: take an umbrella"], "answer": "take an umbrella"}


def build_agent(checkpointer: Any) -> Any:
    """A three-step agent (plan, tool call, answer) that needs no model service."""
    from langgraph.graph import END, START, StateGraph

    graph = StateGraph(AgentState)
    graph.add_node("plan", _plan)
    graph.add_node("tool", _call_tool)
    graph.add_node("respond", _respond)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "tool")
    graph.add_edge("tool", "respond")
    graph.add_edge("respond", END)
    return graph.compile(checkpointer=checkpointer)


def run_demo(data_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run the pipeline end to end; returns (and prints) the history read from Kusto."""
    with tempfile.TemporaryDirectory(prefix="langgraph-kusto-demo-") as scratch:
        root = Path(data_dir) if data_dir is not None else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        server = start_local_kusto(root / "kusto", port=0, database=DEFAULT_DATABASE)
        queue_url = f"sqlite:///{(root / 'outbox.db').resolve()}"
        stop = threading.Event()
        worker_thread: threading.Thread | None = None
        queries = KustoQueries(server.url, DEFAULT_DATABASE)
        try:
            print(f"local Kusto server: {server.url} (database {DEFAULT_DATABASE})")
            for command in provision_commands():
                queries.command(command)
            print("provisioned provision.kql")

            receiver = open_queue(queue_url)
            ingestor = KustoIngestor(server.url, DEFAULT_DATABASE)
            worker = Worker(receiver, ingestor, max_wait=0.2)
            worker_thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
            worker_thread.start()
            print(f"worker: receiving from {queue_url}")

            with KustoSaver.from_conn_string(queue_url, server.url, DEFAULT_DATABASE) as saver:
                agent = build_agent(saver)
                config = {"configurable": {"thread_id": DEMO_THREAD}}
                result = agent.invoke({"messages": ["What should I wear in Seattle?"]}, config)
                print(f"agent answered: {result['answer']!r}")
                written = len(list(saver.list(config)))

            history = _wait_for_history(queries, written)
            print(f"\nhistory of thread {DEMO_THREAD!r}, read back from Kusto with KQL:")
            print(f"{'checkpoint id':<38} {'step':>4}  source")
            for row in history:
                print(f"{row['CheckpointId']:<38} {row['Step']:>4}  {row['Source']}")
            return history
        finally:
            stop.set()
            if worker_thread is not None:
                worker_thread.join(timeout=10)
            queries.close()
            server.close()


def _wait_for_history(queries: KustoQueries, expected: int) -> list[dict[str, Any]]:
    query = Query(THREAD_HISTORY, {"thread_id": DEMO_THREAD})
    deadline = time.monotonic() + INGESTION_TIMEOUT
    while True:
        rows = queries.run(query)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)
