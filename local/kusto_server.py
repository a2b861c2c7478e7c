"""A local Kusto endpoint on DuckDB, close enough to Azure Data Explorer for the SDKs.

`duckdb-kql` already speaks Kusto's REST protocol (``/v1/rest/mgmt``, ``/v1/rest/query``,
``/v2/rest/query``) over one DuckDB connection. This module is the thin layer that makes
the *real* ``azure-kusto-data`` and ``azure-kusto-ingest`` clients, unmodified, usable
against it for this project:

* query parameters: the SDK sends ``properties`` as a JSON *string* and every parameter
  value as the text of a Kusto literal; both are decoded here, so
  ``ClientRequestProperties.set_parameter`` reaches ``declare query_parameters``;
* the management commands ``provision.kql`` and an operator use (tables, functions,
  materialized views as always-fresh views, policies, ingestion mappings, ``.show table
  T cslschema`` / ``extents``), with definitions persisted in the DuckDB file so a
  restarted server still has them;
* the streaming-ingest route the ingest SDK posts to, committing each request in one
  DuckDB transaction, because Kusto commits one ingestion operation atomically and the
  saver's "no torn reads" invariant is built on that; every ingestion is recorded as an
  extent with its tags, so ``ingestIfNotExists`` / ``ingest-by:`` work as in Kusto;
* queued ingestion, given Azure Storage (azurite, started by :func:`start_azurite`): the
  data-management commands ``QueuedIngestClient`` sends, and a background service that
  ingests the blobs it queues, one transaction per blob;
* Kusto's documented handling of invalid data (``ingest-invalid-data``): malformed
  ``multijson`` fails the whole request, oversized strings are cut at 1 MB, oversized
  dynamics and mistyped values become null. Emulating the limits is deliberate: a
  local run then fails the same way Azure would, instead of hiding a chunking bug;
* a built-in ``strcmp``, since Kusto has no ``<`` on strings.

It listens on loopback only (duckdb-kql's rule, kept) and serves one database, held in
``<data_dir>/<database>.duckdb`` or in memory. The server is the only process that opens
the DuckDB file; any number of client processes go through HTTP.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import datetime as dt
import functools
import gzip
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

import duckdb
import duckdb_kql
from duckdb_kql.control import is_control_command, strip_leading_comments
from duckdb_kql.engine import connect
from duckdb_kql.engine import schema as engine_schema
from duckdb_kql.errors import KqlError
from duckdb_kql.kusto.client import _Deadline, _seconds
from duckdb_kql.params import as_datetime, bind, coerce, parse_timespan
from duckdb_kql.server import (
    KustoRestServer,
    RestColumn,
    Result,
    _Handler,  # the request handler has no public name; we extend it, never copy it
    error_response,
)
from duckdb_kql.stored_functions import ResolvedFunctions, StoredFunction, parse_functions
from duckdb_kql.translate import CLOCK_SLOT, TYPE_MAP, quote_ident
from duckdb_kql.translate.functions import SCALAR_FUNCTIONS, FunctionSpec
from duckdb_kql.types import kusto_type

__all__ = [
    "DEFAULT_DATABASE",
    "MAX_STREAMING_REQUEST_BYTES",
    "Azurite",
    "LocalKustoServer",
    "StorageAccount",
    "serve_local_kusto",
    "start_azurite",
    "start_local_kusto",
]

DEFAULT_DATABASE = "langgraph"

#: Azure's cap on one streaming-ingestion request. Measured on the body as sent (gzip),
#: the same number ``ManagedStreamingIngestClient`` checks before it falls back to queued.
MAX_STREAMING_REQUEST_BYTES = 4 * 1024 * 1024

#: Kusto's per-value limits: strings are cut, dynamics become null (ingest-invalid-data).
#: The encoding policy raises them per column: BigObject 2 MB, BigObject32 32 MB.
_DEFAULT_VALUE_LIMIT = 1024 * 1024
_ENCODING_LIMITS = {"bigobject": 2 * 1024 * 1024, "bigobject32": 32 * 1024 * 1024}

#: Where our own bookkeeping lives in the DuckDB file. A separate schema keeps it out of
#: ``.show tables``; the ``__kusto_`` prefix keeps it from colliding in duckdb-kql's
#: table-name map, which ignores schemas.
_META = "_kusto_local"

_LOOPBACK_HOST = "127.0.0.1"


# ---------------------------------------------------------------------------
# strcmp: registered with the translator once per process
# ---------------------------------------------------------------------------

#: Kusto strings are never null (a missing one is ""), hence the coalesce. DuckDB
#: compares VARCHAR byte-wise, i.e. by code point: Kusto's ordinal order, except that
#: Kusto orders UTF-16 code units (differs only between U+E000-U+FFFF and astral
#: characters).
_STRCMP = FunctionSpec(
    "strcmp",
    "template",
    "CAST(CASE WHEN coalesce({0}, '') < coalesce({1}, '') THEN -1 "
    "WHEN coalesce({0}, '') > coalesce({1}, '') THEN 1 ELSE 0 END AS INTEGER)",
    (2,),
    note="Kusto built-in, added by langgraph-checkpoint-kusto's local server",
)


def register_strcmp() -> None:
    """Teach duckdb-kql's translator Kusto's ``strcmp``.

    A built-in rather than a stored function because duckdb-kql only accepts tabular
    stored functions, and because in Kusto it *is* a built-in: a user function named
    ``strcmp`` must stay refused. Process-wide, and harmless to anyone else using
    duckdb-kql in the process: it only adds what Kusto has.
    """
    SCALAR_FUNCTIONS.setdefault("strcmp", _STRCMP)


# ---------------------------------------------------------------------------
# Query parameters: Kusto literals' text -> typed values
# ---------------------------------------------------------------------------

_WRAPPED = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)
_WRAPPERS: dict[str, frozenset[str]] = {
    "bool": frozenset({"bool", "boolean"}),
    "int": frozenset({"int", "int32"}),
    "long": frozenset({"long", "int64"}),
    "real": frozenset({"real", "double"}),
    "decimal": frozenset({"decimal"}),
    "datetime": frozenset({"datetime", "date"}),
    "timespan": frozenset({"timespan", "time"}),
    "guid": frozenset({"guid", "uuid", "uniqueid"}),
    "dynamic": frozenset({"dynamic"}),
}


@functools.lru_cache(maxsize=512)
def _declared_parameters(csl: str) -> tuple[tuple[str, str], ...]:
    """``(name, type)`` of the query's ``declare query_parameters``; cached per text
    because the saver sends a handful of constant query texts over and over."""
    return tuple((d.name, d.type) for d in duckdb_kql.query_parameters(csl))


def _parameter_value(raw: Any, kind: str, name: str) -> Any:
    """One request parameter as the typed value duckdb-kql binds.

    Kusto receives every value as a string and parses it "as a literal of the declared
    type": ``long(5)`` or ``5``, ``datetime(2024-01-01)`` or the bare date,
    ``dynamic([1,2])`` or bare JSON. A string parameter is taken verbatim. A non-string
    JSON value (``true``, ``5``) is read through its JSON text, which is what the
    service's string-typed property bag does with it.
    """
    if kind == "string":
        if isinstance(raw, str):
            return raw
        return json.dumps(raw) if isinstance(raw, bool) or raw is None else str(raw)
    text = raw if isinstance(raw, str) else json.dumps(raw)
    body = text.strip()
    wrapped = _WRAPPED.match(body)
    if wrapped and wrapped.group(1).lower() in _WRAPPERS.get(kind, frozenset()):
        body = wrapped.group(2).strip()
    if body.lower() == "null":
        return None
    try:
        if kind == "bool":
            lowered = body.lower()
            if lowered not in ("true", "false"):
                raise ValueError(body)
            return lowered == "true"
        if kind in ("int", "long"):
            return int(body)
        if kind == "real":
            return float(body)
        if kind == "decimal":
            return Decimal(body)
        if kind == "dynamic":
            return json.dumps(json.loads(body))
        # datetime, timespan, guid: duckdb-kql already parses their text forms.
        return coerce(body, kind, name)
    except (ValueError, ArithmeticError, KqlError) as exc:
        raise ValueError(
            f"query parameter {name!r}: {text!r} is not a {kind} literal; send the text "
            f"of a Kusto {kind} literal, e.g. as ClientRequestProperties.set_parameter does"
        ) from exc


def bind_request_parameters(csl: str, supplied: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request's parameters, typed by the query's declarations.

    Parameters the query does not declare are dropped, as Kusto drops them; duckdb-kql
    would refuse them, and a caller that sends one shared parameter set to several
    queries would then fail only locally.
    """
    if not supplied:
        return {}
    declared = dict(_declared_parameters(csl))
    return {
        name: _parameter_value(value, declared[name], name)
        for name, value in supplied.items()
        if name in declared
    }


# ---------------------------------------------------------------------------
# Small parsers for management-command text
# ---------------------------------------------------------------------------

_NAME = r"(?:\[\s*'(?:[^'\\]|\\.)*'\s*\]|\[\s*\"(?:[^\"\\]|\\.)*\"\s*\]|[A-Za-z_][A-Za-z0-9_]*)"
_NAME_RE = re.compile(_NAME)


class CommandError(KqlError):
    """A management command we understand but must refuse; reaches the client as
    Kusto's error envelope (HTTP 400)."""


def _unbracket(name: str) -> str:
    """``['My Table']`` -> ``My Table``; a plain identifier is returned unchanged."""
    name = name.strip()
    if name.startswith("["):
        inner = name[1:-1].strip()
        return re.sub(r"\\(.)", r"\1", inner[1:-1])
    return name


def _parenthesized(text: str, start: int) -> tuple[str, int]:
    """The text inside the parenthesis opening at *start*, and the index after it."""
    depth = 0
    quote = ""
    i = start
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 2
                continue
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    raise CommandError(f"unbalanced parenthesis in {text.strip()[:200]!r}")


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split on *separator* outside quotes, brackets and parentheses."""
    parts: list[str] = []
    depth = 0
    quote = ""
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            current.append(char)
            if char == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 2
                continue
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char in "([{":
            depth += 1
            current.append(char)
        elif char in ")]}":
            depth -= 1
            current.append(char)
        elif char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_STRING_LITERAL = re.compile(
    r"\s*(?:```(?P<fence>.*?)```"
    r"|@'(?P<vs>(?:[^']|'')*)'"
    r'|@"(?P<vd>(?:[^"]|"")*)"'
    r"|'(?P<s>(?:[^'\\]|\\.)*)'"
    r'|"(?P<d>(?:[^"\\]|\\.)*)")',
    re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _read_string_literal(text: str, pos: int) -> tuple[str, int]:
    """A Kusto string literal at *pos* (``'..'``, ``"..."``, ``@'...'``, a fence)."""
    found = _STRING_LITERAL.match(text, pos)
    if found is None:
        raise CommandError(f"expected a string literal at {text[pos : pos + 60]!r}")
    if found.group("fence") is not None:
        return found.group("fence"), found.end()
    if found.group("vs") is not None:
        return found.group("vs").replace("''", "'"), found.end()
    if found.group("vd") is not None:
        return found.group("vd").replace('""', '"'), found.end()
    body = found.group("s") if found.group("s") is not None else found.group("d")
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body), found.end()


def _with_properties(text: str) -> dict[str, str]:
    """``docstring='x', folder = "y"`` -> ``{"docstring": "x", "folder": "y"}``."""
    out: dict[str, str] = {}
    for item in _split_top_level(text):
        key, _, value = item.partition("=")
        value = value.strip()
        if value[:1] and value[0] in "'\"@`":
            value, _ = _read_string_literal(value, 0)
        out[key.strip().lower()] = value
    return out


def _column_list(text: str) -> list[tuple[str, str]]:
    """``a:string, ['b c']: dynamic`` -> ``[("a", "string"), ("b c", "dynamic")]``,
    types normalised to Kusto's canonical spelling."""
    columns: list[tuple[str, str]] = []
    for item in _split_top_level(text):
        name, colon, kind = item.rpartition(":")
        if not colon or not name.strip():
            raise CommandError(f"expected `Name:type` in the column list, got {item!r}")
        columns.append((_unbracket(name), _canonical_type(kind)))
    if not columns:
        raise CommandError("a table needs at least one column")
    seen: set[str] = set()
    for name, _ in columns:
        if name in seen:
            raise CommandError(f"column {name!r} is listed twice")
        seen.add(name)
    return columns


def _canonical_type(kind: str) -> str:
    duck = TYPE_MAP.get(kind.strip().lower())
    if duck is None:
        raise CommandError(f"{kind.strip()!r} is not a Kusto scalar type")
    return kusto_type(duck)


