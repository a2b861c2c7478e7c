"""``langgraph-kusto dlq``: inspect, replay and purge dead letters, on any queue backend.

Everything goes through the ``DeadLetterStore`` protocol (``list_dead_letters`` /
``resend_dead_letter`` / ``delete_dead_letter``), so the SQLite queue and Azure Service Bus
behave the same here. The guarantees come from the backends:

* **Replay never loses a message.** ``resend_dead_letter`` removes the dead letter only
  after its copy is accepted: the SQLite queue does both in one transaction; Service Bus
  sends the copy, then completes the dead letter. A replay killed between the two leaves
  both, and replaying again sends a copy with the same id (``replay_message_id``), which
  duplicate detection drops.
* **Replaying twice shows one copy.** Should a second copy still reach Kusto (e.g. after
  the duplicate-detection window), its rows carry the same ``RowId`` as the first, and
  every reader drops the repeat.

Nothing here deserializes user state: ``show`` decodes the frame and the envelope (ids,
kind, counts and sizes), and prints the message body only when asked (``--payload``).
"""

from __future__ import annotations

import argparse
import base64
import re
import sqlite3
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from langgraph.checkpoint.kusto.outbox import (
    DeadLetter,
    DeadLetterLookup,
    DeadLetterStore,
    OutboxError,
    OutboxQueue,
    open_queue,
    queue_id,
    redact_queue_url,
)
from langgraph.checkpoint.kusto.outbox.sqlite import BUSY_TIMEOUT_SECONDS
from langgraph.checkpoint.kusto.outbox.sqlite import parse_url as parse_sqlite_url
from langgraph.checkpoint.kusto.settings import QUEUE_ENV, resolve
from langgraph.checkpoint.kusto.shared.envelope import Event, EventKind, decode_event
from langgraph.checkpoint.kusto.shared.errors import EnvelopeError
from langgraph.checkpoint.kusto.shared.framing import Frame, decode_frame, join_frames

from .cli import UsageError

SCAN_LIMIT = 10_000
"""Dead letters examined per command. Filters apply client-side (neither backend can
filter a dead-letter listing), so this bounds the memory one command uses."""

_AGE_PART = re.compile(r"(\d+)([smhdw])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PAYLOAD_WIDTH = 76
_PROGRESS_WIDTH = 30
_THREAD_WIDTH = 40
_NOT_SHOWN = "-"
_MAX_SEQUENCE_NUMBER = 2**63 - 1
"""Both backends number messages with signed 64-bit integers (SQLite's INTEGER, Service
Bus's long): a larger number names no dead letter, and SQLite cannot even be asked."""

_QUEUE_TABLES = (
    "outbox_messages",
    "outbox_sessions",
    "outbox_dedup",
    "outbox_dead_letters",
)
"""The tables of a SQLite queue file (``SCHEMA`` in ``outbox/sqlite.py``), each keyed by
``queue``, that every version creates. ``SqliteQueue`` creates them all in one transaction,
so a file without them has never been opened as a queue."""
_SPOOL_TABLE = "outbox_spool"
"""Keyed by ``queue`` too, but only since spool files came: a file an earlier version
wrote lacks it until this version opens the file."""


# --- selecting dead letters ------------------------------------------------------------------


def parse_age(text: str) -> float:
    """Seconds in an age such as ``90s``, ``10m``, ``2h``, ``1d``, ``1w`` or ``1h30m``."""
    compact = text.strip().lower()
    parts = _AGE_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"age {text!r} is not understood; use a number with a unit s, m, h, d or w, "
            "e.g. 10m, 2h, 1d or 1h30m"
        )
    return float(sum(int(n) * _AGE_UNITS[u] for n, u in parts))


