"""Retry of ingestion attempts: which failures are transient, backoff, time limits.

Transient failures (throttling, 5xx, timeouts, connection loss, and settings errors an
operator can fix without touching the data) are retried with exponential backoff and full
jitter (tenacity), within an attempt count, a time budget and, at shutdown, the shutdown
deadline. Permanent failures (Kusto rejected the data itself) are raised at once, so the
worker can split the batch and find the events Kusto refuses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from azure.kusto.data.exceptions import (
    KustoApiError,
    KustoNetworkError,
    KustoServiceError,
    KustoThrottlingError,
)
from langgraph.checkpoint.kusto.kusto import http_status
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_RETRY_BUDGET = 120.0
DEFAULT_INITIAL_BACKOFF = 0.5
DEFAULT_MAX_BACKOFF = 30.0
DEFAULT_ATTEMPT_TIMEOUT = 60.0

ATTEMPT_POLL_SECONDS = 0.1
"""How often a waiting attempt looks at the shutdown deadline, which may appear mid-attempt."""

DETAIL_LIMIT = 1000
"""Characters of Kusto's error text kept in a failure (it ends up in dead-letter descriptions)."""

# Kusto error codes that say the request cannot succeed whatever the data (wrong database,
# table or mapping). Retrying them is right: once an operator fixes the settings the same
# events ingest fine, whereas splitting the batch would dead-letter every event.
CONFIGURATION_CODES = frozenset(
    {
        "BadRequest_EntityNotFound",
        "BadRequest_DatabaseNotExist",
        "BadRequest_TableNotExist",
        "BadRequest_MappingReferenceWasNotFound",
        "BadRequest_StreamingIngestionPolicyNotEnabled",
        "Forbidden",
        "Unauthorized",
    }
)
TOO_LARGE_CODES = frozenset({"BadRequest_StreamingIngestionRequestTooLarge"})


