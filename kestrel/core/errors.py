"""One exception hierarchy for the engine.

The service maps each class to one HTTP status (NotFound → 404, InvalidInput → 422,
Conflict → 409), so every bad input reaches a client as a 4xx that names the problem instead of a
500. Messages are written for the person who made the mistake: say what was wrong and, where we
can, what would be right.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KestrelError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "kestrel_error"

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidInputError(KestrelError, ValueError):
    """The caller asked for something malformed or out of range."""

    code = "invalid_input"


class NotFoundError(KestrelError, LookupError):
    """A named thing (model, layer, run, file, field) does not exist."""

    code = "not_found"


class ConflictError(KestrelError):
    """The request collides with existing state (an id already taken)."""

    code = "conflict"


class CancelledError(KestrelError):
    """A long operation stopped because its caller asked it to (``should_stop`` returned True)."""

    code = "cancelled"


class HubUnavailableError(KestrelError):
    """A hub model or dataset the service may use cannot be had now: it is not in the local cache
    and the hub is offline by setting (``HF_HUB_OFFLINE``) or did not answer. Not the caller's
    mistake, and not a missing thing: a dependency that failed (HTTP 424)."""

    code = "hub_unavailable"


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Suggestions for a misspelt name, best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def not_found(kind: str, name: str, candidates: Iterable[str] = ()) -> NotFoundError:
    """A NotFoundError whose message suggests close matches, if there are any."""
    suggestions = close_matches(name, candidates)
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return NotFoundError(f"unknown {kind} {name!r}{hint}", details={kind: name, "suggestions": suggestions})
