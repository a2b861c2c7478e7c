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


def resolve_arguments(
    queue: str | None = None, cluster: str | None = None, database: str | None = None
) -> Settings:
    """``resolve`` for a saver's ``from_conn_string``, whose arguments a caller passes on
    purpose: one given must be a non-empty string. ``resolve`` would take an empty one
    (say, an unset setting of the app's own) as unset, and silently use the environment
    or the local default."""
    for name, value, env in (
        ("queue", queue, QUEUE_ENV),
        ("cluster", cluster, CLUSTER_ENV),
        ("database", database, DATABASE_ENV),
    ):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(
                f"{name} must be a non-empty string, or None for ${env} or the local "
                f"default, got {value!r}"
            )
    return resolve(queue, cluster, database)
