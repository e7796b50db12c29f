"""Whether a replica can do its job: what its Serve health check and the readiness view read.

A replica is not ready while a part of it is being rebuilt, while it cannot reach a peer it
must write to, or while every request it finished lately failed inside it (a state a restart
repairs, such as a transport that stopped working). Each role builds its `Readiness` from its
own facts; Serve's `check_health` raises on it (three failures in a row and Serve replaces the
replica), and the ingress gathers every role's into `/ready` and `/health`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Readiness:
    """One part's verdict: ready, or the reasons it is not (each names what and why)."""

    part: str
    reasons: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "reasons": list(self.reasons), **self.detail}


class FailureStreak:
    """Internal failures since the last success.

    `threshold` in a row, the newest less than `window_s` ago, means the replica cannot serve:
    a success ends the streak, and so does a quiet `window_s` (a restart is a repair; a streak
    kept forever with no traffic to disprove it would only hold a healthy replica down).
    Failures that are not the replica's own (aborts, a peer that died, bad input) are not
    recorded here at all.
    """

    def __init__(self, threshold: int = 5, window_s: float = 60.0) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self._count = 0
        self._last_reason: str | None = None
        self._last_at = 0.0
        self._lock = threading.Lock()

    def succeeded(self) -> None:
        with self._lock:
            self._count = 0

    def failed(self, reason: str) -> None:
        with self._lock:
            self._count += 1
            self._last_reason = reason
            self._last_at = time.monotonic()

    def verdict(self) -> str | None:
        """Why the replica cannot serve, or None."""
        with self._lock:
            if self._count < self.threshold:
                return None
            if time.monotonic() - self._last_at > self.window_s:
                self._count = 0
                return None
            return f"the last {self._count} requests failed inside it (last: {self._last_reason})"
