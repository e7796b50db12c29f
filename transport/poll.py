"""`KVPoll`, the state every transfer participant reports, and the transitions each may make.

The numeric order matters: consensus takes the minimum over all ranks, so `Failed` (0) wins
over everything and a request is only as far along as its slowest rank.
"""

from __future__ import annotations

import threading
import time
from enum import IntEnum


class KVPoll(IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class IllegalTransition(RuntimeError):
    """A participant tried a move its state machine forbids: a bug in the caller, never ignored."""


# Both sides walk the same forward path; failure is reachable from every non-terminal state.
_FORWARD: dict[KVPoll, frozenset[KVPoll]] = {
    KVPoll.Bootstrapping: frozenset({KVPoll.WaitingForInput, KVPoll.Failed}),
    KVPoll.WaitingForInput: frozenset({KVPoll.Transferring, KVPoll.Failed}),
    KVPoll.Transferring: frozenset({KVPoll.Success, KVPoll.Failed}),
    KVPoll.Success: frozenset(),
    KVPoll.Failed: frozenset(),
}

TERMINAL = frozenset({KVPoll.Success, KVPoll.Failed})


def is_legal(current: KVPoll, new: KVPoll) -> bool:
    return new in _FORWARD[current]


class PollState:
    """One participant's `KVPoll` with its failure reason, safe to move from several threads.

    Transfers finish on pool threads while the scheduler polls and aborts on its own, so
    every move happens under a lock and a late move against a terminal state is decided here,
    in one place: failing an already failed participant is a no-op; anything else is illegal.
    """

    def __init__(self, initial: KVPoll = KVPoll.Bootstrapping) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = initial
        self._reason: str | None = None
        self._since = time.monotonic()

    @property
    def state(self) -> KVPoll:
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the participant failed; None unless `Failed`."""
        return self._reason

    @property
    def since(self) -> float:
        """`time.monotonic()` when the current state was entered."""
        return self._since

    def advance(self, new: KVPoll) -> None:
        """Move forward to `new`; raises `IllegalTransition` for any move the table forbids."""
        if new is KVPoll.Failed:
            raise IllegalTransition("use fail(reason) to fail a participant")
        with self._lock:
            if not is_legal(self._state, new):
                raise IllegalTransition(f"{self._state.name} -> {new.name}")
            self._state = new
            self._since = time.monotonic()
            self._changed.notify_all()

    def advance_unless_failed(self, new: KVPoll) -> bool:
        """Like `advance`, but a participant failed meanwhile (abort, timeout) stays failed.

        Returns whether the move happened. Used where a completion races with a failure.
        """
        with self._lock:
            if self._state is KVPoll.Failed:
                return False
            if not is_legal(self._state, new):
                raise IllegalTransition(f"{self._state.name} -> {new.name}")
            self._state = new
            self._since = time.monotonic()
            self._changed.notify_all()
            return True

    def fail(self, reason: str) -> bool:
        """Fail with `reason` from any non-terminal state; returns False if already terminal."""
        with self._lock:
            if self._state in TERMINAL:
                return False
            self._state = KVPoll.Failed
            self._reason = reason
            self._since = time.monotonic()
            self._changed.notify_all()
            return True

    def wait_while(self, state: KVPoll, timeout_s: float) -> KVPoll:
        """Block until the state is no longer `state` or `timeout_s` passed; the state then."""
        with self._changed:
            self._changed.wait_for(lambda: self._state is not state, timeout_s)
            return self._state