def format_age(seconds: float) -> str:
    """``42s``, ``7m``, ``3h05m``, ``2d04h``: two units at most, for a table column."""
    whole = max(int(seconds), 0)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on; ``None`` means "any"."""

    reason: str | None = None
    thread: str | None = None
    older_than: float | None = None
    """Seconds since the message was dead-lettered."""
    limit: int | None = None

    @property
    def narrowed(self) -> bool:
        return any(v is not None for v in (self.reason, self.thread, self.older_than, self.limit))

    def matches(self, dead: DeadLetter, now: float) -> bool:
        if self.reason is not None and dead.reason != self.reason:
            return False
        # The queue holds a thread's events under queue_id(thread): a thread id over 128
        # characters is a hash there, and the operator still types the thread id.
        if self.thread is not None and dead.session_id != queue_id(self.thread):
            return False
        return self.older_than is None or now - dead.dead_lettered_time >= self.older_than


@dataclass(frozen=True, slots=True)
class Described:
    """A dead letter with what its body says about itself, without reading user state."""

    dead: DeadLetter
    frame: Frame | None
    error: EnvelopeError | None

    @property
    def kind(self) -> str:
        return str(self.dead.application_properties.get("kind", _NOT_SHOWN))

    @property
    def event_id(self) -> str | None:
        return self.frame.event_id if self.frame is not None else None


def describe(dead: DeadLetter) -> Described:
    try:
        return Described(dead, decode_frame(dead.body), None)
    except EnvelopeError as exc:
        return Described(dead, None, exc)


@dataclass(slots=True)
class Scan:
    """The dead letters a selection picked, oldest first, and how they were found."""

    selected: list[Described]
    examined: list[Described]
    truncated: bool
    """``SCAN_LIMIT`` dead letters were examined: there may be more."""
    parts_added: int = 0
    """Parts of chunked events added so that no event is split (see ``scan``)."""


def scan(store: DeadLetterStore, selection: Selection, now: float | None = None) -> Scan:
    """The dead letters ``selection`` picks, in the order they were dead-lettered.

    An event cut into several messages is dead-lettered as several dead letters; replaying
    only some of them would leave the worker waiting for the rest (and dead-lettering them
    again as ``IncompleteChunkGroup``). So when a selection picks one part of an event, the
    event's other parts that are dead letters come along.
    """
    moment = time.time() if now is None else now
    examined = [describe(d) for d in store.list_dead_letters(limit=SCAN_LIMIT)]
    picked = [d for d in examined if selection.matches(d.dead, moment)]
    if selection.limit is not None:
        picked = picked[: selection.limit]
    chosen = {d.dead.sequence_number for d in picked}
    split_events = {d.event_id for d in picked if d.frame is not None and d.frame.count > 1}
    siblings = [
        d for d in examined if d.event_id in split_events and d.dead.sequence_number not in chosen
    ]
    chosen.update(d.dead.sequence_number for d in siblings)
    selected = [d for d in examined if d.dead.sequence_number in chosen]
    return Scan(selected, examined, len(examined) >= SCAN_LIMIT, len(siblings))


# --- rendering -------------------------------------------------------------------------------


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(items: Sequence[Described], now: float) -> str:
    """One line per dead letter: what ``dlq list`` prints."""
    header = ("SEQ", "AGE", "REASON", "THREAD", "KIND", "DELIVERIES")
    rows = [
        (
            str(d.dead.sequence_number),
            format_age(now - d.dead.dead_lettered_time),
            d.dead.reason or _NOT_SHOWN,
            _clip(d.dead.session_id, _THREAD_WIDTH),
            d.kind,
            str(d.dead.delivery_count),
        )
        for d in items
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _moment(epoch: float, now: float) -> str:
    stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({format_age(now - epoch)} ago)"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KB"
    return f"{count / 1024 / 1024:.1f} MB"


def _fields(pairs: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    width = max(len(label) for label, _ in pairs)
    return [f"{indent}{label.ljust(width)}  {value}" for label, value in pairs]


def _envelope_fields(event: Event) -> list[tuple[str, str]]:
    """The envelope without user state: ids, kind, counts and sizes; of the metadata only
    LangGraph's own ``source`` and ``step`` values (other keys are named, not shown)."""
    meta = event.metadata
    own = ", ".join(f"{k}={meta[k]}" for k in ("source", "step") if k in meta)
    others = sorted(k for k in meta if k not in ("source", "step"))
    named = f"other keys: {', '.join(others)}" if others else ""
    metadata = "; ".join(part for part in (own, named) if part)
    fields = [
        ("kind", event.kind.value),
        ("event id", event.event_id),
        ("thread id", event.thread_id),
        ("namespace", repr(event.checkpoint_ns)),
        ("sequence", str(event.seq)),
        ("published", datetime.fromtimestamp(event.published_at, UTC).isoformat()),
    ]
    if event.kind is EventKind.PUT:
        fields += [
            ("checkpoint id", event.checkpoint_id),
            ("parent", event.parent_checkpoint_id or _NOT_SHOWN),
            ("metadata", metadata or _NOT_SHOWN),
            ("checkpoint", f"{_size(len(event.checkpoint_data))} ({event.checkpoint_type})"),
            (
                "blobs",
                f"{len(event.blobs)}, {_size(sum(len(b.data) for b in event.blobs))}"
                + (f": {', '.join(b.channel for b in event.blobs)}" if event.blobs else ""),
            ),
        ]
    elif event.kind is EventKind.PUT_WRITES:
        tasks = sorted({w.task_path or w.task_id for w in event.writes})
        fields += [
            ("checkpoint id", event.checkpoint_id),
            (
                "writes",
                f"{len(event.writes)}, {_size(sum(len(w.data) for w in event.writes))}"
                + (f": {', '.join(w.channel for w in event.writes)}" if event.writes else ""),
            ),
            ("tasks", "; ".join(tasks) or _NOT_SHOWN),
        ]
    elif event.kind is EventKind.DELETE_RUNS:
        fields.append(("runs", str(len(event.run_ids))))
    elif event.kind is EventKind.PRUNE:
        fields.append(("kept", f"{len(event.kept)} checkpoint(s)"))
    return fields


