"""Group commit for the ``asyncio`` senders.

LangGraph saves a step's writes and the next checkpoint from concurrent tasks, so sends
arrive together; a backend commits a whole group in one operation (one append to the SQLite
queue's spool, one Service Bus round trip) and each caller still awaits its own result.
If a group fails, each send in it is retried alone, so one caller's error is never
another's; sends the failed group did deliver are dropped as duplicates by message id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from . import OutboxMessage

Send = Callable[[Sequence[OutboxMessage]], Awaitable[None]]
Group = list[tuple[Sequence[OutboxMessage], "asyncio.Future[None]"]]
"""The sends of one group, each with the future its caller awaits."""

_BACKGROUND: set[asyncio.Task[None]] = set()
"""Strong references to running commits (the loop keeps only weak ones)."""


class SendGroups:
    """Sends waiting to go out together, in the order they were made."""

    def __init__(self) -> None:
        self._waiting: Group = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, messages: Sequence[OutboxMessage]) -> asyncio.Future[None]:
        """Queue a send; its caller awaits the future."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((messages, done))
        return done

    def take(self) -> tuple[Group, list[OutboxMessage]]:
        """Everything waiting, as a group and its messages in order."""
        group, self._waiting = self._waiting, []
        return group, [message for messages, _ in group for message in messages]


def nothing_to_send() -> asyncio.Future[None]:
    """What a send of no messages returns: a future already done."""
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def settle(group: Group, error: BaseException | None) -> None:
    for _, done in group:
        # Its caller was cancelled (the messages still went out), or its loop has ended
        # (the future could not take a result).
        if done.done() or done.get_loop().is_closed():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


async def commit(group: Group, messages: list[OutboxMessage], send: Send) -> None:
    """Send a group's messages in one call and settle every caller with the outcome."""
    try:
        await send(messages)
    except asyncio.CancelledError:
        for _, done in group:
            done.cancel()
        raise
    except Exception as error:
        await failed(group, error, send)
    else:
        settle(group, None)


async def failed(group: Group, error: Exception, send_alone: Send) -> None:
    """Settle a group whose commit raised ``error``: a lone send gets the error, the sends
    of a larger group are each retried on their own."""
    if len(group) == 1:
        settle(group, error)
        return
    for messages, done in group:
        try:
            await send_alone(messages)
        except Exception as alone:
            settle([(messages, done)], alone)
        else:
            settle([(messages, done)], None)


def in_background(coroutine: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coroutine)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
