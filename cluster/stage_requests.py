"""One rank's view of the prefill requests it holds: a sender and a page list per rid.

A rank never decides anything on its own. It creates state when the controller admits a
request, applies the consensus vector it computed together with every other rank
(`cluster.consensus`), drops what the controller tells it to drop, and reconciles against the
controller's tracked set so that nothing outlives the controller's interest in it (the orphan
bug class of SGLang's design).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from transport.metadata import FirstToken
from transport.poll import KVPoll
from transport.receiver_info import ReceiverInfo

log = logging.getLogger(__name__)


class SenderLike(Protocol):
    """What a rank needs of a `KVSender` (tests script their own)."""

    def poll(self) -> KVPoll: ...
    def set_receiver_info(self, info: ReceiverInfo) -> None: ...
    def send(self, page_indices: list[int], first_token: FirstToken | None = None) -> None: ...
    def send_first_token(self, first_token: FirstToken) -> None: ...
    def wait_settled(self, timeout_s: float) -> None: ...
    def abort(self, reason: str = "aborted") -> None: ...
    @property
    def failure_reason(self) -> str | None: ...


class StageRequests:
    """Senders and pages of the requests one rank holds, keyed by rid."""

    def __init__(
        self,
        make_sender: Callable[[str, int], SenderLike],
        pp_rank: int = 0,
        on_transferred: Callable[[SenderLike], None] | None = None,
    ) -> None:
        self._make_sender = make_sender
        self._on_transferred = on_transferred
        self.pp_rank = pp_rank
        self.senders: dict[str, SenderLike] = {}
        self.pages: dict[str, list[int]] = {}
        self.ready: set[str] = set()
        self.last_tick = -1

    # -- what the controller tells every rank -------------------------------------------------

    def admit(self, rid: str, room: int) -> None:
        if rid not in self.senders:
            self.senders[rid] = self._make_sender(rid, room)

    def set_receiver_info(self, rid: str, info: ReceiverInfo) -> None:
        sender = self.senders.get(rid)
        if sender is not None:  # a late info for a request already dropped is ignored
            sender.set_receiver_info(info)

    def assign_pages(self, rid: str, pages: Sequence[int]) -> None:
        """The controller scheduled `rid`: its pages here, and it counts as ready (the owner
        decided so), not as bootstrapping."""
        if rid in self.senders:
            self.pages[rid] = list(pages)
            self.ready.add(rid)

    def send(self, rid: str, first_token: FirstToken | None = None) -> None:
        sender = self.senders.get(rid)
        if sender is None:
            return
        if sender.poll() is KVPoll.Bootstrapping:  # never by construction: fail it, loudly
            sender.abort("KV computed before this rank had the receiver info")
            return
        sender.send(self.pages.get(rid, []), first_token)

    def wait_transfers(self, rids: Iterable[str], timeout_s: float) -> None:
        """Wait, at most `timeout_s` in all, for the writes of `rids` still running here to
        end, so the tick that polls them next sees them finished instead of a tick later.
        Call it without the rank's lock: the writes end on other threads."""
        deadline = time.monotonic() + timeout_s
        for rid in rids:
            sender = self.senders.get(rid)
            left = deadline - time.monotonic()
            if sender is None or left <= 0:
                continue
            if sender.poll() is KVPoll.Transferring:
                sender.wait_settled(left)

    def send_first_token(self, rid: str, first_token: FirstToken | None) -> None:
        """The last stage's sampled token for a request whose KV `send` already started."""
        sender = self.senders.get(rid)
        if sender is None:
            return
        if first_token is None:  # the forward sampled nothing for it: fail, never hang
            sender.abort("the last stage sampled no first token")
        else:
            sender.send_first_token(first_token)

    def drop(self, rid: str, reason: str) -> None:
        """Forget `rid`: abort its sender and release its pages. Idempotent."""
        sender = self.senders.pop(rid, None)
        if sender is not None:
            sender.abort(reason)
        self.pages.pop(rid, None)
        self.ready.discard(rid)

    def reconcile(self, tracked: Iterable[str]) -> list[str]:
        """Drop every rid the controller no longer tracks; returns the rids dropped."""
        keep = set(tracked)
        stale = [rid for rid in self.senders if rid not in keep]
        for rid in stale:
            log.warning("dropping untracked request", extra={"rid": rid, "pp_rank": self.pp_rank})
            self.drop(rid, "no longer tracked by the controller")
        return stale

    def delivered(self, rid: str) -> None:
        """Every rank agreed the KV of `rid` arrived: count it, then forget it."""
        sender = self.senders.get(rid)
        if sender is not None and self._on_transferred is not None:
            self._on_transferred(sender)
        self.drop(rid, "transferred")

    # -- gauges -------------------------------------------------------------------------------

    def queue_sizes(self) -> dict[str, int]:
        """What this rank holds now: bootstrap (not ready everywhere yet), waiting (ready, KV
        not sent) and inflight (KV on its way)."""
        sizes = {"bootstrap": 0, "waiting": 0, "inflight": 0}
        for rid, sender in self.senders.items():
            if sender.poll() is KVPoll.Transferring:
                sizes["inflight"] += 1
            elif rid in self.ready:
                sizes["waiting"] += 1
            else:
                sizes["bootstrap"] += 1
        return sizes

    @property
    def pages_in_use(self) -> int:
        return sum(len(p) for p in self.pages.values())