class FailureKind(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Cause(StrEnum):
    """Why an attempt failed; a metric attribute and a log field."""

    THROTTLED = "throttled"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    NETWORK = "network"
    CONFIGURATION = "configuration"
    UNEXPECTED = "unexpected"
    REJECTED = "rejected"
    TOO_LARGE = "too_large"


@dataclass(frozen=True, slots=True)
class IngestFailure:
    """A classified ingestion error. ``detail`` is Kusto's text: it may quote the data, so
    it goes into dead-letter descriptions (which sit next to the data) but never into logs."""

    kind: FailureKind
    cause: Cause
    status: int | None = None
    code: str | None = None
    detail: str = ""

    @property
    def transient(self) -> bool:
        return self.kind is FailureKind.TRANSIENT

    def summary(self) -> str:
        """Status and code only: safe for logs."""
        parts = [f"HTTP {self.status}" if self.status else None, self.code]
        return " ".join(p for p in parts if p) or self.cause.value

    def log_fields(self) -> dict[str, str]:
        """What a log line says of the failure. Kusto's text is there only for a
        configuration error: it names the missing database, table, mapping or permission
        an operator must fix, and quotes no data."""
        fields = {"cause": self.cause.value, "error": self.summary()}
        if self.cause is Cause.CONFIGURATION and self.detail:
            fields["kusto_message"] = self.detail
        return fields


class AttemptTimeoutError(TimeoutError):
    """An ingestion attempt did not answer within its time limit."""


class PermanentIngestError(Exception):
    """Kusto refused the rows for a reason retrying cannot fix."""

    def __init__(self, failure: IngestFailure) -> None:
        super().__init__(failure.summary())
        self.failure = failure


class RetryGaveUp(Exception):
    """Transient failures outlasted the attempts, the budget or the shutdown deadline."""

    def __init__(self, failure: IngestFailure, attempts: int, why: str) -> None:
        super().__init__(f"{why} after {attempts} attempt(s); last error {failure.summary()}")
        self.failure = failure
        self.attempts = attempts
        self.why = why


class _ShutdownInterrupt(Exception):
    """A backoff wait could not end before the shutdown deadline."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    budget: float = DEFAULT_RETRY_BUDGET
    """Seconds from the first attempt after which no further attempt starts."""
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("budget", "initial_backoff", "max_backoff", "attempt_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def classify(exc: BaseException) -> IngestFailure:
    """Sort an ingestion error into transient (retry) or permanent (isolate and dead-letter)."""
    if isinstance(exc, AttemptTimeoutError):
        return IngestFailure(FailureKind.TRANSIENT, Cause.TIMEOUT, detail=str(exc))
    if isinstance(exc, KustoThrottlingError):
        return IngestFailure(FailureKind.TRANSIENT, Cause.THROTTLED, 429)
    if isinstance(exc, KustoNetworkError):
        # requests' timeouts and dropped connections both surface as this.
        return IngestFailure(FailureKind.TRANSIENT, Cause.NETWORK, detail=str(exc))
    if isinstance(exc, KustoServiceError):
        return _classify_service_error(exc)
    if isinstance(exc, TimeoutError):
        return IngestFailure(FailureKind.TRANSIENT, Cause.TIMEOUT, detail=str(exc))
    if isinstance(exc, ConnectionError):
        return IngestFailure(FailureKind.TRANSIENT, Cause.NETWORK, detail=str(exc))
    # An error nobody explained is retried, never dead-lettered: if it persists, the queue's
    # max delivery count moves the messages aside with a reason an operator can replay.
    return IngestFailure(
        FailureKind.TRANSIENT,
        Cause.UNEXPECTED,
        code=type(exc).__name__,
        detail=_truncate(f"{type(exc).__name__}: {exc}"),
    )


def _classify_service_error(exc: KustoServiceError) -> IngestFailure:
    status = http_status(exc)
    api = exc.get_api_error() if isinstance(exc, KustoApiError) else None
    code = api.code if api is not None else None
    detail = _truncate((api.description or api.message or "") if api is not None else str(exc))

    def failure(kind: FailureKind, cause: Cause) -> IngestFailure:
        return IngestFailure(kind, cause, status, code, detail)

    if status == 429:
        return failure(FailureKind.TRANSIENT, Cause.THROTTLED)
    if status is not None and (status >= 500 or status == 408):
        return failure(FailureKind.TRANSIENT, Cause.SERVER_ERROR)
    if status in (401, 403, 404) or code in CONFIGURATION_CODES:
        return failure(FailureKind.TRANSIENT, Cause.CONFIGURATION)
    if status == 413 or code in TOO_LARGE_CODES:
        return failure(FailureKind.PERMANENT, Cause.TOO_LARGE)
    if api is not None and api.permanent is False:
        return failure(FailureKind.TRANSIENT, Cause.SERVER_ERROR)
    if status is not None and 400 <= status < 500:
        return failure(FailureKind.PERMANENT, Cause.REJECTED)
    return failure(FailureKind.TRANSIENT, Cause.UNEXPECTED)


def _truncate(text: str) -> str:
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def retry_after(exc: BaseException | None) -> float | None:
    """The server's ``Retry-After`` in seconds, if a throttling answer carried one."""
    response = exc.get_raw_http_response() if isinstance(exc, KustoServiceError) else None
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from Kusto; fall back to our own backoff


class _FullJitterAtLeastRetryAfter(wait_base):
    """AWS "full jitter" (spreads replicas that failed together), never shorter than what
    the server asked for with ``Retry-After``."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._jitter = wait_random_exponential(
            multiplier=policy.initial_backoff, max=policy.max_backoff
        )
        self._max = policy.max_backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self._jitter(retry_state)
        outcome = retry_state.outcome
        asked = retry_after(outcome.exception() if outcome is not None else None)
        return max(wait, min(asked, self._max)) if asked is not None else wait


class _StopBeforeDeadline(stop_base):
    """Give up rather than start a wait that would end after the shutdown deadline."""

    def __init__(self, deadline: Callable[[], float | None]) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        deadline = self._deadline()
        return deadline is not None and time.monotonic() + retry_state.upcoming_sleep >= deadline


def run_with_timeout(
    call: Callable[[], None], timeout: float, deadline: Callable[[], float | None]
) -> None:
    """Run ``call`` in a daemon thread; give up after ``timeout`` or at the deadline.

    A daemon thread rather than an executor: an attempt that never answers must not hold
    the process at exit. The abandoned attempt may still land later; that is harmless,
    because readers drop repeated rows by ``RowId``.
    """
    done = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    threading.Thread(target=target, name="ingest-attempt", daemon=True).start()
    while not done.wait(ATTEMPT_POLL_SECONDS):
        now = time.monotonic()
        stop_at = deadline()
        if now - started >= timeout or (stop_at is not None and now >= stop_at):
            raise AttemptTimeoutError(f"no answer within {now - started:.1f}s")
    if errors:
        raise errors[0]


def call_with_retry(
    attempt: Callable[[], None],
    policy: RetryPolicy,
    *,
    deadline: Callable[[], float | None],
    stop_requested: threading.Event,
    on_retry: Callable[[IngestFailure, int, float], None],
) -> int:
    """Call ``attempt`` until it succeeds; returns the number of attempts.

    Raises ``PermanentIngestError`` at the first permanent failure and ``RetryGaveUp`` when
    transient failures outlast the policy or the shutdown ``deadline`` (monotonic seconds,
    ``None`` while no shutdown is under way). ``on_retry(failure, attempt_number, wait)``
    runs before each backoff.
    """

    def backoff(seconds: float) -> None:
        ends = time.monotonic() + seconds
        # Wake when a shutdown starts: a long wait begun earlier may not fit before it.
        if stop_requested.wait(seconds):
            stop_at = deadline()
            if stop_at is not None and ends > stop_at:
                raise _ShutdownInterrupt
            time.sleep(max(0.0, ends - time.monotonic()))

    last_failure: IngestFailure | None = None

    def before_sleep(retry_state: RetryCallState) -> None:
        nonlocal last_failure
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if error is not None:
            last_failure = classify(error)
            on_retry(last_failure, retry_state.attempt_number, retry_state.upcoming_sleep)

    retrying = Retrying(
        retry=retry_if_exception(lambda exc: classify(exc).transient),
        stop=(
            stop_after_attempt(policy.max_attempts)
            | stop_before_delay(policy.budget)
            | _StopBeforeDeadline(deadline)
        ),
        wait=_FullJitterAtLeastRetryAfter(policy),
        sleep=backoff,
        before_sleep=before_sleep,
    )
    attempts = 0

    def counted() -> None:
        nonlocal attempts
        attempts += 1
        attempt()

    try:
        retrying(counted)
    except RetryError as exc:
        error = exc.last_attempt.exception()
        assert error is not None  # RetryError only follows a failed attempt
        if attempts >= policy.max_attempts:
            why = "attempts exhausted"
        elif deadline() is not None:
            why = "shutdown deadline"
        else:
            why = "retry budget spent"
        raise RetryGaveUp(classify(error), attempts, why) from error
    except _ShutdownInterrupt:
        assert last_failure is not None  # a backoff only follows a failed attempt
        raise RetryGaveUp(last_failure, attempts, "shutdown deadline") from None
    except Exception as exc:
        # tenacity re-raises only what its retry predicate refused: a permanent failure.
        raise PermanentIngestError(classify(exc)) from exc
    return attempts