def render_detail(
    item: Described, examined: Sequence[Described], now: float, *, payload: bool
) -> str:
    """What ``dlq show`` prints: the dead letter, its frame and, when every part of the
    event is at hand, the envelope's fields. The body only with ``payload=True``."""
    dead = item.dead
    lines = _fields(
        [
            ("sequence number", str(dead.sequence_number)),
            ("message id", dead.message_id),
            ("thread (session)", dead.session_id),
            ("kind (property)", item.kind),
            ("reason", dead.reason or _NOT_SHOWN),
            ("description", dead.description or _NOT_SHOWN),
            ("delivery count", str(dead.delivery_count)),
            ("enqueued", _moment(dead.enqueued_time, now)),
            ("dead-lettered", _moment(dead.dead_lettered_time, now)),
            ("body", _size(len(dead.body))),
        ]
    )
    frame = item.frame
    if frame is None:
        assert item.error is not None
        lines.append(f"frame: none ({item.error.reason}: {item.error})")
    else:
        lines.append(f"frame: event {frame.event_id}, part {frame.index + 1} of {frame.count}")
        lines += _envelope_lines(frame, examined)
    if payload:
        encoded = base64.b64encode(dead.body).decode("ascii")
        lines.append("payload (the message body, base64):")
        lines += textwrap.wrap(encoded, _PAYLOAD_WIDTH, initial_indent="  ", subsequent_indent="  ")
    else:
        lines.append("payload: not shown (--payload prints the message body, base64)")
    return "\n".join(lines)


def _envelope_lines(frame: Frame, examined: Sequence[Described]) -> list[str]:
    parts = {
        d.frame.index: d.frame
        for d in examined
        if d.frame is not None and d.frame.event_id == frame.event_id
    }
    parts[frame.index] = frame
    if len(parts) < frame.count:
        return [
            f"envelope: not decoded, {len(parts)} of its {frame.count} parts are dead letters "
            "(the rest were ingested, are still queued, or never arrived)"
        ]
    try:
        event = decode_event(join_frames(list(parts.values())))
    except EnvelopeError as exc:
        return [f"envelope: undecodable ({exc.reason}: {exc})"]
    title = "envelope:" if frame.count == 1 else f"envelope (joined from {frame.count} parts):"
    return [title, *_fields(_envelope_fields(event), indent="  ")]