def _duck_type(kind: str) -> str:
    return TYPE_MAP[kind]


def _strip_trailing_comments(text: str) -> str:
    lines = text.rstrip().splitlines()
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("//")):
        lines.pop()
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Result shapes
# ---------------------------------------------------------------------------


def _result(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> Result:
    return Result([RestColumn.derived(n, k) for n, k in columns], [tuple(r) for r in rows])


_TABLE_COLUMNS = (
    ("TableName", "string"),
    ("Schema", "string"),
    ("DatabaseName", "string"),
    ("Folder", "string"),
    ("DocString", "string"),
)
_FUNCTION_COLUMNS = (
    ("Name", "string"),
    ("Parameters", "string"),
    ("Body", "string"),
    ("Folder", "string"),
    ("DocString", "string"),
)
_POLICY_COLUMNS = (
    ("PolicyName", "string"),
    ("EntityName", "string"),
    ("Policy", "string"),
    ("ChildEntities", "string"),
    ("EntityType", "string"),
)
_MAPPING_COLUMNS = (
    ("Name", "string"),
    ("Kind", "string"),
    ("Mapping", "string"),
    ("LastUpdatedOn", "datetime"),
    ("Database", "string"),
    ("Table", "string"),
)


def _csl_name(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"['{name}']"


def _csl_schema(columns: Sequence[tuple[str, str]]) -> str:
    return ",".join(f"{_csl_name(n)}:{k}" for n, k in columns)


_NET_TYPES = {
    "bool": "System.SByte",
    "int": "System.Int32",
    "long": "System.Int64",
    "real": "System.Double",
    "decimal": "System.Data.SqlTypes.SqlDecimal",
    "string": "System.String",
    "datetime": "System.DateTime",
    "timespan": "System.TimeSpan",
    "guid": "System.Guid",
    "dynamic": "System.Object",
}


def _json_schema(table: str, columns: Sequence[tuple[str, str]]) -> str:
    return json.dumps(
        {
            "Name": table,
            "OrderedColumns": [
                {"Name": n, "Type": _NET_TYPES.get(k, "System.String"), "CslType": k}
                for n, k in columns
            ],
        }
    )


# ---------------------------------------------------------------------------
# Ingestion: formats, mappings, value conversion
# ---------------------------------------------------------------------------


class IngestError(Exception):
    """A streaming-ingest request Kusto would refuse, with Kusto's error code."""

    def __init__(self, message: str, code: str = "BadRequest_InvalidBlob", status: int = 400):
        super().__init__(message)
        self.code = code
        self.status = status


#: DuckDB's errors about the engine rather than the request: I/O (disk full, a locked
#: file), memory, transaction conflicts, internal errors, a database invalidated by an
#: earlier fatal error (DB-API's OperationalError and InternalError: "not necessarily
#: under the control of the programmer"). Azure Data Explorer answers a failure of its
#: own as transient (5xx, ``"@permanent": false``) and clients retry it; answered as a
#: bad request, it makes the ingestor dead-letter good events. Every other DuckDB error
#: (conversion, binder, catalog, parser) is about what the request asked, and stays a
#: permanent 400.
_TRANSIENT_ENGINE_ERRORS: tuple[type[duckdb.Error], ...] = (
    duckdb.OperationalError,
    duckdb.InternalError,
    duckdb.FatalException,
)


class _TransientEngineFailure(BaseException):
    """One of :data:`_TRANSIENT_ENGINE_ERRORS`, on its way out of ``run`` to the handler.

    A BaseException because duckdb-kql's request handler answers every ``Exception``
    from ``run`` with a permanent 400; this one has to pass that catch-all to reach
    ``_LocalHandler.do_POST``, which answers it the way Kusto answers its own failures.
    """


def _transient_error_response(message: str) -> dict[str, Any]:
    """Kusto's error envelope for a failure of the service, which the client may retry."""
    response = error_response(message, code="General_InternalServerError")
    response["error"].update(
        {
            "message": "An internal error occurred; the request may succeed if retried.",
            "@type": "Kusto.DataNode.Exceptions.InternalServerError",
            "@permanent": False,
        }
    )
    return response


class Extent(NamedTuple):
    """What one ingestion operation stored: Kusto's unit of atomic visibility."""

    extent_id: uuid.UUID
    table: str
    row_count: int
    tags: tuple[str, ...]
    created: dt.datetime


def _string_list(text: str | None, name: str) -> list[str]:
    """A JSON array of strings, the way Kusto takes ``tags`` and ``ingestIfNotExists``."""
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IngestError(f"{name} must be a JSON array of strings, got {text[:200]!r}")
    return value


_JSON_FORMATS = frozenset({"json", "multijson", "singlejson"})
_CSV_DELIMITERS = {"csv": ",", "tsv": "\t", "scsv": ";", "psv": "|", "sohsv": "\x01"}
_MISSING = object()


def _parse_json_records(text: str, fmt: str) -> list[Any]:
    """The records of a JSON body.

    ``multijson``/``singlejson``: objects concatenated or in arrays, any layout; a
    malformed record fails the whole request (Kusto: BadRequest_InvalidBlob).
    ``json``: one object per line; Kusto *silently skips* malformed lines there, and so
    do we, so a test cannot pass locally on a format that loses data in Azure.
    """
    if fmt == "json":
        records = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
        return records
    decoder = json.JSONDecoder()
    records = []
    pos = 0
    length = len(text)
    while True:
        while pos < length and text[pos] in " \t\r\n,\ufeff":
            pos += 1
        if pos >= length:
            return records
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError as exc:
            raise IngestError(f"malformed JSON in {fmt} data: {exc}") from None
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, dict):
                raise IngestError(
                    f"{fmt} data must hold JSON objects, one per record; "
                    f"got {json.dumps(item)[:80]}"
                )
            records.append(item)


def _parse_csv_records(text: str, fmt: str) -> list[list[str]]:
    rows = [row for row in csv.reader(io.StringIO(text), delimiter=_CSV_DELIMITERS[fmt]) if row]
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        raise IngestError(
            f"{fmt} records have inconsistent numbers of fields: {sorted(widths)}",
            code="Stream_WrongNumberOfFields",
        )
    return rows


_JSON_PATH_STEP = re.compile(
    r"\.([A-Za-z_$][\w$-]*)"
    r"|\[\s*'((?:[^'\\]|\\.)*)'\s*\]"
    r'|\[\s*"((?:[^"\\]|\\.)*)"\s*\]'
    r"|\[\s*(\d+)\s*\]"
)


def _json_path(path: str) -> Callable[[Any], Any]:
    """A getter for the JSONPath subset ingestion mappings use: ``$``, ``$.a.b``,
    ``$['a']``, ``$.a[0]``. Missing -> ``_MISSING`` (Kusto fills null)."""
    if not path.startswith("$"):
        raise CommandError(f"mapping path {path!r} must start with '$'")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        step = _JSON_PATH_STEP.match(path, pos)
        if step is None:
            raise CommandError(f"mapping path {path!r} is not supported locally")
        name = step.group(1) or step.group(2) or step.group(3)
        steps.append(int(step.group(4)) if step.group(4) is not None else name or "")
        pos = step.end()

    def get(record: Any) -> Any:
        value = record
        for key in steps:
            if isinstance(key, int):
                if not isinstance(value, list) or key >= len(value):
                    return _MISSING
                value = value[key]
            else:
                if not isinstance(value, dict) or key not in value:
                    return _MISSING
                value = value[key]
        return value

    return get


class _Mapping(NamedTuple):
    """A compiled ingestion mapping: column -> getter over one record."""

    getters: dict[str, Callable[[Any], Any]]


def _compile_mapping(kind: str, text: str, columns: Sequence[str] | None = None) -> _Mapping:
    """Compile (and so validate) a JSON or CSV ingestion mapping."""
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"the ingestion mapping is not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise CommandError("an ingestion mapping is a JSON array of column entries")
    getters: dict[str, Callable[[Any], Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise CommandError(f"mapping entry {entry!r} is not an object")
        lowered = {k.lower(): v for k, v in entry.items()}
        column = lowered.get("column")
        if not isinstance(column, str) or not column:
            raise CommandError(f"mapping entry {entry!r} names no column")
        props = {k.lower(): v for k, v in (lowered.get("properties") or {}).items()}
        props = {**{k: v for k, v in lowered.items() if k != "properties"}, **props}
        if props.get("transform"):
            raise CommandError(
                f"mapping transform {props['transform']!r} is not supported by the local server"
            )
        if "constvalue" in props:
            getters[column] = functools.partial(_constant, value=props["constvalue"])
        elif kind == "json":
            path = props.get("path")
            if not isinstance(path, str):
                raise CommandError(f"json mapping entry for {column!r} has no Path")
            getters[column] = _json_path(path)
        elif kind == "csv":
            try:
                ordinal = int(props.get("ordinal"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise CommandError(f"csv mapping entry for {column!r} has no Ordinal") from None
            getters[column] = functools.partial(_ordinal, ordinal=ordinal)
        else:
            raise CommandError(f"{kind} ingestion mappings are not supported by the local server")
    if columns is not None:
        unknown = sorted(set(getters) - set(columns))
        if unknown:
            raise CommandError(f"the mapping names columns the table lacks: {unknown}")
    return _Mapping(getters)


def _truncate_utf8(text: str, limit: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")


def _convert(value: Any, kind: str, limit: int, *, from_text: bool) -> Any:
    """One source value as the column's DuckDB value, the way Kusto ingests it.

    Per Kusto's "ingestion of invalid data" rules: a value that does not fit the type
    becomes null (a float into a long, "abc" into a datetime), a string over the limit is
    cut, a dynamic over the limit becomes null. Kusto strings have no null, so a missing
    string is "".
    """
    if value is _MISSING or value is None:
        return "" if kind == "string" else None
    if from_text and value == "" and kind != "string":
        return None
    try:
        converted = _CONVERTERS[kind](value, from_text)
    except (ValueError, TypeError, ArithmeticError, KqlError):
        return "" if kind == "string" else None
    if kind == "string":
        return _truncate_utf8(converted, limit)
    if kind == "dynamic" and converted is not None and len(converted.encode("utf-8")) > limit:
        return None
    return converted


def _to_string(value: Any, from_text: bool) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _to_integer(bits: int) -> Callable[[Any, bool], int]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def convert(value: Any, from_text: bool) -> int:
        if isinstance(value, (bool, float)):
            raise TypeError("not an integer")
        number = int(value.strip()) if isinstance(value, str) else value
        if not isinstance(number, int) or not low <= number <= high:
            raise ValueError("out of range")
        return number

    return convert


def _to_real(value: Any, from_text: bool) -> float:
    if isinstance(value, bool):
        raise TypeError("bool is not a real")
    if isinstance(value, str):
        return float(value.strip())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError("not a real")


def _to_bool(value: Any, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError("not a bool")


_EXTRA_FRACTION = re.compile(r"(\.\d{6})\d+")


def _to_datetime(value: Any, from_text: bool) -> dt.datetime:
    if not isinstance(value, str):
        raise TypeError("not a datetime")
    # Kusto writes 7 fractional digits (ticks); Python reads at most 6.
    return as_datetime(_EXTRA_FRACTION.sub(r"\1", value.strip()), "value")


def _to_timespan(value: Any, from_text: bool) -> dt.timedelta:
    if not isinstance(value, str):
        raise TypeError("not a timespan")
    parsed = parse_timespan(value.strip())
    if parsed is None:
        raise ValueError("not a timespan")
    return parsed


def _to_guid(value: Any, from_text: bool) -> uuid.UUID:
    if not isinstance(value, str):
        raise TypeError("not a guid")
    return uuid.UUID(value.strip())


def _to_decimal(value: Any, from_text: bool) -> Decimal:
    if isinstance(value, bool):
        raise TypeError("bool is not a decimal")
    try:
        return Decimal(value.strip() if isinstance(value, str) else str(value))
    except InvalidOperation as exc:
        raise ValueError("not a decimal") from exc


def _to_dynamic(value: Any, from_text: bool) -> str:
    if from_text and isinstance(value, str):
        # A CSV field that is not JSON is a dynamic string, as in Kusto.
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not JSON")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_CONVERTERS: dict[str, Callable[[Any, bool], Any]] = {
    "string": _to_string,
    "int": _to_integer(32),
    "long": _to_integer(64),
    "real": _to_real,
    "bool": _to_bool,
    "datetime": _to_datetime,
    "timespan": _to_timespan,
    "guid": _to_guid,
    "decimal": _to_decimal,
    "dynamic": _to_dynamic,
}


def _decode_body(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "").strip().lower()
    try:
        if encoding == "gzip" or (not encoding and body[:2] == b"\x1f\x8b"):
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, EOFError, zlib.error) as exc:
        raise IngestError(f"the request body is not valid {encoding or 'gzip'}: {exc}") from None
    if encoding not in ("", "identity", "gzip", "deflate"):
        raise IngestError(f"unsupported Content-Encoding {encoding!r}")
    return body


# ---------------------------------------------------------------------------
# Management command patterns
# ---------------------------------------------------------------------------

_F = re.IGNORECASE | re.DOTALL
_CREATE_TABLE = re.compile(rf"^\.(create|create-merge|alter-merge)\s+table\s+({_NAME})\s*\(", _F)
_CREATE_TABLES = re.compile(r"^\.(create|create-merge)\s+tables\s+", _F)
_MAPPING_CMD = re.compile(
    rf"^\.(create|create-or-alter|alter)\s+table\s+({_NAME})\s+ingestion\s+(\w+)\s+mapping\s+", _F
)
_DROP_MAPPING = re.compile(rf"^\.drop\s+table\s+({_NAME})\s+ingestion\s+(\w+)\s+mapping\s+", _F)
_SHOW_MAPPINGS = re.compile(rf"^\.show\s+table\s+({_NAME})\s+ingestion\s+(\w+)\s+mappings?\s*$", _F)
_DROP_TABLE = re.compile(rf"^\.drop\s+table\s+({_NAME})(\s+ifexists)?\s*$", _F)
_DROP_TABLES = re.compile(r"^\.drop\s+tables\s*\((.*)\)(\s+ifexists)?\s*$", _F)
_FUNCTION_CMD = re.compile(r"^\.(create-or-alter|create|alter)\s+function\b", _F)
_DROP_FUNCTION = re.compile(rf"^\.drop\s+function\s+({_NAME})(\s+ifexists)?\s*$", _F)
_POLICY_CMD = re.compile(
    r"^\.(alter|alter-merge|delete)\s+(table|tables|database|column|materialized-view|cluster)"
    r"\s+(.*?)\s*policy\s+([A-Za-z_][\w-]*)\s*(.*)$",
    _F,
)
_SHOW_POLICY = re.compile(
    r"^\.show\s+(table|database|column|materialized-view|cluster)\s*(.*?)\s+policy\s+"
    r"([A-Za-z_][\w-]*)\s*$",
    _F,
)
_SHOW_TABLES = re.compile(r"^\.show\s+tables\s*$", _F)
_SHOW_TABLE_SCHEMA = re.compile(
    rf"^\.show\s+table\s+({_NAME})\s+(cslschema|schema\s+as\s+json|schema\s+as\s+csl)\s*$", _F
)
_INGEST_INLINE = re.compile(rf"^\.ingest\s+inline\s+into\s+table\s+({_NAME})\s*", _F)
_EXECUTE_SCRIPT = re.compile(r"^\.execute\s+database\s+script\s*", _F)
_CLEAR_TABLE = re.compile(rf"^\.clear\s+table\s+({_NAME})\s+data\s*$", _F)
_MATERIALIZED_VIEW = re.compile(
    r"^\.(create|create-or-alter)\s+(?:async\s+)?materialized-view\s+", _F
)
_SHOW_MATERIALIZED_VIEWS = re.compile(r"^\.show\s+materialized-views\s*$", _F)
_SHOW_EXTENTS = re.compile(rf"^\.show\s+table\s+({_NAME})\s+extents\s*$", _F)
_GET_INGESTION_RESOURCES = re.compile(r"^\.get\s+ingestion\s+resources\s*$", _F)
_GET_IDENTITY_TOKEN = re.compile(r"^\.get\s+kusto\s+identity\s+token\s*$", _F)
_SHOW_INGESTION_FAILURES = re.compile(r"^\.show\s+ingestion\s+failures\s*$", _F)
_DROP_MATERIALIZED_VIEW = re.compile(
    rf"^\.drop\s+materialized-view\s+({_NAME})(\s+ifexists)?\s*$", _F
)
_COMMAND_START = re.compile(r"^\s*\.[A-Za-z]")


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class _LocalHandler(_Handler):
    """duckdb-kql's handler plus the streaming-ingest route and request normalisation."""

    server: LocalKustoRestServer  # type: ignore[assignment]
    # Headers and body leave in separate writes; with Nagle on, the client's delayed ACK
    # holds the body back ~40 ms on every request.
    disable_nagle_algorithm = True

    def log_message(self, fmt: str, *args: Any) -> None:
        # stderr, never stdout: `serve_local_kusto` promises a stdout of one URL line.
        if not self.server.quiet:
            print(f"{self.address_string()} {fmt % args}", file=sys.stderr, flush=True)

    def do_POST(self) -> None:  # BaseHTTPRequestHandler's interface
        if not self._is_local():
            self._send(403, error_response("local connections only"))
            return
        route, _, query = self.path.partition("?")
        ingest = re.fullmatch(r"/v1/rest/ingest/([^/]+)/([^/]+)/?", route)
        if ingest is not None:
            self._ingest(unquote(ingest.group(1)), unquote(ingest.group(2)), query)
            return
        body = self._read_body()
        if body is None:
            return
        rewritten = self._normalise(body)
        if rewritten is None:
            return
        # duckdb-kql's do_POST reads the body from rfile; hand it the rewritten one and
        # put the socket back afterwards, or keep-alive would read the next request
        # from an exhausted buffer.
        socket_file = self.rfile
        self.rfile = io.BytesIO(rewritten)  # type: ignore[assignment]
        del self.headers["Content-Length"]
        self.headers["Content-Length"] = str(len(rewritten))
        try:
            super().do_POST()
        except _TransientEngineFailure as exc:  # raised before any part of an answer was sent
            self._send(500, _transient_error_response(str(exc)))
        finally:
            self.rfile = socket_file

    # -- body plumbing ------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The raw body, Content-Length or chunked (requests streams some bodies)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size_line = self.rfile.readline(65537)
                try:
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                except ValueError:
                    self.close_connection = True  # the rest of the body is still unread
                    self._send(400, error_response("malformed chunked body"))
                    return None
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > 4 * MAX_STREAMING_REQUEST_BYTES:
                    self.close_connection = True
                    self._send(413, error_response("request body too large"))
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            del self.headers["Transfer-Encoding"]
            return b"".join(chunks)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self._send(400, error_response("malformed Content-Length"))
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _normalise(self, body: bytes) -> bytes | None:
        """The request with ``properties`` as an object and parameters typed later.

        Returns None when an answer has already been sent.
        """
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return body  # duckdb-kql reports a malformed body in Kusto's words
        if not isinstance(request, dict):
            return body
        database = request.get("db")
        if database == _NO_DATABASE:
            # What the ingest SDK names for data-management commands, which are not about
            # any database; one served here stands in, for duckdb-kql's checks.
            request["db"] = database = self.server.database
        if isinstance(database, str) and database and not self.server.serves(database):
            self._send(
                400,
                error_response(
                    f"Entity ID '{database}' of kind 'Database' was not found: this local "
                    f"server serves the database {self.server.database!r}",
                    code="BadRequest_EntityNotFound",
                ),
            )
            return None
        properties = request.get("properties")
        if isinstance(properties, str):
            try:
                properties = json.loads(properties) if properties.strip() else {}
            except ValueError:
                self._send(400, error_response("'properties' is not valid JSON"))
                return None
        if isinstance(properties, dict):
            options = properties.get("Options")
            if isinstance(options, dict):
                properties["Options"] = {
                    k: v for k, v in options.items() if k.lower() not in _NO_OP_OPTIONS
                }
            request["properties"] = properties
        return json.dumps(request).encode("utf-8")

    # -- streaming ingestion -------------------------------------------------

    def _ingest(self, database: str, table: str, query: str) -> None:
        args = {k.lower(): v[-1] for k, v in parse_qs(query).items()}
        body = self._read_body()
        if body is None:
            return
        try:
            if args.get("sourcekind", "").lower() == "uri":
                raise IngestError(
                    "streaming ingestion from a blob URI is not supported by the local server",
                    code="BadRequest_NotSupported",
                )
            if database != self.server.database:
                raise IngestError(
                    f"Entity ID '{database}' of kind 'Database' was not found: this local "
                    f"server serves the database {self.server.database!r}",
                    code="BadRequest_EntityNotFound",
                )
            if len(body) > self.server.max_streaming_bytes:
                raise IngestError(
                    f"streaming ingestion request of {len(body)} bytes exceeds the "
                    f"{self.server.max_streaming_bytes}-byte limit; use queued ingestion",
                    code="BadRequest_StreamingIngestionRequestTooLarge",
                    status=413,
                )
            data = _decode_body(body, self.headers.get("Content-Encoding"))
            extent = self.server.ingest(
                table,
                args.get("streamformat", "csv"),
                data,
                mapping_name=args.get("mappingname"),
            )
        except IngestError as exc:
            self._send(exc.status, error_response(str(exc), code=exc.code))
            return
        except _TRANSIENT_ENGINE_ERRORS as exc:
            self._send(500, _transient_error_response(str(exc)))
            return
        except Exception as exc:  # the engine refused what was asked: a Kusto bad request
            self._send(400, error_response(str(exc), code="BadRequest_InvalidBlob"))
            return
        # Streaming ingestion takes no ingestIfNotExists, so an extent always results.
        self._send(200, _streaming_ingest_response(extent.row_count if extent else 0))


def _streaming_ingest_response(count: int) -> dict[str, Any]:
    """What the service answers a streaming ingest: a v1 table the SDK parses as success."""
    return {
        "Tables": [
            {
                "TableName": "Table_0",
                "Columns": [
                    {"ColumnName": "ConsumedRecordsCount", "DataType": "Int64"},
                    {"ColumnName": "UpdatePolicyStatus", "DataType": "String"},
                    {"ColumnName": "UpdatePolicyFailureCode", "DataType": "String"},
                    {"ColumnName": "UpdatePolicyFailureReason", "DataType": "String"},
                ],
                "Rows": [[count, "Disabled", "Disabled", ""]],
            }
        ]
    }


#: Kusto's name for "no database in particular", sent with data-management commands.
_NO_DATABASE = "NetDefaultDB"

#: Request options duckdb-kql refuses that are true no-ops here: nothing truncates
#: results (so ``notruncation`` asks for what happens), and one local database is
#: strongly consistent, which satisfies any ``queryconsistency`` a caller may ask for.
_NO_OP_OPTIONS = frozenset({"notruncation", "queryconsistency"})


class LocalKustoRestServer(KustoRestServer):
    """duckdb-kql's REST server with our management commands and streaming ingest.

    Everything that touches the DuckDB connection holds ``self._lock`` (duckdb-kql's
    own), because the connection is shared by every request thread.
    """

    def __init__(
        self,
        con: Any,
        *,
        port: int,
        source: str,
        quiet: bool,
        max_streaming_bytes: int = MAX_STREAMING_REQUEST_BYTES,
    ) -> None:
        register_strcmp()
        _ensure_meta_schema(con)
        functions: ResolvedFunctions = {None: _load_functions(con)}
        super().__init__(
            con,
            port=port,
            host=_LOOPBACK_HOST,
            source=source,
            quiet=quiet,
            allow_write=True,
            functions=functions,
        )
        self.RequestHandlerClass = _LocalHandler
        self.max_streaming_bytes = max_streaming_bytes
        #: The data-management side, while queued ingestion is on (it needs storage).
        self.data_management: DataManagement | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._translations: dict[tuple[str, str | None, str], Any] = {}

    # -- connection tracking, so close() can end keep-alive handler threads --------

    def get_request(self) -> tuple[Any, Any]:
        request, address = super().get_request()
        with self._connections_lock:
            self._connections.add(request)
        return request, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def hang_up(self) -> None:
        """End every open client connection.

        A handler thread of a keep-alive connection otherwise lives until the client
        goes away, which may be interpreter exit; a thread that drops the last reference
        to the DuckDB connection then runs DuckDB's destructor during finalization, and
        the process aborts ("FATAL: exception not rethrown").
        """
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-response is routine (test teardown, Ctrl-C); only
        real failures deserve a traceback."""
        if self.quiet and isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    # -- entry point for every csl -------------------------------------------

    def run(
        self,
        csl: str,
        parameters: dict[str, Any] | None = None,
        database: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Result:
        """Our management commands here; everything else through duckdb-kql.

        A failure of the engine itself leaves as :class:`_TransientEngineFailure`, so
        the client is told to retry rather than that its request is invalid.
        """
        try:
            return self._run(csl, parameters, database, options)
        except _TRANSIENT_ENGINE_ERRORS as exc:
            raise _TransientEngineFailure(str(exc)) from exc

    def _run(
        self,
        csl: str,
        parameters: dict[str, Any] | None,
        database: str | None,
        options: dict[str, Any] | None,
    ) -> Result:
        text = strip_leading_comments(csl).strip()
        if is_control_command(text):
            # A command may change what a cached translation means (tables, functions).
            # Cleared again afterwards: a query translated while the command ran (between
            # its locked steps) may have stored a translation of the old schema.
            self._translations.clear()
            try:
                handled = self.management(text, options or {})
                if handled is not None:
                    return handled
                return super().run(csl, parameters, database, options)
            finally:
                self._translations.clear()
        return self._query(csl, bind_request_parameters(csl, parameters), database, options)

    def _query(
        self,
        csl: str,
        parameters: dict[str, Any],
        database: str | None,
        options: dict[str, Any] | None,
    ) -> Result:
        """A query, translated once per distinct text.

        duckdb-kql parses KQL with a pure-Python ANTLR parser: ~75 ms for the saver's
        queries, which dominated every read. The translated SQL depends on the text, the
        database and the schema, never on parameter values (they are bound by DuckDB), so
        it is cached until the next management command.
        """
        options = options or {}
        target = database if database and database != "default" else None
        timeout = (
            None
            if str(options.get("norequesttimeout", "")).lower() == "true"
            else _seconds(options.get("servertimeout"))
        )
        with self._lock, _Deadline(self._con, timeout):
            self._con.execute("SET TimeZone='UTC'")
            key = (csl, target, repr(options.get("query_now")))
            translated = self._translations.get(key)
            if translated is None:
                translated = duckdb_kql.to_sql(
                    csl,
                    schema=engine_schema(self._con),
                    database=target,
                    allow_write=self.allow_write,
                    query_now=options.get("query_now"),
                    functions=self.functions,
                )
                self._translations[key] = translated
            bound, unbound = bind(list(translated.declarations), parameters)
            if unbound:
                raise KqlError(
                    f"declared query parameters with no value and no default: {', '.join(unbound)}"
                )
            bound = {slot: value for slot, value in bound.items() if slot in translated.slots}
            if CLOCK_SLOT in translated.parameters:
                # A pinned clock (the query_now option, or `set query_now` in the text)
                # is a parameter of the translation, not of the request.
                bound[CLOCK_SLOT] = translated.parameters[CLOCK_SLOT]
            # `execute`, not `sql()`: a relation parses and binds the statement once to
            # describe itself and again to run, which doubled DuckDB's planning work.
            cursor = (
                self._con.execute(str(translated), bound)
                if bound
                else self._con.execute(str(translated))
            )
            description = cursor.description or []
            names = [column[0] for column in description]
            kinds = [kusto_type(column[1]) for column in description]
            rows = cursor.fetchall()
        return Result(
            [RestColumn.derived(name, kind) for name, kind in zip(names, kinds, strict=True)],
            rows,
        )

    def management(self, text: str, options: Mapping[str, Any]) -> Result | None:
        """Run one management command we implement, or None to leave it to duckdb-kql."""
        text = _strip_trailing_comments(text).rstrip(";").strip()
        for pattern, handler, writes in self._COMMANDS:
            found = pattern.match(text)
            if found is None:
                continue
            if writes and _read_only(options):
                raise CommandError(
                    "Cannot invoke a control command that writes as this request is "
                    "read-only (request_readonly is set)"
                )
            return handler(self, text, found)
        return None

    # -- tables --------------------------------------------------------------

    def _columns(self, table: str) -> list[tuple[str, str]] | None:
        """The table's ``(column, kusto type)`` in order, or None if it does not exist."""
        rows = self._con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_schema = 'main' "
            "AND table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        if not rows:
            return None
        return [(str(name), kusto_type(kind)) for name, kind in rows]

    def _is_table(self, table: str) -> bool:
        row = self._con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_catalog = "
            "current_database() AND table_schema = 'main' AND table_name = ? "
            "AND table_type = 'BASE TABLE'",
            [table],
        ).fetchone()
        return bool(row and row[0])

    def _create_table(
        self, verb: str, table: str, columns: list[tuple[str, str]], props: dict[str, str]
    ) -> list[tuple[str, str]]:
        """``.create`` / ``.create-merge`` / ``.alter-merge`` one table; returns its schema.

        Idempotent the way Kusto's are: re-creating an identical table succeeds,
        create-merge adds the missing columns, and a column whose type differs is an
        error rather than a silent re-type.
        """
        existing = self._columns(table)
        if existing is None:
            if verb == "alter-merge":
                raise CommandError(f"Table '{table}' was not found; .alter-merge needs it to exist")
            ddl = ", ".join(f"{quote_ident(n)} {_duck_type(k)}" for n, k in columns)
            self._con.execute(f"CREATE TABLE {quote_ident(table)} ({ddl})")
        else:
            have = dict(existing)
            for name, kind in columns:
                if name in have and have[name] != kind:
                    raise CommandError(
                        f"column {table}.{name} is {have[name]}, the command says {kind}; "
                        "Kusto does not change a column's type by create/merge"
                    )
            missing = [(n, k) for n, k in columns if n not in have]
            if verb == "create" and (missing or len(columns) != len(existing)):
                raise CommandError(
                    f"Table '{table}' already exists with a different schema "
                    f"({_csl_schema(existing)}); use .create-merge to add columns"
                )
            for name, kind in missing:
                self._con.execute(
                    f"ALTER TABLE {quote_ident(table)} ADD COLUMN {quote_ident(name)} "
                    f"{_duck_type(kind)}"
                )
        if props.get("folder") is not None or props.get("docstring") is not None:
            self._con.execute(
                f"INSERT OR REPLACE INTO {_META}.__kusto_tables VALUES (?, ?, ?)",
                [table, props.get("folder", ""), props.get("docstring", "")],
            )
        return self._columns(table) or []

    def _table_meta(self, table: str) -> tuple[str, str]:
        row = self._con.execute(
            f"SELECT Folder, DocString FROM {_META}.__kusto_tables WHERE Name = ?", [table]
        ).fetchone()
        return (str(row[0] or ""), str(row[1] or "")) if row else ("", "")

    def _table_row(self, table: str, columns: list[tuple[str, str]], json_schema: bool) -> list:
        folder, doc = self._table_meta(table)
        schema = _json_schema(table, columns) if json_schema else _csl_schema(columns)
        return [table, schema, self.database, folder, doc]

    def _cmd_create_table(self, text: str, found: re.Match[str]) -> Result:
        verb, table = found.group(1).lower(), _unbracket(found.group(2))
        inside, end = _parenthesized(text, found.end() - 1)
        props = self._trailing_with(text[end:])
        columns = _column_list(inside)
        with self._lock:
            schema = self._create_table(verb, table, columns, props)
            return _result(_TABLE_COLUMNS, [self._table_row(table, schema, True)])

    def _cmd_create_tables(self, text: str, found: re.Match[str]) -> Result:
        verb = found.group(1).lower()
        rest = text[found.end() :]
        specs: list[tuple[str, list[tuple[str, str]]]] = []
        while True:
            rest = rest.lstrip()
            name = _NAME_RE.match(rest)
            if name is None:
                raise CommandError(f"expected a table name at {rest[:60]!r}")
            rest = rest[name.end() :].lstrip()
            if not rest.startswith("("):
                raise CommandError(f"expected a column list after {name.group(0)!r}")
            inside, end = _parenthesized(rest, 0)
            specs.append((_unbracket(name.group(0)), _column_list(inside)))
            rest = rest[end:].lstrip()
            if not rest.startswith(","):
                break
            rest = rest[1:]
        props = self._trailing_with(rest)
        with self._lock:
            self._con.begin()
            try:
                rows = [
                    self._table_row(t, self._create_table(verb, t, cols, props), True)
                    for t, cols in specs
                ]
                self._con.commit()
            except Exception:
                self._con.rollback()
                raise
        return _result(_TABLE_COLUMNS, rows)

    @staticmethod
    def _trailing_with(rest: str) -> dict[str, str]:
        rest = rest.strip()
        if not rest:
            return {}
        opening = re.match(r"with\s*\(", rest, re.IGNORECASE)
        if opening is None:
            raise CommandError(f"unexpected text after the command: {rest[:80]!r}")
        inside, end = _parenthesized(rest, opening.end() - 1)
        if rest[end:].strip():
            raise CommandError(f"unexpected text after the command: {rest[end:][:80]!r}")
        return _with_properties(inside)

    def _cmd_drop_table(self, text: str, found: re.Match[str]) -> Result:
        return self._drop_tables([_unbracket(found.group(1))], bool(found.group(2)))

    def _cmd_drop_tables(self, text: str, found: re.Match[str]) -> Result:
        names = [_unbracket(n) for n in _split_top_level(found.group(1))]
        return self._drop_tables(names, bool(found.group(2)))

    def _drop_tables(self, names: list[str], if_exists: bool) -> Result:
        with self._lock:
            missing = [n for n in names if not self._is_table(n)]
            if missing and not if_exists:
                raise CommandError(f"Table '{missing[0]}' was not found (add ifexists)")
            for name in names:
                if name in missing:
                    continue
                self._con.execute(f"DROP TABLE {quote_ident(name)}")
                for meta in ("__kusto_tables", "__kusto_mappings", "__kusto_extents"):
                    column = "Name" if meta == "__kusto_tables" else "TableName"
                    self._con.execute(f"DELETE FROM {_META}.{meta} WHERE {column} = ?", [name])
            rows = [[t, self.database] for t in self._table_names()]
        return _result((("TableName", "string"), ("DatabaseName", "string")), rows)

    def _table_names(self) -> list[str]:
        rows = self._con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = "
            "current_database() AND table_schema = 'main' AND table_type = 'BASE TABLE' "
            "ORDER BY table_name"
        ).fetchall()
        return [str(r[0]) for r in rows]

    def _cmd_show_tables(self, text: str, found: re.Match[str]) -> Result:
        with self._lock:
            rows = [[t, self.database, *self._table_meta(t)] for t in self._table_names()]
        return _result(
            (
                ("TableName", "string"),
                ("DatabaseName", "string"),
                ("Folder", "string"),
                ("DocString", "string"),
            ),
            rows,
        )

    def _cmd_show_table_schema(self, text: str, found: re.Match[str]) -> Result:
        table = _unbracket(found.group(1))
        as_json = "json" in found.group(2).lower()
        with self._lock:
            columns = self._columns(table)
            if columns is None:
                raise CommandError(f"Table '{table}' was not found")
            row = self._table_row(table, columns, as_json)
        return _result(_TABLE_COLUMNS, [row])

    def _cmd_clear_table(self, text: str, found: re.Match[str]) -> Result:
        table = _unbracket(found.group(1))
        with self._lock:
            if not self._is_table(table):
                raise CommandError(f"Table '{table}' was not found")
            self._con.execute(f"DELETE FROM {quote_ident(table)}")
            # The data's extents go with it, and so do their ingest-by tags.
            self._con.execute(f"DELETE FROM {_META}.__kusto_extents WHERE TableName = ?", [table])
        return _result((("Status", "string"),), [["Success"]])

    # -- functions -----------------------------------------------------------

    def _cmd_function(self, text: str, found: re.Match[str]) -> Result:
        """``.create`` / ``.alter`` / ``.create-or-alter function``: parse with duckdb-kql,
        persist the command text, and swap the registry the translator reads."""
        verb = found.group(1).lower()
        try:
            parsed = parse_functions([text])
        except (ValueError, TypeError) as exc:
            raise CommandError(str(exc)) from None
        assert parsed is not None
        function = next(iter(parsed[None].values()))
        if_not_exists = bool(re.match(r"^\.create\s+function\s+ifnotexists\b", text, re.I))
        with self._lock:
            current = dict((self.functions or {}).get(None, {}))
            exists = function.name in current
            if verb == "create" and exists:
                if if_not_exists:
                    return _result(_FUNCTION_COLUMNS, [_function_row(current[function.name])])
                raise CommandError(
                    f"function '{function.name}' already exists; use .create-or-alter"
                )
            if verb == "alter" and not exists:
                raise CommandError(f"function '{function.name}' was not found")
            self._con.execute(
                f"INSERT OR REPLACE INTO {_META}.__kusto_functions VALUES (?, ?, ?)",
                [function.name, text, _utcnow()],
            )
            current[function.name] = function
            self.functions = {None: current}
        return _result(_FUNCTION_COLUMNS, [_function_row(function)])

    def _cmd_drop_function(self, text: str, found: re.Match[str]) -> Result:
        name = _unbracket(found.group(1))
        with self._lock:
            current = dict((self.functions or {}).get(None, {}))
            if name not in current:
                if found.group(2):
                    return _result((("Name", "string"),), [])
                raise CommandError(f"function '{name}' was not found (add ifexists)")
            self._con.execute(f"DELETE FROM {_META}.__kusto_functions WHERE Name = ?", [name])
            del current[name]
            self.functions = {None: current}
        return _result((("Name", "string"),), [[name]])

    # -- materialized views, emulated as always-fresh views -------------------

    def _cmd_materialized_view(self, text: str, found: re.Match[str]) -> Result:
        """A materialized view as a plain DuckDB view over the translated query.

        Kusto materializes in the background and may lag; a view is always fresh. The
        results agree once Kusto catches up, which is what a local stand-in can promise.
        The definition is recorded for ``.show materialized-views``.
        """
        verb = found.group(1).lower()
        rest = text[found.end() :].lstrip()
        if_not_exists = bool(re.match(r"ifnotexists\s", rest, re.I))
        rest = re.sub(r"^ifnotexists\s+", "", rest, flags=re.I)
        props: dict[str, str] = {}
        if rest.lower().startswith("with"):
            opening = re.match(r"with\s*\(", rest, re.I)
            if opening is None:
                raise CommandError("cannot read the materialized-view properties")
            inside, end = _parenthesized(rest, opening.end() - 1)
            props = _with_properties(inside)
            rest = rest[end:].lstrip()
        head = re.match(rf"({_NAME})\s+on\s+table\s+({_NAME})\s*\{{", rest, re.I)
        if head is None:
            raise CommandError("expected `Name on table Source { query }`")
        body = rest[head.end() : rest.rfind("}")].strip()
        name, source = _unbracket(head.group(1)), _unbracket(head.group(2))
        with self._lock:
            exists = self._con.execute(
                f"SELECT count(*) FROM {_META}.__kusto_materialized_views WHERE Name = ?", [name]
            ).fetchone()
            if verb == "create" and exists and exists[0]:
                if not if_not_exists:
                    raise CommandError(
                        f"materialized view '{name}' already exists; use .create-or-alter"
                    )
            else:
                sql = duckdb_kql.to_sql(body, schema=engine_schema(self._con))
                if getattr(sql, "parameters", None):
                    raise CommandError("a materialized-view query cannot use parameters here")
                self._con.execute(f"CREATE OR REPLACE VIEW {quote_ident(name)} AS {sql}")
                self._con.execute(
                    f"INSERT OR REPLACE INTO {_META}.__kusto_materialized_views "
                    "VALUES (?, ?, ?, ?, ?)",
                    [name, source, body, props.get("folder", ""), props.get("docstring", "")],
                )
            return self._materialized_views(name)

    def _materialized_views(self, name: str | None = None) -> Result:
        rows = self._con.execute(
            f"SELECT Name, SourceTable, Query, Folder, DocString FROM "
            f"{_META}.__kusto_materialized_views WHERE ? IS NULL OR Name = ? ORDER BY Name",
            [name, name],
        ).fetchall()
        return _result(
            (
                ("Name", "string"),
                ("SourceTable", "string"),
                ("Query", "string"),
                ("Folder", "string"),
                ("DocString", "string"),
            ),
            rows,
        )

    def _cmd_show_materialized_views(self, text: str, found: re.Match[str]) -> Result:
        with self._lock:
            return self._materialized_views()

    def _cmd_drop_materialized_view(self, text: str, found: re.Match[str]) -> Result:
        name = _unbracket(found.group(1))
        with self._lock:
            clause = "IF EXISTS " if found.group(2) else ""
            self._con.execute(f"DROP VIEW {clause}{quote_ident(name)}")
            self._con.execute(
                f"DELETE FROM {_META}.__kusto_materialized_views WHERE Name = ?", [name]
            )
        return _result((("Name", "string"),), [[name]])

    # -- policies: accepted, recorded, not enforced ----------------------------

    def _cmd_policy(self, text: str, found: re.Match[str]) -> Result:
        """Record ``.alter[-merge]``/``.delete`` ``... policy`` as a no-op.

        Kusto enforces these (retention, caching, batching, streaming, update policies);
        here they only need to be accepted so provisioning scripts run unchanged, and
        remembered so ``.show ... policy`` answers with what was set. The one policy we
        honour is the column encoding policy, which raises the value-size limit.
        """
        verb, entity_type = found.group(1).lower(), found.group(2).lower()
        entity, policy = found.group(3).strip(), found.group(4).lower()
        value = found.group(5).strip()
        if value[:1] and value[0] in "'\"@`":
            value, _ = _read_string_literal(value, 0)
        with self._lock:
            if verb == "delete":
                self._con.execute(
                    f"DELETE FROM {_META}.__kusto_policies WHERE EntityType = ? AND "
                    "EntityName = ? AND PolicyName = ?",
                    [entity_type, entity, policy],
                )
            else:
                self._con.execute(
                    f"INSERT OR REPLACE INTO {_META}.__kusto_policies VALUES (?, ?, ?, ?, ?, ?)",
                    [entity_type, entity, policy, value, text, _utcnow()],
                )
        return _result(_POLICY_COLUMNS, [[policy, entity, value, "", entity_type]])

    def _cmd_show_policy(self, text: str, found: re.Match[str]) -> Result:
        entity_type, entity = found.group(1).lower(), found.group(2).strip()
        policy = found.group(3).lower()
        with self._lock:
            row = self._con.execute(
                f"SELECT Policy FROM {_META}.__kusto_policies WHERE EntityType = ? AND "
                "EntityName = ? AND PolicyName = ?",
                [entity_type, entity, policy],
            ).fetchone()
        return _result(
            _POLICY_COLUMNS, [[policy, entity, row[0] if row else "null", "", entity_type]]
        )

    def _value_limits(self, table: str, columns: Sequence[tuple[str, str]]) -> dict[str, int]:
        rows = self._con.execute(
            f"SELECT EntityName, Policy FROM {_META}.__kusto_policies WHERE "
            "EntityType = 'column' AND PolicyName = 'encoding'"
        ).fetchall()
        encoded: dict[str, int] = {}
        for entity, policy in rows:
            kind = re.search(r"type\s*=\s*['\"]?(\w+)", str(policy), re.I)
            limit = _ENCODING_LIMITS.get(kind.group(1).lower()) if kind else None
            tab, _, col = str(entity).rpartition(".")
            if limit and _unbracket(tab.rpartition(".")[2] or tab) == table:
                encoded[_unbracket(col)] = limit
        return {name: encoded.get(name, _DEFAULT_VALUE_LIMIT) for name, _ in columns}

    # -- ingestion mappings --------------------------------------------------

    def _cmd_mapping(self, text: str, found: re.Match[str]) -> Result:
        verb, table, kind = found.group(1).lower(), _unbracket(found.group(2)), found.group(3)
        kind = kind.lower()
        name, pos = _read_string_literal(text, found.end())
        mapping, pos = _read_string_literal(text, pos)
        with self._lock:
            columns = self._columns(table)
            if columns is None:
                raise CommandError(f"Table '{table}' was not found")
            _compile_mapping(kind, mapping, [c for c, _ in columns])
            exists = self._mapping_text(table, kind, name) is not None
            if verb == "create" and exists:
                raise CommandError(f"{kind} mapping '{name}' already exists on '{table}'")
            if verb == "alter" and not exists:
                raise CommandError(f"{kind} mapping '{name}' was not found on '{table}'")
            self._con.execute(
                f"INSERT OR REPLACE INTO {_META}.__kusto_mappings VALUES (?, ?, ?, ?, ?)",
                [table, kind, name, mapping, _utcnow()],
            )
        return _result(_MAPPING_COLUMNS, [[name, kind, mapping, _utcnow(), self.database, table]])

    def _cmd_drop_mapping(self, text: str, found: re.Match[str]) -> Result:
        table, kind = _unbracket(found.group(1)), found.group(2).lower()
        name, _ = _read_string_literal(text, found.end())
        with self._lock:
            self._con.execute(
                f"DELETE FROM {_META}.__kusto_mappings WHERE TableName = ? AND Kind = ? "
                "AND Name = ?",
                [table, kind, name],
            )
        return _result((("Name", "string"),), [[name]])

    def _cmd_show_mappings(self, text: str, found: re.Match[str]) -> Result:
        table, kind = _unbracket(found.group(1)), found.group(2).lower()
        with self._lock:
            rows = self._con.execute(
                f"SELECT Name, Kind, Mapping, UpdatedOn FROM {_META}.__kusto_mappings "
                "WHERE TableName = ? AND Kind = ? ORDER BY Name",
                [table, kind],
            ).fetchall()
        return _result(_MAPPING_COLUMNS, [[*r, self.database, table] for r in rows])

    def _mapping_text(self, table: str, kind: str, name: str) -> str | None:
        row = self._con.execute(
            f"SELECT Mapping FROM {_META}.__kusto_mappings WHERE TableName = ? AND Kind = ? "
            "AND Name = ?",
            [table, kind, name],
        ).fetchone()
        return str(row[0]) if row else None

    # -- ingestion -----------------------------------------------------------

    def ingest(
        self,
        table: str,
        fmt: str,
        data: bytes,
        *,
        mapping_name: str | None = None,
        tags: Sequence[str] = (),
        if_not_exists: Sequence[str] = (),
        ignore_first_record: bool = False,
    ) -> Extent | None:
        """Insert every record of *data* into *table* in one transaction, as one extent.

        All or nothing, because a Kusto ingestion operation commits atomically and the
        saver relies on an event's rows never becoming visible piecemeal. With
        *if_not_exists* (Kusto's ``ingestIfNotExists``), nothing is ingested and None is
        returned when the table already has an extent tagged ``ingest-by:<value>`` for one
        of the values; the check and the insert share the transaction, so two deliveries
        of one blob cannot both get in.
        """
        fmt = fmt.lower()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise IngestError(f"the data is not UTF-8: {exc}") from None
        if fmt in _JSON_FORMATS:
            records: Sequence[Any] = _parse_json_records(text, fmt)
            kind = "json"
        elif fmt in _CSV_DELIMITERS:
            records = _parse_csv_records(text, fmt)[1 if ignore_first_record else 0 :]
            kind = "csv"
        else:
            raise IngestError(
                f"stream format {fmt!r} is not supported by the local server "
                f"(supported: {', '.join(sorted(_JSON_FORMATS | set(_CSV_DELIMITERS)))})",
                code="BadRequest_NotSupported",
            )
        if not records:
            raise IngestError(
                "no records in the request, or the data does not match the format",
                code="BadRequest_NoRecordsOrWrongFormat",
            )
        with self._lock:
            columns = self._columns(table)
            if columns is None or not self._is_table(table):
                raise IngestError(
                    f"Entity ID '{table}' of kind 'Table' was not found",
                    code="BadRequest_EntityNotFound",
                )
            names = [n for n, _ in columns]
            if mapping_name:
                mapping_text = self._mapping_text(table, kind, mapping_name)
                if mapping_text is None:
                    raise IngestError(
                        f"{kind} mapping '{mapping_name}' was not found on table '{table}'",
                        code="BadRequest_MappingReferenceWasNotFound",
                    )
                getters = _compile_mapping(kind, mapping_text).getters
            elif kind == "json":
                getters = {n: functools.partial(_field, name=n) for n in names}
            else:
                width = len(records[0]) if records else 0
                if width > len(names):
                    raise IngestError(
                        f"csv records have {width} fields; table '{table}' has "
                        f"{len(names)} columns",
                        code="Stream_WrongNumberOfFields",
                    )
                getters = {n: functools.partial(_ordinal, ordinal=i) for i, n in enumerate(names)}
            limits = self._value_limits(table, columns)
            from_text = kind == "csv"
            rows = [
                [
                    _convert(
                        getters[n](record) if n in getters else _MISSING,
                        k,
                        limits[n],
                        from_text=from_text,
                    )
                    for n, k in columns
                ]
                for record in records
            ]
            extent = Extent(uuid.uuid4(), table, len(rows), tuple(tags), _utcnow())
            self._con.begin()
            try:
                if self._tagged(table, if_not_exists):
                    self._con.rollback()
                    return None
                _insert_rows(self._con, table, names, rows)
                self._con.execute(
                    f"INSERT INTO {_META}.__kusto_extents VALUES (?, ?, ?, ?, ?)",
                    [
                        str(extent.extent_id),
                        table,
                        extent.row_count,
                        json.dumps(tags),
                        extent.created,
                    ],
                )
                self._con.commit()
            except Exception as exc:
                self._con.rollback()
                if isinstance(exc, _TRANSIENT_ENGINE_ERRORS):
                    raise  # not the data's fault: the caller says "retry", not "invalid"
                raise IngestError(f"ingestion into '{table}' failed: {exc}") from None
        return extent

    def _tagged(self, table: str, values: Sequence[str]) -> bool:
        """Whether an extent of *table* carries ``ingest-by:<value>`` for one of *values*."""
        if not values:
            return False
        wanted = [f"ingest-by:{value}" for value in values]
        row = self._con.execute(
            f"SELECT count(*) FROM {_META}.__kusto_extents WHERE TableName = ? AND "
            "list_has_any(CAST(json(Tags) AS VARCHAR[]), ?::VARCHAR[])",
            [table, wanted],
        ).fetchone()
        return bool(row and row[0])

    def _cmd_show_extents(self, text: str, found: re.Match[str]) -> Result:
        """``.show table T extents``: one row per ingestion, with its tags."""
        table = _unbracket(found.group(1))
        with self._lock:
            if not self._is_table(table):
                raise CommandError(f"Table '{table}' was not found")
            rows = self._con.execute(
                f"SELECT ExtentId, TableName, RowCount, CreatedOn, Tags FROM "
                f"{_META}.__kusto_extents WHERE TableName = ? ORDER BY CreatedOn, ExtentId",
                [table],
            ).fetchall()
        return _result(
            (
                ("ExtentId", "guid"),
                ("DatabaseName", "string"),
                ("TableName", "string"),
                ("RowCount", "long"),
                ("MinCreatedOn", "datetime"),
                ("MaxCreatedOn", "datetime"),
                ("Tags", "string"),
            ),
            [
                # Kusto lists an extent's tags in one string, one per line.
                [uuid.UUID(str(e)), self.database, t, n, c, c, "\r\n".join(json.loads(tags))]
                for e, t, n, c, tags in rows
            ],
        )

    def _cmd_ingest_inline(self, text: str, found: re.Match[str]) -> Result:
        """``.ingest inline into table T [with (format=..., ingestionMappingReference=...,
        tags=..., ingestIfNotExists=...)] <| data``: the same path as the other ingestions,
        for operators and tests. A skipped ingestion (ingestIfNotExists) returns no row."""
        table = _unbracket(found.group(1))
        rest = text[found.end() :]
        props: dict[str, str] = {}
        if rest.lower().startswith("with"):
            opening = re.match(r"with\s*\(", rest, re.I)
            if opening is None:
                raise CommandError("cannot read the ingestion properties")
            inside, end = _parenthesized(rest, opening.end() - 1)
            props = _with_properties(inside)
            rest = rest[end:].lstrip()
        if not rest.startswith("<|"):
            raise CommandError("expected `<|` before the inline data")
        data = rest[2:].lstrip(" \t").removeprefix("\n")
        props = {k.lower(): v for k, v in props.items()}
        started = time.monotonic()
        try:
            extent = self.ingest(
                table,
                props.get("format", "csv"),
                data.encode("utf-8"),
                mapping_name=props.get("ingestionmappingreference"),
                tags=_string_list(props.get("tags"), "tags"),
                if_not_exists=_string_list(props.get("ingestifnotexists"), "ingestIfNotExists"),
                ignore_first_record=props.get("ignorefirstrecord", "").lower() == "true",
            )
        except IngestError as exc:
            raise CommandError(f"{exc.code}: {exc}") from None
        elapsed = dt.timedelta(seconds=time.monotonic() - started)
        rows = (
            []
            if extent is None
            else [
                [extent.extent_id, "inproc:inline", elapsed, False, uuid.uuid4(), extent.row_count]
            ]
        )
        return _result(
            (
                ("ExtentId", "guid"),
                ("ItemLoaded", "string"),
                ("Duration", "timespan"),
                ("HasErrors", "bool"),
                ("OperationId", "guid"),
                ("RowCount", "long"),
            ),
            rows,
        )

    # -- the data-management endpoint (queued ingestion) ------------------------

    def _data_management(self) -> DataManagement:
        if self.data_management is None:
            raise CommandError(
                "queued ingestion is off on this local server: it needs Azure Storage. Start "
                "azurite (scripts/setup.d/30-azurite.sh installs it) and give the server its "
                "connection string (LocalKustoServer(storage=...), or "
                "enable_queued_ingestion()); streaming ingestion works without it"
            )
        return self.data_management

    def _cmd_get_ingestion_resources(self, text: str, found: re.Match[str]) -> Result:
        return self._data_management().ingestion_resources()

    def _cmd_get_identity_token(self, text: str, found: re.Match[str]) -> Result:
        return _result(
            (("AuthorizationContext", "string"),), [[self._data_management().identity_token]]
        )

    def _cmd_show_ingestion_failures(self, text: str, found: re.Match[str]) -> Result:
        with self._lock:
            rows = self._con.execute(
                f"SELECT OperationId, DatabaseName, TableName, FailedOn, IngestionSourcePath, "
                f"IngestionSourceId, Details, ErrorCode FROM {_META}.__kusto_ingestion_failures "
                "ORDER BY FailedOn"
            ).fetchall()
        return _result(
            (
                ("OperationId", "guid"),
                ("Database", "string"),
                ("Table", "string"),
                ("FailedOn", "datetime"),
                ("IngestionSourcePath", "string"),
                ("IngestionSourceId", "guid"),
                ("Details", "string"),
                ("ErrorCode", "string"),
                ("FailureKind", "string"),
            ),
            [
                [uuid.UUID(r[0]), *r[1:5], _guid_or_none(r[5]), r[6], r[7], "Permanent"]
                for r in rows
            ],
        )

    def record_ingestion_failure(self, failure: IngestionFailure) -> None:
        with self._lock:
            self._con.execute(
                f"INSERT INTO {_META}.__kusto_ingestion_failures VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    str(failure.operation_id),
                    failure.database,
                    failure.table,
                    failure.failed_on,
                    failure.source_path,
                    failure.source_id,
                    failure.details,
                    failure.code,
                ],
            )

    # -- scripts -------------------------------------------------------------

    def _cmd_execute_script(self, text: str, found: re.Match[str]) -> Result:
        """``.execute database script <| ...``: each command in turn, as Kusto reports it.

        Commands start on a line beginning with ``.``. With ContinueOnErrors false (the
        default) the first failure skips the rest; ThrowOnErrors turns it into an error.
        """
        rest = text[found.end() :]
        props: dict[str, str] = {}
        if rest.lower().startswith("with"):
            opening = re.match(r"with\s*\(", rest, re.I)
            if opening is None:
                raise CommandError("cannot read the script properties")
            inside, end = _parenthesized(rest, opening.end() - 1)
            props = _with_properties(inside)
            rest = rest[end:].lstrip()
        if not rest.startswith("<|"):
            raise CommandError("expected `<|` before the script")
        commands = _split_script(rest[2:])
        keep_going = props.get("continueonerrors", "false").lower() == "true"
        throw = props.get("throwonerrors", "false").lower() == "true"
        rows = []
        failed = False
        for command in commands:
            kind = " ".join(command.split()[:2])
            if failed and not keep_going:
                rows.append([uuid.uuid4(), kind, command, "Skipped", ""])
                continue
            try:
                self.run(command)
                rows.append([uuid.uuid4(), kind, command, "Completed", ""])
            except (Exception, _TransientEngineFailure) as exc:  # the engine's: "Failed" too
                if throw:
                    raise CommandError(f"script command failed: {command[:120]!r}: {exc}") from None
                failed = True
                rows.append([uuid.uuid4(), kind, command, "Failed", str(exc)])
        return _result(
            (
                ("OperationId", "guid"),
                ("CommandType", "string"),
                ("CommandText", "string"),
                ("Result", "string"),
                ("Reason", "string"),
            ),
            rows,
        )

    _COMMANDS: tuple[tuple[re.Pattern[str], Callable[..., Result], bool], ...] = (
        (_SHOW_TABLES, _cmd_show_tables, False),
        (_SHOW_TABLE_SCHEMA, _cmd_show_table_schema, False),
        (_SHOW_MAPPINGS, _cmd_show_mappings, False),
        (_SHOW_POLICY, _cmd_show_policy, False),
        (_SHOW_MATERIALIZED_VIEWS, _cmd_show_materialized_views, False),
        (_SHOW_EXTENTS, _cmd_show_extents, False),
        (_GET_INGESTION_RESOURCES, _cmd_get_ingestion_resources, False),
        (_GET_IDENTITY_TOKEN, _cmd_get_identity_token, False),
        (_SHOW_INGESTION_FAILURES, _cmd_show_ingestion_failures, False),
        (_MAPPING_CMD, _cmd_mapping, True),
        (_DROP_MAPPING, _cmd_drop_mapping, True),
        (_CREATE_TABLE, _cmd_create_table, True),
        (_CREATE_TABLES, _cmd_create_tables, True),
        (_DROP_TABLE, _cmd_drop_table, True),
        (_DROP_TABLES, _cmd_drop_tables, True),
        (_CLEAR_TABLE, _cmd_clear_table, True),
        (_FUNCTION_CMD, _cmd_function, True),
        (_DROP_FUNCTION, _cmd_drop_function, True),
        (_MATERIALIZED_VIEW, _cmd_materialized_view, True),
        (_DROP_MATERIALIZED_VIEW, _cmd_drop_materialized_view, True),
        (_POLICY_CMD, _cmd_policy, True),
        (_INGEST_INLINE, _cmd_ingest_inline, True),
        (_EXECUTE_SCRIPT, _cmd_execute_script, True),
    )


#: Rows per INSERT statement: multi-row VALUES is ~4x faster than executemany in DuckDB.
_INSERT_BATCH_ROWS = 100


def _insert_rows(con: Any, table: str, names: Sequence[str], rows: Sequence[list[Any]]) -> None:
    """Insert *rows* with bound parameters, a hundred rows per statement (the caller owns
    the transaction)."""
    head = f"INSERT INTO {quote_ident(table)} ({', '.join(quote_ident(n) for n in names)}) VALUES "
    one = "(" + ", ".join("?" for _ in names) + ")"
    for start in range(0, len(rows), _INSERT_BATCH_ROWS):
        batch = rows[start : start + _INSERT_BATCH_ROWS]
        con.execute(head + ", ".join(one for _ in batch), [v for row in batch for v in row])


def _constant(record: Any, value: Any) -> Any:
    return value


def _field(record: Any, name: str) -> Any:
    return record.get(name, _MISSING) if isinstance(record, dict) else _MISSING


def _ordinal(row: Sequence[str], ordinal: int) -> Any:
    return row[ordinal] if ordinal < len(row) else _MISSING


def _read_only(options: Mapping[str, Any]) -> bool:
    from duckdb_kql.options import read_only_requested

    return read_only_requested({str(k).lower(): v for k, v in options.items()})


def _split_script(script: str) -> list[str]:
    commands: list[list[str]] = []
    for line in script.splitlines():
        if _COMMAND_START.match(line):
            commands.append([line])
        elif commands:
            commands[-1].append(line)
    texts = (_strip_trailing_comments("\n".join(lines)).strip() for lines in commands)
    return [text for text in texts if text]


def _function_row(function: StoredFunction) -> list[str]:
    return [function.name, function.parameters, function.body, function.folder, function.docstring]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------
# The DuckDB file: our bookkeeping
# ---------------------------------------------------------------------------


def _ensure_meta_schema(con: Any) -> None:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {_META}")
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {_META}.__kusto_functions "
        "(Name VARCHAR PRIMARY KEY, Command VARCHAR NOT NULL, UpdatedOn TIMESTAMP)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {_META}.__kusto_policies (EntityType VARCHAR, "
        "EntityName VARCHAR, PolicyName VARCHAR, Policy VARCHAR, Command VARCHAR, "
        "UpdatedOn TIMESTAMP, PRIMARY KEY (EntityType, EntityName, PolicyName))"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {_META}.__kusto_mappings (TableName VARCHAR, "
        "Kind VARCHAR, Name VARCHAR, Mapping VARCHAR, UpdatedOn TIMESTAMP, "
        "PRIMARY KEY (TableName, Kind, Name))"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {_META}.__kusto_tables "
        "(Name VARCHAR PRIMARY KEY, Folder VARCHAR, DocString VARCHAR)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {_META}.__kusto_materialized_views (Name VARCHAR "
        "PRIMARY KEY, SourceTable VARCHAR, Query VARCHAR, Folder VARCHAR, DocString VARCHAR)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {_META}.__kusto_extents (ExtentId VARCHAR PRIMARY KEY, "
        "TableName VARCHAR, RowCount BIGINT, Tags VARCHAR, CreatedOn TIMESTAMP)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {_META}.__kusto_ingestion_failures (OperationId VARCHAR, "
        "DatabaseName VARCHAR, TableName VARCHAR, FailedOn TIMESTAMP, IngestionSourcePath "
        "VARCHAR, IngestionSourceId VARCHAR, Details VARCHAR, ErrorCode VARCHAR)"
    )


def _load_functions(con: Any) -> dict[str, StoredFunction]:
    """The persisted definitions, parsed; one that no longer parses is reported and
    skipped rather than keeping the server from starting."""
    out: dict[str, StoredFunction] = {}
    for name, command in con.execute(
        f"SELECT Name, Command FROM {_META}.__kusto_functions ORDER BY Name"
    ).fetchall():
        try:
            parsed = parse_functions([command])
        except (ValueError, TypeError) as exc:
            print(f"local kusto: skipping stored function {name}: {exc}", file=sys.stderr)
            continue
        if parsed:
            out.update(parsed[None])
    return out


def _open_database(data_dir: Path | None, database: str) -> tuple[Any, str]:
    """A DuckDB connection whose current catalog is named *database*.

    DuckDB names a file's catalog after its stem, so ``<data_dir>/<database>.duckdb`` is
    already right; in memory the default catalog is ``memory``, so a named in-memory
    catalog replaces it (clients send the database name on every request).
    """
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", database):
        raise ValueError(
            f"database name {database!r}: use letters, digits, '_', '-' or '.' "
            "(it is also the DuckDB file name)"
        )
    if data_dir is None:
        con = connect(":memory:")
        con.execute(f"ATTACH ':memory:' AS {quote_ident(database)}")
        con.execute(f"USE {quote_ident(database)}")
        con.execute("DETACH memory")
        return con, ":memory:"
    directory = Path(data_dir)
    path = directory / f"{database}.duckdb"
    if "?" in str(path):
        # DuckDB cuts a path at '?' to name the database's WAL file, which then cannot be
        # written: the first commit fails, after the directory was made.
        raise RuntimeError(
            f"cannot keep a DuckDB database in {directory}: DuckDB does not allow '?' in "
            "its file paths; choose another --data directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return connect(str(path)), str(path)
    except duckdb.Error as exc:
        # DuckDB's words for a lock held elsewhere: "lock" alone may be in the path.
        if "could not set lock" in str(exc).lower():
            raise RuntimeError(
                f"{path} is already open in another process (DuckDB allows one writer): "
                "point your clients at the local Kusto server that holds it"
            ) from exc
        # A file that is not a DuckDB database (truncated, another format) or a directory:
        # the user's to move aside, so one line naming it rather than DuckDB's traceback.
        raise RuntimeError(
            f"cannot open {path} as a DuckDB database ({exc}): move it aside, or choose "
            "another --data directory"
        ) from exc


# ---------------------------------------------------------------------------
# Queued ingestion: the data-management endpoint, on Azure Storage (azurite)
# ---------------------------------------------------------------------------

#: Azure Storage objects the local data-management endpoint hands out, named as Kusto's are.
_READY_QUEUE = "readyforaggregation-secured"
_FAILED_QUEUE = "failedingestions"
_SUCCEEDED_QUEUE = "successfulingestions"
_TEMP_CONTAINER = "ingestdata-temp"
_STATUS_TABLE = "ingestionsstatus"

#: The SDK refreshes resources hourly; a SAS outliving that by far avoids edge cases.
_SAS_LIFETIME = dt.timedelta(days=1)
_POLL_INTERVAL = 0.1
#: A message being ingested stays invisible this long; a crash mid-blob lets it reappear.
_VISIBILITY_TIMEOUT = 120
_TRANSIENT_RETRY_DELAY = 2
_MAX_DEQUEUES = 5
_UNREADABLE_BLOB = "the blob could not be read after retries"

#: Kusto's ``ReportLevel`` and ``ReportMethod`` values (azure-kusto-ingest's enums).
_REPORT_FAILURES, _REPORT_NOTHING, _REPORT_ALL = 0, 1, 2
_REPORT_TO_QUEUES = frozenset({0, 2})


class StorageAccount(NamedTuple):
    """An Azure Storage account given by explicit endpoints (azurite's connection string)."""

    name: str
    key: str
    blob_endpoint: str
    queue_endpoint: str
    table_endpoint: str

    @classmethod
    def parse(cls, connection_string: str) -> StorageAccount:
        fields = {
            key.strip().lower(): value.strip()
            for key, _, value in (part.partition("=") for part in connection_string.split(";"))
            if key.strip()
        }
        missing = [
            name
            for name in ("AccountName", "AccountKey", "BlobEndpoint", "QueueEndpoint")
            if not fields.get(name.lower())
        ]
        if missing:
            raise ValueError(
                f"the storage connection string lacks {', '.join(missing)}; give one with "
                "explicit endpoints, such as Azurite.connection_string"
            )
        return cls(
            fields["accountname"],
            fields["accountkey"],
            fields["blobendpoint"].rstrip("/"),
            fields["queueendpoint"].rstrip("/"),
            fields.get("tableendpoint", "").rstrip("/"),
        )

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.name};AccountKey={self.key};"
            f"BlobEndpoint={self.blob_endpoint};QueueEndpoint={self.queue_endpoint};"
            + (f"TableEndpoint={self.table_endpoint};" if self.table_endpoint else "")
        )


class IngestionFailure(NamedTuple):
    """A queued blob Kusto gave up on: what ``.show ingestion failures`` lists."""

    operation_id: uuid.UUID
    database: str
    table: str
    failed_on: dt.datetime
    source_path: str
    source_id: str | None
    details: str
    code: str


class _Retry(Exception):
    """A queued blob that may ingest later (storage unreachable, the engine failing for a
    while): leave its message. Carries what to report if it never ingests."""

    def __init__(self, details: str, code: str) -> None:
        super().__init__(details)
        self.code = code


class DataManagement:
    """Kusto's data-management ("ingest-") side, for the local server.

    ``QueuedIngestClient`` asks it for ingestion resources (a blob container and a queue,
    with SAS tokens) and an identity token, uploads a blob, and enqueues a message naming
    it. A background thread here plays the data-management service: it reads those
    messages, downloads each blob and ingests it in one transaction (one extent), honouring
    ``tags`` and ``ingestIfNotExists``, then reports the outcome to the status queues
    the way the message's ``ReportLevel`` asks. Kusto batches queued blobs for up to the
    table's batching time (10 s at least); this ingests each blob as it arrives, so tests
    wait for the pipeline rather than for a timer.
    """

    def __init__(self, server: LocalKustoRestServer, storage: StorageAccount) -> None:
        from azure.storage.blob import BlobServiceClient
        from azure.storage.queue import (
            QueueServiceClient,
            TextBase64DecodePolicy,
            TextBase64EncodePolicy,
        )

        self._server = server
        self.storage = storage
        #: Kusto hands this out for queued messages to carry; a message without it is refused.
        self.identity_token = uuid.uuid4().hex
        blobs = BlobServiceClient.from_connection_string(storage.connection_string)
        queues = QueueServiceClient.from_connection_string(storage.connection_string)
        _create_if_missing(lambda: blobs.create_container(_TEMP_CONTAINER))
        for name in (_READY_QUEUE, _FAILED_QUEUE, _SUCCEEDED_QUEUE):
            _create_if_missing(functools.partial(queues.create_queue, name))
        # The SDK base64-encodes queue messages (TextBase64EncodePolicy); so does Kusto.
        self._ready = queues.get_queue_client(
            _READY_QUEUE, message_decode_policy=TextBase64DecodePolicy()
        )
        self._status = {
            name: queues.get_queue_client(name, message_encode_policy=TextBase64EncodePolicy())
            for name in (_FAILED_QUEUE, _SUCCEEDED_QUEUE)
        }
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the SDK asks for ---------------------------------------------------

    def ingestion_resources(self) -> Result:
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas
        from azure.storage.queue import QueueSasPermissions, generate_queue_sas

        expiry = dt.datetime.now(dt.UTC) + _SAS_LIFETIME
        container_sas = generate_container_sas(
            self.storage.name,
            _TEMP_CONTAINER,
            account_key=self.storage.key,
            permission=ContainerSasPermissions(read=True, add=True, create=True, write=True),
            expiry=expiry,
        )

        def queue(name: str, permission: QueueSasPermissions) -> str:
            token = generate_queue_sas(
                self.storage.name,
                name,
                account_key=self.storage.key,
                permission=permission,
                expiry=expiry,
            )
            return f"{self.storage.queue_endpoint}/{name}?{token}"

        status = QueueSasPermissions(read=True, process=True)
        rows = [
            ["TempStorage", f"{self.storage.blob_endpoint}/{_TEMP_CONTAINER}?{container_sas}"],
            ["SecuredReadyForAggregationQueue", queue(_READY_QUEUE, QueueSasPermissions(add=True))],
            ["FailedIngestionsQueue", queue(_FAILED_QUEUE, status)],
            ["SuccessfulIngestionsQueue", queue(_SUCCEEDED_QUEUE, status)],
            # The Python SDK insists on a status table but never uses it (it reports to
            # queues only), so the local endpoint names one and creates nothing.
            [
                "IngestionsStatusTable",
                f"{self.storage.table_endpoint or self.storage.queue_endpoint}/{_STATUS_TABLE}",
            ],
        ]
        return _result((("ResourceTypeName", "string"), ("StorageRoot", "string")), rows)

    # -- the background service ---------------------------------------------------

    def start(self) -> DataManagement:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="local-kusto:data-management", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def idle(self) -> bool:
        """No queued blob waiting or being ingested."""
        if self._busy.is_set():
            return False
        return not self._ready.get_queue_properties().approximate_message_count

    def _run(self) -> None:
        while not self._stop.is_set():
            self._busy.set()  # from before the receive, so a message in hand is never missed
            try:
                handled = self._poll()
            except Exception as exc:  # storage gone or flaky: keep serving, try again
                if not self._server.quiet:
                    print(f"local kusto: queued ingestion: {exc}", file=sys.stderr, flush=True)
                handled = 0
            finally:
                self._busy.clear()
            if not handled:
                self._stop.wait(_POLL_INTERVAL)

    def _poll(self) -> int:
        messages = list(
            self._ready.receive_messages(
                messages_per_page=32, max_messages=32, visibility_timeout=_VISIBILITY_TIMEOUT
            )
        )
        for message in messages:
            self._handle(message)
        return len(messages)

    def _handle(self, message: Any) -> None:
        """Ingest one queued blob, report the outcome, and take its message off the queue
        (or leave it for a retry when storage could not be reached)."""
        request: dict[str, Any] = {}
        try:
            request = _ingestion_request(message.content)
            self._ingest(request)
        except _Retry as exc:
            if message.dequeue_count < _MAX_DEQUEUES:
                # By id, not the message: given one, the SDK re-sends its content, decoded
                # and without base64, and storage refuses the update.
                self._ready.update_message(
                    message.id,
                    pop_receipt=message.pop_receipt,
                    visibility_timeout=_TRANSIENT_RETRY_DELAY,
                )
                return
            self._fail(request, str(exc), exc.code)
        except IngestError as exc:
            self._fail(request, str(exc), exc.code)
        except Exception as exc:  # the engine refused the rows
            self._fail(request, f"{type(exc).__name__}: {exc}", "BadRequest_InvalidBlob")
        else:
            # A blob skipped by ingestIfNotExists was handled as asked: not a failure.
            if (
                request["report_level"] == _REPORT_ALL
                and request["report_method"] in _REPORT_TO_QUEUES
            ):
                self._report(_SUCCEEDED_QUEUE, request, SucceededOn=_iso_now())
        self._ready.delete_message(message)

    def _ingest(self, request: Mapping[str, Any]) -> None:
        properties = request["properties"]
        if properties.get("authorizationContext") != self.identity_token:
            raise IngestError(
                "the message's authorizationContext is not a token this endpoint issued "
                "(.get kusto identity token)",
                code="Unauthorized",
            )
        if request["database"] != self._server.database:
            raise IngestError(
                f"Database '{request['database']}' was not found: this local server serves "
                f"{self._server.database!r}",
                code="BadRequest_EntityNotFound",
            )
        data = _decode_body(self._download(request["blob"]), None)
        try:
            self._server.ingest(
                request["table"],
                str(properties.get("format") or "csv"),
                data,
                mapping_name=properties.get("ingestionMappingReference"),
                tags=_string_list(properties.get("tags"), "tags"),
                if_not_exists=_string_list(
                    properties.get("ingestIfNotExists"), "ingestIfNotExists"
                ),
                ignore_first_record=str(properties.get("ignoreFirstRecord")).lower() == "true",
            )
        except _TRANSIENT_ENGINE_ERRORS as exc:
            # Kusto's data-management service retries its own failures, as for storage.
            raise _Retry(f"the engine kept failing: {exc}", "General_InternalServerError") from exc

    def _download(self, url: str) -> bytes:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
        )
        from azure.storage.blob import BlobClient

        try:
            with BlobClient.from_blob_url(url) as blob:
                return bytes(blob.download_blob().readall())
        except ResourceNotFoundError:
            raise IngestError(
                f"blob {_without_sas(url)} was not found", code="Download_SourceNotFound"
            ) from None
        except ClientAuthenticationError:
            raise IngestError(
                f"blob {_without_sas(url)}: access denied", code="Download_Forbidden"
            ) from None
        except HttpResponseError as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise IngestError(
                    f"blob {_without_sas(url)}: {exc.message}", code="Download_BadRequest"
                ) from None
            raise _Retry(_UNREADABLE_BLOB, "Download_Failed") from exc
        except Exception as exc:  # connection refused, timeouts: storage may come back
            raise _Retry(_UNREADABLE_BLOB, "Download_Failed") from exc

    def _fail(self, request: Mapping[str, Any], details: str, code: str) -> None:
        failure = IngestionFailure(
            uuid.uuid4(),
            str(request.get("database", "")),
            str(request.get("table", "")),
            _utcnow(),
            _without_sas(str(request.get("blob", ""))),
            request.get("id"),
            details,
            code,
        )
        self._server.record_ingestion_failure(failure)
        if (
            request.get("report_level", _REPORT_FAILURES) != _REPORT_NOTHING
            and request.get("report_method", 0) in _REPORT_TO_QUEUES
        ):
            self._report(
                _FAILED_QUEUE,
                request,
                OperationId=str(failure.operation_id),
                FailedOn=_iso_now(),
                Details=details,
                ErrorCode=code,
                FailureStatus="Permanent",
                OriginatesFromUpdatePolicy=False,
                ShouldRetry=False,
            )

    def _report(self, queue: str, request: Mapping[str, Any], **fields: Any) -> None:
        status = {
            "OperationId": str(uuid.uuid4()),
            "Database": request.get("database"),
            "Table": request.get("table"),
            "IngestionSourceId": request.get("id"),
            "IngestionSourcePath": _without_sas(str(request.get("blob", ""))),
            "RootActivityId": str(uuid.uuid4()),
            **fields,
        }
        self._status[queue].send_message(json.dumps(status))


