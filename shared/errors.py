"""Typed errors of the event contract."""

from __future__ import annotations


class EnvelopeError(ValueError):
    """Bytes that are not a valid event: the worker dead-letters them with ``reason``."""

    reason = "MalformedEnvelope"


class UnknownEnvelopeVersionError(EnvelopeError):
    """An envelope written by a newer (or unknown) version of the contract."""

    reason = "UnknownEnvelopeVersion"


class IncompleteEventError(EnvelopeError):
    """The parts of a chunked event never all arrived."""

    reason = "IncompleteChunkGroup"
