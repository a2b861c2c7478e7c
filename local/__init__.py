"""Local stand-ins for Azure: a Kusto-compatible server on DuckDB, whose data-management
endpoint takes queued ingestion through azurite (the Azure Storage emulator, npm).

The names are loaded on first use, so importing this package does not import DuckDB
(an optional dependency: ``pip install 'langgraph-checkpoint-kusto[local]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kusto_server import (
        Azurite,
        LocalKustoServer,
        serve_local_kusto,
        start_azurite,
        start_local_kusto,
    )

__all__ = [
    "Azurite",
    "LocalKustoServer",
    "serve_local_kusto",
    "start_azurite",
    "start_local_kusto",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import kusto_server

        return getattr(kusto_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