def _ingestion_request(content: str) -> dict[str, Any]:
    """The fields of a queued-ingestion message (azure-kusto-ingest's IngestionBlobInfo)."""
    try:
        message = json.loads(content)
    except (TypeError, ValueError):
        raise IngestError(
            "the queued message is not JSON", code="BadRequest_InvalidMessage"
        ) from None
    if not isinstance(message, dict) or not all(
        isinstance(message.get(k), str) for k in ("BlobPath", "DatabaseName", "TableName")
    ):
        raise IngestError(
            "the queued message lacks BlobPath, DatabaseName or TableName",
            code="BadRequest_InvalidMessage",
        )
    properties = message.get("AdditionalProperties") or {}
    if properties.get("ingestionMapping"):
        raise IngestError(
            "inline ingestion mappings are not supported by the local server; create the "
            "mapping and use ingestionMappingReference",
            code="BadRequest_NotSupported",
        )
    return {
        "blob": message["BlobPath"],
        "database": message["DatabaseName"],
        "table": message["TableName"],
        "id": message.get("Id"),
        "report_level": int(message.get("ReportLevel", _REPORT_FAILURES)),
        "report_method": int(message.get("ReportMethod", 0)),
        "properties": properties,
    }


def _create_if_missing(create: Callable[[], Any]) -> None:
    from azure.core.exceptions import ResourceExistsError

    with contextlib.suppress(ResourceExistsError):
        create()


