"""Where things are: flags, then environment variables, then local defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass

QUEUE_ENV = "LANGGRAPH_KUSTO_QUEUE"
CLUSTER_ENV = "LANGGRAPH_KUSTO_CLUSTER"
DATABASE_ENV = "LANGGRAPH_KUSTO_DATABASE"

LOCAL_DIR = ".langgraph-kusto"
DEFAULT_QUEUE = f"sqlite:///{LOCAL_DIR}/outbox.db"
DEFAULT_LOCAL_PORT = 31450
DEFAULT_CLUSTER = f"http://127.0.0.1:{DEFAULT_LOCAL_PORT}"
DEFAULT_DATABASE = "langgraph"


@dataclass(frozen=True, slots=True)
class Settings:
    queue: str
    cluster: str
    database: str


def resolve(
    queue: str | None = None, cluster: str | None = None, database: str | None = None
) -> Settings:
    return Settings(
        queue=queue or os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE,
        cluster=cluster or os.environ.get(CLUSTER_ENV) or DEFAULT_CLUSTER,
        database=database or os.environ.get(DATABASE_ENV) or DEFAULT_DATABASE,
    )
