"""Connections to Kusto: the same connection rules for the saver, the worker and the CLI.

A loopback ``http://`` cluster is the local stand-in and gets no authentication; any
other cluster authenticates with azure-identity (``DefaultAzureCredential`` unless a
credential is given), the way Azure SDK clients do.

Every query is bounded in time (``query_timeout``): Kusto stops working on it then
(``servertimeout``), and the client stops waiting for the answer then too, also when
Kusto accepts the connection and never answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

from azure.kusto.data import ClientRequestProperties, KustoClient, KustoConnectionStringBuilder
from azure.kusto.data.aio import KustoClient as AsyncKustoClient
from azure.kusto.data.exceptions import (
    KustoApiError,
    KustoNetworkError,
    KustoServiceError,
    KustoThrottlingError,
)

from .queries import Query

DEFAULT_QUERY_TIMEOUT = 60.0
"""Seconds a query may take; the SDK's default is 4.5 minutes."""
MIN_QUERY_TIMEOUT = 1.0
"""The SDK gives the HTTP client a timeout in whole seconds (it truncates): below one
second the sync client fails at once and the async one never times out."""
MAX_QUERY_TIMEOUT = 3600.0
"""The SDK's own longest request timeout (a management command's)."""


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


def cluster_port(cluster: str) -> int | None:
    """The port ``cluster`` names, if any, else ``ValueError`` naming the URL: urllib checks
    the port only when asked for it, and a bad one would otherwise surface as a network
    error (the local server "not running") on every request."""
    try:
        port = urlparse(cluster).port
    except ValueError as exc:  # out of range, or not a number
        raise ValueError(f"cluster {cluster!r} has an unusable port: {exc}") from None
    if port == 0:  # "any free port" to a server, no port at all to a client
        raise ValueError(f"cluster {cluster!r} has an unusable port: 0")
    return port


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
    cluster_port(cluster)
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


def checked_query_timeout(query_timeout: float) -> float:
    """``query_timeout`` as seconds, or ``ValueError`` saying what it may be."""
    if (
        not isinstance(query_timeout, int | float)
        or isinstance(query_timeout, bool)
        or not MIN_QUERY_TIMEOUT <= query_timeout <= MAX_QUERY_TIMEOUT
    ):
        raise ValueError(
            f"query_timeout must be a number of seconds from {MIN_QUERY_TIMEOUT:g} to "
            f"{MAX_QUERY_TIMEOUT:g}, got {query_timeout!r}"
        )
    return float(query_timeout)


def http_status(error: KustoServiceError) -> int | None:
    """The HTTP status of Kusto's answer (the sync SDK's response has ``status_code``, the
    async one's ``status``), or ``None`` without a response."""
    response = error.get_raw_http_response()
    status = getattr(response, "status_code", None) or getattr(response, "status", None)
    return int(status) if status is not None else None


def is_transient(error: Exception) -> bool:
    """Whether a query failed because Kusto did not answer (unreachable, hung, throttling,
    a server error), so asking again later may work; not a query Kusto refused."""
    if isinstance(error, KustoNetworkError | KustoThrottlingError | TimeoutError | ConnectionError):
        return True
    if isinstance(error, KustoServiceError):
        status = http_status(error)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        api = error.get_api_error() if isinstance(error, KustoApiError) else None
        return api is not None and api.permanent is False
    return False


def request_properties(parameters: Mapping[str, Any], timeout: float) -> ClientRequestProperties:
    """Query parameters as Kusto literals' text (values never enter the query text), and
    the query's ``servertimeout``: the SDK derives the client's HTTP timeout from it."""
    properties = ClientRequestProperties()
    properties.set_option(
        ClientRequestProperties.request_timeout_option_name, timedelta(seconds=timeout)
    )
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


class _BoundedKustoClient(KustoClient):
    # The SDK waits for the answer 30 s longer than the query's servertimeout, so that it
    # hears Kusto's own timeout error. A hung Kusto then held a 1 s poll for 31 s.
    _client_server_delta = timedelta(0)


class _BoundedAsyncKustoClient(AsyncKustoClient):
    _client_server_delta = timedelta(0)  # as in _BoundedKustoClient


def _query_seconds(within: float | None, query_timeout: float) -> float:
    """A query's timeout: ``query_timeout``, or less (``within``), never below what the SDK
    can time (``MIN_QUERY_TIMEOUT``)."""
    return query_timeout if within is None else max(min(within, query_timeout), MIN_QUERY_TIMEOUT)


class KustoQueries:
    """Sync query edge: run a ``Query`` or a management command and hand back rows, each
    request bounded by ``query_timeout`` seconds (``KustoNetworkError`` once they pass)."""

    def __init__(
        self,
        cluster: str,
        database: str,
        credential: Any | None = None,
        *,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self.database = database
        self.query_timeout = checked_query_timeout(query_timeout)
        self._client = _BoundedKustoClient(connection_string(cluster, credential))

    def run(self, query: Query, within: float | None = None) -> list[dict[str, Any]]:
        """Rows of ``query``; ``within`` seconds bounds it more tightly than
        ``query_timeout`` (a wait's time left), down to ``MIN_QUERY_TIMEOUT``."""
        timeout = _query_seconds(within, self.query_timeout)
        response = self._client.execute_query(
            self.database, query.text, request_properties(query.parameters, timeout)
        )
        return rows_of(response)

    def command(self, text: str) -> list[dict[str, Any]]:
        """Rows of the management command ``text``, bounded by ``query_timeout`` seconds."""
        return rows_of(
            self._client.execute_mgmt(
                self.database, text, request_properties({}, self.query_timeout)
            )
        )

    def close(self) -> None:
        self._client.close()


class AsyncKustoQueries:
    """Async query edge, same contract as ``KustoQueries``."""

    def __init__(
        self,
        cluster: str,
        database: str,
        credential: Any | None = None,
        *,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self.database = database
        self.query_timeout = checked_query_timeout(query_timeout)
        self._client = _BoundedAsyncKustoClient(
            connection_string(cluster, credential, is_async=True)
        )

    async def run(self, query: Query) -> list[dict[str, Any]]:
        """Rows of ``query``; an await is bounded more tightly with ``asyncio.timeout``."""
        response = await self._client.execute_query(
            self.database, query.text, request_properties(query.parameters, self.query_timeout)
        )
        return rows_of(response)

    async def command(self, text: str) -> list[dict[str, Any]]:
        """Rows of the management command ``text``, bounded by ``query_timeout`` seconds."""
        return rows_of(
            await self._client.execute_mgmt(
                self.database, text, request_properties({}, self.query_timeout)
            )
        )

    async def close(self) -> None:
        await self._client.close()
