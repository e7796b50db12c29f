"""How an error becomes a reason: one line a log, a metric label and a client can carry."""

from __future__ import annotations


def error_reason(exc: BaseException, limit: int = 300) -> str:
    """The last line of an error's text (Ray wraps the cause in a remote traceback; the cause's
    own message is its last line), or its type when it has no text."""
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the original
    text = str(cause).strip().splitlines()
    return text[-1][:limit] if text else type(cause).__name__