def _without_sas(url: str) -> str:
    """A storage URL fit for logs and status messages: its token stripped."""
    return url.split("?", 1)[0]


def _iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _guid_or_none(text: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(text) if text else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# azurite, the Azure Storage emulator (npm), for queued ingestion locally
# ---------------------------------------------------------------------------

#: azurite's built-in account: a published development key, not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AZURITE_SETUP = "scripts/setup.d/30-azurite.sh"
_AZURITE_LISTENING = re.compile(
    r"Azurite (Blob|Queue|Table) service is successfully listening at \S+:(\d+)"
)


class Azurite:
    """A running azurite on loopback ports of its choosing, in memory; ``close()`` it."""

    def __init__(self, process: subprocess.Popen[str], ports: Mapping[str, int]) -> None:
        self._process = process
        self.ports = dict(ports)

    @property
    def storage(self) -> StorageAccount:
        def endpoint(service: str) -> str:
            # Path-style URLs (account in the path): what azurite serves on an IP host.
            return f"http://{_LOOPBACK_HOST}:{self.ports[service]}/{AZURITE_ACCOUNT}"

        return StorageAccount(
            AZURITE_ACCOUNT, AZURITE_KEY, endpoint("Blob"), endpoint("Queue"), endpoint("Table")
        )

    @property
    def connection_string(self) -> str:
        return self.storage.connection_string

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)

    def __enter__(self) -> Azurite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_azurite() -> str:
    """The azurite executable: ``$AZURITE``, this checkout's node_modules, or PATH."""
    candidates = [
        os.environ.get("AZURITE", ""),
        str(Path(__file__).resolve().parents[1] / "node_modules" / ".bin" / "azurite"),
        shutil.which("azurite") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        f"azurite (the Azure Storage emulator, npm) was not found: run `bash {AZURITE_SETUP}` "
        "from the repository root (scripts/test does), or set AZURITE to its executable"
    )