# --- progress --------------------------------------------------------------------------------


class ProgressBar:
    """A progress bar on a terminal (redrawn in place); elsewhere (a log, a pipe) one line
    per quarter of the way, so a long replay still shows that it moves."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.live = self.stream.isatty()
        self._last_quarter = 0

    def advance(self) -> None:
        self.done += 1
        if self.live:
            filled = _PROGRESS_WIDTH * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (_PROGRESS_WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            quarter = 4 * self.done // max(self.total, 1)
            if quarter > self._last_quarter:
                self._last_quarter = quarter
                self.stream.write(f"{self.label}: {self.done}/{self.total}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and 0 < self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()


# --- acting ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What happened to each selected dead letter, by sequence number."""

    done: list[int] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    """Not found: replayed or purged meanwhile (e.g. by another operator), or on Service Bus
    still locked by a replay that was killed, until the lock expires."""
    error: str | None = None
    """Why the command stopped early (the queue failed); the rest were not touched."""


def apply(
    items: Sequence[Described],
    action: Callable[[int], None],
    progress: ProgressBar,
) -> Outcome:
    """``action`` on each dead letter in order; stops at the first queue failure, since
    the next attempt would meet the same queue."""
    outcome = Outcome()
    try:
        for item in items:
            sequence = item.dead.sequence_number
            try:
                action(sequence)
            except KeyError:
                outcome.gone.append(sequence)
            else:
                outcome.done.append(sequence)
            progress.advance()
    except OutboxError as exc:
        outcome.error = str(exc)
    finally:
        progress.close()
    return outcome


def run_list(
    store: DeadLetterStore, where: str, selection: Selection, out: TextIO, now: float | None = None
) -> int:
    moment = time.time() if now is None else now
    found = scan(store, selection, moment)
    if not found.selected:
        print(f"{_none(selection)} in {where}", file=out)
    else:
        print(render_table(found.selected, moment), file=out)
        print(f"\n{len(found.selected)} dead letter(s) in {where}", file=out)
    _notes(found, out)
    return 0


def run_show(
    store: DeadLetterStore,
    where: str,
    sequence_number: int,
    out: TextIO,
    *,
    payload: bool = False,
    now: float | None = None,
) -> int:
    moment = time.time() if now is None else now
    # The scan also finds the other parts of a chunked event, to decode its envelope.
    found = scan(store, Selection(), moment)
    if isinstance(store, DeadLetterLookup):
        dead = store.find_dead_letter(sequence_number)
        item = None if dead is None else describe(dead)
        searched_all = True
    else:
        item = next((d for d in found.examined if d.dead.sequence_number == sequence_number), None)
        searched_all = not found.truncated
    if item is None:
        raise UsageError(
            f"no dead letter with sequence number {sequence_number} in {where}"
            + ("" if searched_all else f" among the oldest {SCAN_LIMIT} (the scan limit)")
            + "; `langgraph-kusto dlq list` shows the ones there are"
        )
    print(render_detail(item, found.examined, moment, payload=payload), file=out)
    return 0


def run_replay(
    store: DeadLetterStore,
    where: str,
    selection: Selection,
    out: TextIO,
    err: TextIO,
    *,
    dry_run: bool = False,
    now: float | None = None,
) -> int:
    """Re-send the selected dead letters to the queue, oldest first (``dlq replay``)."""
    return _act(store, where, selection, out, err, "replay", store.resend_dead_letter, dry_run, now)


def run_purge(
    store: DeadLetterStore,
    where: str,
    selection: Selection,
    out: TextIO,
    err: TextIO,
    *,
    dry_run: bool = False,
    now: float | None = None,
) -> int:
    """Delete the selected dead letters for good (``dlq purge``)."""
    return _act(store, where, selection, out, err, "purge", store.delete_dead_letter, dry_run, now)


