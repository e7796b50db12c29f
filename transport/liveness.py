"""Peer liveness: a dead or unreachable peer fails the transfers that wait on it, in bounded time.

A sender waiting for input, or a receiver waiting for stages, would otherwise notice a dead
peer only when it next writes (or never). One thread per process probes every peer that some
transfer is waiting on, every `interval_s`, with Mooncake's own handshake probe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeerLiveness:
    """Reference-counted watch list of peer sessions and what the last probes said of them."""

    def __init__(self, probe: Callable[[str], int], interval_s: float) -> None:
        self._probe = probe
        self._interval_s = interval_s
        # A probe that hangs (unroutable host) must not hide a peer's death forever.
        self._stale_after_s = max(5.0, 3 * interval_s)
        self._watchers: Counter[str] = Counter()
        self._dead: dict[str, str] = {}
        self._last_ok: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-liveness", daemon=True)
        self._thread.start()

    def watch(self, session: str) -> None:
        with self._lock:
            self._watchers[session] += 1
            self._last_ok.setdefault(session, time.monotonic())

    def unwatch(self, session: str) -> None:
        with self._lock:
            self._watchers[session] -= 1
            if self._watchers[session] <= 0:
                del self._watchers[session]
                self._dead.pop(session, None)
                self._last_ok.pop(session, None)

    def dead_reason(self, session: str) -> str | None:
        """Why `session` counts as dead, or None while it answers probes."""
        with self._lock:
            if session in self._dead:
                return self._dead[session]
            last = self._last_ok.get(session)
        if last is not None and time.monotonic() - last > self._stale_after_s:
            return f"peer {session} unresponsive for {self._stale_after_s:.0f}s"
        return None

    @property
    def watched(self) -> set[str]:
        with self._lock:
            return set(self._watchers)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for session in self.watched:
                rc = self._probe(session)
                with self._lock:
                    if session not in self._watchers:
                        continue
                    if rc == 0:
                        self._last_ok[session] = time.monotonic()
                    elif session not in self._dead:
                        self._dead[session] = f"peer {session} unreachable (probe rc={rc})"
                        log.warning("peer unreachable", extra={"session": session, "rc": rc})