def start_azurite(executable: str | None = None, *, timeout: float = 60.0) -> Azurite:
    """Start azurite in memory on free loopback ports; returns once all three services listen."""
    command = [
        executable or find_azurite(),
        *(
            "--blobHost",
            _LOOPBACK_HOST,
            "--queueHost",
            _LOOPBACK_HOST,
            "--tableHost",
            _LOOPBACK_HOST,
        ),
        *("--blobPort", "0", "--queuePort", "0", "--tablePort", "0"),
        "--inMemoryPersistence",
        "--disableTelemetry",
        "--skipApiVersionCheck",
        "--silent",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # a Ctrl-C in the terminal is the caller's to handle
    )
    ports: dict[str, int] = {}
    seen: list[str] = []
    ready = threading.Event()

    def read_output() -> None:
        # Reads to the end, so the pipe never fills and stalls azurite.
        assert process.stdout is not None
        for line in process.stdout:
            if len(seen) < 50:
                seen.append(line.rstrip())
            found = _AZURITE_LISTENING.search(line)
            if found:
                ports[found.group(1)] = int(found.group(2))
                if len(ports) == 3:
                    ready.set()
        ready.set()

    threading.Thread(target=read_output, name="azurite-output", daemon=True).start()
    if not ready.wait(timeout) or len(ports) < 3:
        process.kill()
        process.wait(timeout=10)
        output = "\n".join(seen[-20:])
        raise RuntimeError(f"azurite did not start within {timeout:g}s:\n{output}")
    return Azurite(process, ports)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