_PAST = {"replay": "replayed", "purge": "purged"}


def _act(
    store: DeadLetterStore,
    where: str,
    selection: Selection,
    out: TextIO,
    err: TextIO,
    verb: str,
    action: Callable[[int], None],
    dry_run: bool,
    now: float | None,
) -> int:
    moment = time.time() if now is None else now
    found = scan(store, selection, moment)
    if not found.selected:
        print(f"{_none(selection)} in {where}; nothing to {verb}", file=out)
        _notes(found, out)
        return 0
    if dry_run:
        print(render_table(found.selected, moment), file=out)
        print(
            f"\ndry run: would {verb} {len(found.selected)} dead letter(s) in {where}; "
            "nothing was changed",
            file=out,
        )
        _notes(found, out)
        return 0
    outcome = apply(found.selected, action, ProgressBar(verb, len(found.selected), err))
    print(f"{_PAST[verb]} {len(outcome.done)} dead letter(s) in {where}", file=out)
    if outcome.gone:
        print(
            f"{len(outcome.gone)} were not found (replayed or purged meanwhile, or on Service "
            "Bus locked by another replay until its lock expires): "
            + ", ".join(map(str, outcome.gone)),
            file=out,
        )
    _notes(found, out)
    if outcome.error is not None:
        untouched = len(found.selected) - len(outcome.done) - len(outcome.gone)
        print(
            f"langgraph-kusto: stopped with {untouched} not {_PAST[verb]}: {outcome.error}",
            file=err,
        )
        return 1
    return 0


def _none(selection: Selection) -> str:
    return "no dead letters match the filters" if selection.narrowed else "no dead letters"


def _notes(found: Scan, out: TextIO) -> None:
    if found.parts_added:
        print(
            f"note: {found.parts_added} more part(s) of chunked events came along, so that "
            "no event is split",
            file=out,
        )
    if found.truncated:
        print(
            f"note: only the oldest {SCAN_LIMIT} dead letters were examined; newer ones, "
            "matching or not, were not looked at: handle (replay or purge) the oldest, then "
            "run the command again",
            file=out,
        )


# --- the command line ------------------------------------------------------------------------


