"""Fault hook: make one endpoint's KV writes and peer probes fail on purpose (tests, chaos soaks).

Off unless a test or a soak turns it on, and never from a config, so nothing turns it on by
accident; while off, the endpoint reads one boolean per write batch and per probe. An injected
failure looks to everything above the Mooncake call exactly like Mooncake's own (rc -1, nothing
sent), so it takes the same failure and repair path as a real one.
"""

from __future__ import annotations

import threading

INJECTED_RC = -1  # what Mooncake's batch writes return when they fail


class TransportFaults:
    """Faults to inject into one `TransferEndpoint`'s writes and probes. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing_writes = 0
        self._unreachable: set[str] = set()
        self._all_unreachable = False
        self.active = False  # any fault set: all the endpoint reads while the hook is off

    def fail_next_writes(self, count: int) -> None:
        """The next `count` KV batch writes of the endpoint, to any peer, fail with rc -1
        instead of reaching Mooncake. Replaces any count still pending; 0 cancels it."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._lock:
            self._failing_writes = count
            self._update()

    def set_unreachable(self, session: str | None, unreachable: bool) -> None:
        """While set, writes and probes to `session` (every peer for None) fail with rc -1."""
        with self._lock:
            if session is None:
                self._all_unreachable = unreachable
            elif unreachable:
                self._unreachable.add(session)
            else:
                self._unreachable.discard(session)
            self._update()

    def clear(self) -> None:
        """Turn every fault off."""
        with self._lock:
            self._failing_writes = 0
            self._unreachable.clear()
            self._all_unreachable = False
            self._update()

    def unreachable(self, session: str) -> bool:
        with self._lock:
            return self._all_unreachable or session in self._unreachable

    def take_write_failure(self, session: str) -> bool:
        """Whether this batch write to `session` is to fail (it uses up one failing write)."""
        with self._lock:
            if self._all_unreachable or session in self._unreachable:
                return True
            if self._failing_writes == 0:
                return False
            self._failing_writes -= 1
            self._update()
            return True

    def _update(self) -> None:
        self.active = bool(self._failing_writes or self._unreachable or self._all_unreachable)