#: Servers not yet closed. Closed at exit, while threads still run normally: left to
#: interpreter finalization, DuckDB's destructor may run on a dying thread (see hang_up).
_OPEN_SERVERS: weakref.WeakSet[LocalKustoServer] = weakref.WeakSet()


@atexit.register
def _close_open_servers() -> None:
    for server in list(_OPEN_SERVERS):
        with contextlib.suppress(Exception):
            server.close()


class LocalKustoServer:
    """A running local Kusto endpoint: ``.url`` for the SDKs, ``.close()`` to stop.

    The socket is bound in the constructor (so ``.url`` is known at once, also with port
    0); :meth:`start` serves it from a daemon thread.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        port: int = 0,
        database: str = DEFAULT_DATABASE,
        *,
        quiet: bool = True,
        max_streaming_bytes: int = MAX_STREAMING_REQUEST_BYTES,
        storage: str | None = None,
    ) -> None:
        """*storage*: an Azure Storage connection string with explicit endpoints (azurite's,
        see :func:`start_azurite`); with it the server also takes queued ingestion."""
        self.data_dir = Path(data_dir) if data_dir is not None else None
        con, source = _open_database(self.data_dir, database)
        try:
            self._server = LocalKustoRestServer(
                con,
                port=port,
                source=source,
                quiet=quiet,
                max_streaming_bytes=max_streaming_bytes,
            )
        except BaseException:
            con.close()
            raise
        self._con: Any = con
        self._thread: threading.Thread | None = None
        self._closed = False
        _OPEN_SERVERS.add(self)
        if storage is not None:
            self.enable_queued_ingestion(storage)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, for ``with_no_authentication``."""
        return self._server.url

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def database(self) -> str:
        return self._server.database

    @property
    def rest_server(self) -> LocalKustoRestServer:
        """The underlying HTTP server (for tests and in-process tooling)."""
        return self._server

    def enable_queued_ingestion(self, storage: str) -> None:
        """Serve the data-management endpoint on *storage* (a connection string with
        explicit endpoints) and ingest what ``QueuedIngestClient`` queues there."""
        self.disable_queued_ingestion()
        self._server.data_management = DataManagement(
            self._server, StorageAccount.parse(storage)
        ).start()

    def disable_queued_ingestion(self) -> None:
        """Stop taking queued ingestion; blobs still queued stay in storage."""
        management, self._server.data_management = self._server.data_management, None
        if management is not None:
            management.close()

    def wait_for_queued_ingestion(self, timeout: float = 60.0) -> None:
        """Block until every queued blob has been ingested or failed.

        Kusto offers no such call (its clients poll the status queues or the table); for
        tests and benchmarks that must know queued work is done, including work that
        changed nothing (a batch skipped by ``ingestIfNotExists``).
        """
        management = self._server.data_management
        if management is None:
            raise RuntimeError("queued ingestion is off: call enable_queued_ingestion() first")
        deadline = time.monotonic() + timeout
        # Storage counts a message until it is deleted, invisible or not, and the service
        # is busy from before it receives one: idle means nothing is left to do.
        while not management.idle():
            if time.monotonic() > deadline:
                raise TimeoutError(f"queued ingestion still busy after {timeout:g}s")
            time.sleep(_POLL_INTERVAL)

    def start(self) -> LocalKustoServer:
        """Serve from a background daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"local-kusto:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread until :meth:`shutdown`."""
        self._server.serve_forever(poll_interval=0.1)

    def close(self) -> None:
        """Stop serving, let in-flight requests finish with the connection, close the file."""
        if self._closed:
            return
        self._closed = True
        _OPEN_SERVERS.discard(self)
        self.disable_queued_ingestion()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()
        self._server.hang_up()
        with self._server._lock:  # an in-flight request still holds the connection
            with contextlib.suppress(Exception):
                self._con.execute("CHECKPOINT")
            self._con.close()
            # Release the DuckDB object here, on the closing thread: whichever thread
            # drops the last reference runs its destructor (see hang_up).
            self._server._con = None  # type: ignore[assignment]
            self._con = None

    def __enter__(self) -> LocalKustoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalKustoServer(url={self.url!r}, database={self.database!r})"


def start_local_kusto(
    data_dir: Path | str | None, port: int = 0, database: str = DEFAULT_DATABASE
) -> LocalKustoServer:
    """Start a local Kusto server in a background thread; ``.close()`` it when done."""
    return LocalKustoServer(data_dir, port, database).start()


def serve_local_kusto(
    data_dir: Path | str | None,
    port: int = 0,
    database: str = DEFAULT_DATABASE,
    *,
    quiet: bool = True,
    storage: str | None = None,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (``langgraph-kusto local-kusto``).

    Stdout gets exactly one line, the URL, as soon as the socket accepts connections, so
    a script can ``read`` it; everything else goes to stderr. With *storage* (a connection
    string, e.g. azurite's) it also takes queued ingestion.
    """
    server = LocalKustoServer(data_dir, port, database, quiet=quiet, storage=storage)
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        where = server.data_dir / f"{database}.duckdb" if server.data_dir else "memory"
        print(server.url, flush=True)
        print(
            f"local kusto: database {server.database!r} ({where}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("local kusto: stopped", file=sys.stderr, flush=True)