def add_dlq_arguments(parser: argparse.ArgumentParser) -> None:
    """``dlq list|show|replay|purge`` and their flags."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--queue", default=None, help=f"queue URL (${QUEUE_ENV})")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--reason", default=None, help="only dead letters with this reason")
    filters.add_argument(
        "--thread", type=_thread_id, default=None, help="only dead letters of this thread id"
    )
    filters.add_argument(
        "--older-than",
        type=_age,
        default=None,
        metavar="AGE",
        help="only dead letters dead-lettered at least this long ago: 30s, 10m, 2h, 1d, 1w",
    )
    filters.add_argument(
        "--limit", type=_positive, default=None, metavar="N", help="at most N, oldest first"
    )
    acting = argparse.ArgumentParser(add_help=False)
    acting.add_argument(
        "--dry-run", action="store_true", help="print what would be done; change nothing"
    )
    actions = parser.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    actions.add_parser(
        "list", parents=[common, filters], help="a table of dead letters, oldest first"
    )
    show = actions.add_parser("show", parents=[common], help="one dead letter in detail")
    show.add_argument(
        "sequence_number", type=_sequence_number, metavar="SEQ", help="from `dlq list`"
    )
    show.add_argument(
        "--payload", action="store_true", help="also print the message body (user data, base64)"
    )
    actions.add_parser(
        "replay",
        parents=[common, filters, acting],
        help="re-send dead letters to the queue once their cause is fixed",
    )
    purge = actions.add_parser(
        "purge", parents=[common, filters, acting], help="delete dead letters for good"
    )
    purge.add_argument(
        "--all", action="store_true", help="purge every dead letter (no filter needed)"
    )


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _thread_id(text: str) -> str:
    # No thread has the empty id (the queue refuses it as a session id), so it can only
    # be a mistake, e.g. an unset shell variable.
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _sequence_number(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value <= _MAX_SEQUENCE_NUMBER:
        raise argparse.ArgumentTypeError(
            f"must be a sequence number from 0 to {_MAX_SEQUENCE_NUMBER}, got {value}"
        )
    return value


def open_store(url: str) -> OutboxQueue:
    """The queue ``url`` names. A SQLite queue file must exist already and be a queue:
    opening one creates the file, its tables and switches it to WAL, so an operator who
    mistyped the path or the queue name would silently look at an empty queue (and turn
    some other database into a queue file)."""
    try:
        if url.startswith("sqlite:"):
            location = parse_sqlite_url(url)
            _check_queue_file(location.path, location.queue, url)
        return open_queue(url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_queue_file(path: Path, queue: str, url: str) -> None:
    """``UsageError`` for a missing file or a queue name the file does not hold,
    ``OutboxError`` (the worker's words and exit code) for a file that cannot be a queue.
    Reads without writing, since the file may be another application's database."""
    if not path.exists():
        raise UsageError(
            f"no queue file at {path} (from the queue URL {url!r}); pass --queue or "
            f"set ${QUEUE_ENV} (a relative sqlite:/// path is relative to the current "
            "directory)"
        )
    if path.is_dir():
        raise OutboxError(f"cannot open the queue file {path}: it is a directory")
    if not path.is_file():
        # SQLite would block opening a FIFO for reading until someone writes to it.
        raise OutboxError(f"cannot open the queue file {path}: it is not a regular file")
    try:
        read_only = f"{path.absolute().as_uri()}?mode=ro"
        with closing(sqlite3.connect(read_only, uri=True, timeout=BUSY_TIMEOUT_SECONDS)) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
            if not tables.issuperset(_QUEUE_TABLES):
                raise OutboxError(
                    f"cannot open the queue file {path}: it is a SQLite database without the "
                    "outbox tables, not a queue"
                )
            # A queue leaves no row once drained and past the duplicate-detection window,
            # so only a file that holds other queues tells a mistyped name apart.
            holding = [t for t in (*_QUEUE_TABLES, _SPOOL_TABLE) if t in tables]
            holds_queue = "SELECT " + " OR ".join(
                f"EXISTS (SELECT 1 FROM {table} WHERE queue = :queue)" for table in holding
            )
            if conn.execute(holds_queue, {"queue": queue}).fetchone()[0]:
                return
            held_queues = " UNION ".join(f"SELECT queue FROM {table}" for table in holding)
            held = sorted(name for (name,) in conn.execute(held_queues))
    except sqlite3.Error as error:
        raise OutboxError(f"cannot open the queue file {path}: {error}") from error
    if held:
        raise UsageError(
            f"the queue file {path} holds no queue named {queue!r}, only "
            f"{', '.join(map(repr, held))} (from the queue URL {url!r}; choose one with "
            "?queue=<name>)"
        )


def run_dlq_command(args: argparse.Namespace) -> int:
    url = resolve(queue=args.queue).queue
    where = redact_queue_url(url)
    store = open_store(url)
    try:
        if args.dlq_command == "show":
            return run_show(store, where, args.sequence_number, sys.stdout, payload=args.payload)
        selection = Selection(args.reason, args.thread, args.older_than, args.limit)
        if args.dlq_command == "list":
            return run_list(store, where, selection, sys.stdout)
        if args.dlq_command == "replay":
            return run_replay(store, where, selection, sys.stdout, sys.stderr, dry_run=args.dry_run)
        if not (selection.narrowed or args.all):
            raise UsageError(
                "purge deletes dead letters for good: narrow it with --reason, --thread, "
                "--older-than or --limit, or pass --all"
            )
        return run_purge(store, where, selection, sys.stdout, sys.stderr, dry_run=args.dry_run)
    finally:
        store.close()
