"""`KVReceiver`: the decode side of one request's KV transfer.

The decode replica owns the pages (it allocated them for the prompt); the receiver only
describes them to the prefill stages, holds one first-token metadata slot, and tracks what
each stage reported. It succeeds when every stage has delivered and the first-token record is
in its slot; it fails on the first stage failure, on its timeout, or when a prefill peer dies.
"""

from __future__ import annotations

import logging
import threading
import time

from engine.kv_cache import KVLayerRegion
from transport.endpoint import TransferEndpoint
from transport.metadata import SLOT_NBYTES, FirstToken
from transport.poll import KVPoll, PollState
from transport.receiver_info import KVLayout, LayerAddress, MetadataSlot, ReceiverInfo

log = logging.getLogger(__name__)


class KVReceiver:
    """Publishes where one request's KV goes and learns, per stage, whether it arrived."""

    def __init__(
        self,
        endpoint: TransferEndpoint,
        *,
        rid: str,
        room: int,
        regions: list[KVLayerRegion],
        layout: KVLayout,
        page_indices: list[int],
        num_stages: int,
    ) -> None:
        self.endpoint = endpoint
        self.rid = rid
        self.room = room
        self.num_stages = num_stages
        self._state = PollState(KVPoll.Bootstrapping)
        self._slot: int | None = endpoint.metadata.acquire()
        self._info = ReceiverInfo(
            rid=rid,
            room=room,
            session_id=endpoint.session_id,
            layout=layout,
            layers=tuple(LayerAddress.from_region(r) for r in regions),
            page_indices=tuple(page_indices),
            metadata=MetadataSlot(
                address=endpoint.metadata.address(self._slot), nbytes=SLOT_NBYTES
            ),
            cuda_ipc=endpoint.cuda_ipc_offer(regions),
        )
        self._delivered: set[int] = set()
        self._reported: set[int] = set()
        self._peers: dict[int, str] = {}
        self._lock = threading.Lock()
        self._first_token: FirstToken | None = None
        self._created = time.monotonic()

    @property
    def failure_reason(self) -> str | None:
        return self._state.reason

    @property
    def first_token(self) -> FirstToken | None:
        """The last stage's first token, once the receiver has succeeded."""
        return self._first_token

    def publish(self) -> ReceiverInfo:
        """The info to hand the prefill replica; from here on the receiver waits for stages."""
        if self._state.state is KVPoll.Bootstrapping:
            self._state.advance_unless_failed(KVPoll.WaitingForInput)
        return self._info

    def watch_stage(self, stage: int, session: str) -> None:
        """Probe a prefill stage's session so that its death fails this request promptly."""
        with self._lock:
            if stage in self._peers or self._state.state in (KVPoll.Success, KVPoll.Failed):
                return
            self._peers[stage] = session
        self.endpoint.liveness.watch(session)

    def on_stage_result(self, stage: int, ok: bool, reason: str | None = None) -> None:
        """A stage reports its write finished (`ok`) or failed; repeats are ignored."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} outside 0..{self.num_stages - 1}")
        with self._lock:
            if stage in self._reported:
                return
            self._reported.add(stage)
            if ok:
                self._delivered.add(stage)
            complete = len(self._delivered) == self.num_stages
        if not ok:
            self._fail(f"prefill stage {stage} failed: {reason or 'no reason given'}")
            return
        if self._state.state is KVPoll.WaitingForInput:
            self._state.advance_unless_failed(KVPoll.Transferring)
        if complete:
            self._complete()

    def poll(self) -> KVPoll:
        """The current state, after applying the receive timeout and the peers' liveness."""
        state = self._state.state
        if state in (KVPoll.Success, KVPoll.Failed):
            return state
        waited = time.monotonic() - self._created
        if waited > self.endpoint.config.receive_timeout_s:
            self._fail(f"receive timeout: not every stage delivered after {waited:.1f}s")
        else:
            for session in self._peer_sessions():
                reason = self.endpoint.liveness.dead_reason(session)
                if reason is not None:
                    self._fail(reason)
                    break
        return self._state.state

    @property
    def writes_may_land(self) -> bool:
        """Whether a stage's write might still land in this request's pages.

        After a failure, a stage that never reported may still be writing: the decode replica
        must keep the pages out of reuse until every stage reported or `transfer_timeout_s`
        (which also bounds Mooncake's own retries) has passed since the failure.
        """
        state = self._state.state
        if state is KVPoll.Success:
            return False
        with self._lock:
            all_reported = len(self._reported) == self.num_stages
        if state is not KVPoll.Failed or all_reported:
            return not all_reported
        return time.monotonic() - self._state.since < self.endpoint.config.transfer_timeout_s

    def abort(self, reason: str = "aborted") -> None:
        """Fail unless already finished and release what the receiver holds. Idempotent."""
        self._fail(reason)
        self.release()

    def release(self) -> None:
        """Give back the metadata slot and stop watching peers (pages belong to the caller)."""
        with self._lock:
            slot, self._slot = self._slot, None
            peers, self._peers = list(self._peers.values()), {}
        if slot is not None:
            self.endpoint.metadata.release(slot)
        for session in peers:
            self.endpoint.liveness.unwatch(session)

    def _complete(self) -> None:
        with self._lock:
            slot = self._slot
        record = None if slot is None else self.endpoint.metadata.read(slot, self.room)
        if record is None:
            self._fail("every stage delivered but the first-token record is missing")
            return
        self._first_token = record
        if self._state.advance_unless_failed(KVPoll.Success):
            self.release()

    def _peer_sessions(self) -> list[str]:
        with self._lock:
            return list(self._peers.values())

    def _fail(self, reason: str) -> None:
        if self._state.fail(reason):
            log.warning(
                "KV receiver failed: %s", reason, extra={"rid": self.rid, "room": self.room}
            )
