"""Connections to Kusto: the same connection rules for the saver, the worker and the CLI.

A loopback ``http://`` cluster is the local stand-in and gets no authentication; any
other cluster authenticates with azure-identity (``DefaultAzureCredential`` unless a
credential is given), the way Azure SDK clients do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from azure.kusto.data import ClientRequestProperties, KustoClient, KustoConnectionStringBuilder
from azure.kusto.data.aio import KustoClient as AsyncKustoClient

from .queries import Query


def is_local_cluster(cluster: str) -> bool:
    parsed = urlparse(cluster)
    host = parsed.hostname or ""
    if parsed.scheme != "http":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connection_string(
    cluster: str, credential: Any | None = None, *, is_async: bool = False
) -> KustoConnectionStringBuilder:
    """How to reach ``cluster``: no auth on loopback, azure-identity elsewhere."""
    parsed = urlparse(cluster)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(
            f"cluster {cluster!r} is not a URL; expected https://<name>.<region>.kusto.windows.net "
            "or http://127.0.0.1:<port> for the local server"
        )
    if is_local_cluster(cluster):
        return KustoConnectionStringBuilder.with_no_authentication(cluster)
    if parsed.scheme != "https":
        raise ValueError(f"cluster {cluster!r} must use https outside of loopback")
    if credential is None:
        if is_async:
            from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential

            credential = AsyncDefaultAzureCredential()
        else:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
    return KustoConnectionStringBuilder.with_azure_token_credential(cluster, credential)


def request_properties(parameters: Mapping[str, Any]) -> ClientRequestProperties:
    """Query parameters as Kusto literals' text; values never enter the query text."""
    properties = ClientRequestProperties()
    for name, value in parameters.items():
        properties.set_parameter(name, _literal(value))
    return properties


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"unsupported query parameter type {type(value).__name__}")


def rows_of(response: Any) -> list[dict[str, Any]]:
    """The primary result as dicts keyed by column name."""
    table = response.primary_results[0]
    names = [column.column_name for column in table.columns]
    return [dict(zip(names, row, strict=True)) for row in table.raw_rows]


class KustoQueries:
    """Sync query edge: run a ``Query`` and hand back rows."""

    def __init__(self, cluster: str, database: str, credential: Any | None = None) -> None:
        self.database = database
        self._client = KustoClient(connection_string(cluster, credential))

    def run(self, query: Query) -> list[dict[str, Any]]:
        response = self._client.execute_query(
            self.database, query.text, request_properties(query.parameters)
        )
        return rows_of(response)

    def command(self, text: str) -> list[dict[str, Any]]:
        return rows_of(self._client.execute_mgmt(self.database, text))

    def close(self) -> None:
        self._client.close()


class AsyncKustoQueries:
    """Async query edge, same contract as ``KustoQueries``."""

    def __init__(self, cluster: str, database: str, credential: Any | None = None) -> None:
        self.database = database
        self._client = AsyncKustoClient(connection_string(cluster, credential, is_async=True))

    async def run(self, query: Query) -> list[dict[str, Any]]:
        response = await self._client.execute_query(
            self.database, query.text, request_properties(query.parameters)
        )
        return rows_of(response)

    async def command(self, text: str) -> list[dict[str, Any]]:
        return rows_of(await self._client.execute_mgmt(self.database, text))

    async def close(self) -> None:
        await self._client.close()
