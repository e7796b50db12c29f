"""`KVSender`: one prefill stage's side of one request's KV transfer.

Life: `Bootstrapping` until valid receiver info arrives, `WaitingForInput` until the stage has
computed the request's KV and calls `send`, `Transferring` while the write runs, then `Success`
or `Failed` with a reason. `poll()` is where time passes: it applies the bootstrap and transfer
timeouts and the peer's liveness. `abort()` works from any state and is idempotent. Which mover
carries the bytes (Mooncake, or CUDA IPC on one node) is chosen with the receiver info and
changes nothing else.

Where the writes run: Mooncake's (and the fast path's general case) on the endpoint's pool,
which moves the state when they return. The fast path's common case is launched by `send`
itself, on the caller's thread and current stream (a stage: a side stream behind the forward
that computes the KV), with the first-token record submitted to Mooncake without waiting;
`poll()` (or `in_flight`) finds both finished (an event query and a status check, no thread
hop) and only then reports `Success`. The last stage may start its KV before its token is
sampled and add the token with `send_first_token`: the fast path then submits the record on
its own, the general path starts its write with it (the record last). A sender that fails or is
aborted with such a write still running hands it to the pool, which waits for it and then
gives back the metadata slot and the peer's mapping.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from engine.kv_cache import KVLayerRegion
from transport.cuda_ipc.mover import CudaIpcMover, IpcCopy
from transport.cuda_ipc.routes import PageRuns
from transport.endpoint import KVMover, PendingWrite, TransferEndpoint
from transport.metadata import SLOT_NBYTES, FirstToken
from transport.poll import KVPoll, PollState
from transport.receiver_info import (
    InvalidReceiverInfo,
    KVLayout,
    ReceiverInfo,
    validate_receiver_info,
)
from transport.segments import Segments, kv_segments

log = logging.getLogger(__name__)


@dataclass
class TransferStats:
    """What one finished write moved, for metrics.

    `seconds`: on the pool, the write's own time; for a write `send` launched, from `send` to
    the poll that found it finished (so it includes how often the caller polls).
    """

    nbytes: int = 0
    segments: int = 0
    seconds: float = 0.0
    mover: str = ""


class _Launched:
    """A write `send` launched itself: the IPC copy and the first-token record in flight."""

    def __init__(
        self,
        copy: IpcCopy | None,
        record: PendingWrite | None,
        slot: int | None,
        start: float,
        stats: TransferStats,
        awaiting_token: bool = False,
    ) -> None:
        self.copy = copy
        self.record = record
        self.slot = slot
        self.start = start
        self.stats = stats
        self.awaiting_token = awaiting_token  # the last stage's record follows (`send_first_token`)
        self.settled = False  # neither runs any more and both are given back
        self.handed_off = False  # the pool waits for it (the sender failed first)
        self.lock = threading.Lock()  # held while settling
        self.hand_off_lock = threading.Lock()


class KVSender:
    """Writes this stage's layers of one request into the decode replica's pages."""

    def __init__(
        self,
        endpoint: TransferEndpoint,
        *,
        rid: str,
        room: int,
        regions: list[KVLayerRegion],
        layout: KVLayout,
        is_last_stage: bool,
        pp_rank: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.rid = rid
        self.room = room
        self.regions = regions
        self.layout = layout
        self.is_last_stage = is_last_stage
        self.pp_rank = pp_rank
        self.stats = TransferStats()
        self._state = PollState(KVPoll.Bootstrapping)
        self._info: ReceiverInfo | None = None
        self._mover: KVMover | None = None
        # The mover again when it can also launch the write from `send` (no pool hop).
        self._launcher: CudaIpcMover | None = None
        self._watching: str | None = None
        self._watch_lock = threading.Lock()
        self._in_flight = False
        self._launched: _Launched | None = None
        # A general write `send` started without the last stage's token: it waits for it.
        self._pending: tuple[Segments, Any, float] | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def failure_reason(self) -> str | None:
        return self._state.reason

    @property
    def in_flight(self) -> bool:
        """A write is still running and reads this stage's pages: do not reuse them yet."""
        if self._in_flight and self._launched is not None:
            self._settle(block=False)
        return self._in_flight

    @property
    def receiver_info(self) -> ReceiverInfo | None:
        return self._info

    @property
    def mover(self) -> KVMover | None:
        """What carries this request's bytes, chosen with the receiver info."""
        return self._mover

    def poll(self) -> KVPoll:
        """The current state, after applying timeouts and the peer's liveness."""
        state = self._state.state
        if state in (KVPoll.Success, KVPoll.Failed):
            return state
        if state is KVPoll.Transferring and self._launched is not None and self._settle(False):
            return self._state.state
        waited = time.monotonic() - self._state.since
        config = self.endpoint.config
        if state is KVPoll.Bootstrapping and waited > config.bootstrap_timeout_s:
            self._fail(f"bootstrap timeout: no receiver info after {waited:.1f}s")
        elif state is KVPoll.Transferring and waited > config.transfer_timeout_s:
            self._fail(f"transfer timeout: KV write unfinished after {waited:.1f}s")
        elif self._watching is not None:
            reason = self.endpoint.liveness.dead_reason(self._watching)
            if reason is not None:
                self._fail(reason)
        return self._state.state

    def wait_settled(self, timeout_s: float) -> None:
        """Block while the write runs, at most `timeout_s`: the pool's write moves the state
        itself (woken at once); a write `send` launched is found finished by polling it."""
        deadline = time.monotonic() + timeout_s
        while self.poll() is KVPoll.Transferring:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._launched is not None:
                time.sleep(min(left, 2e-4))
            else:
                self._state.wait_while(KVPoll.Transferring, left)

    # -- verbs -------------------------------------------------------------------------------

    def set_receiver_info(self, info: ReceiverInfo) -> None:
        """Accept the decode side's info after validating it; invalid info fails the request."""
        if self._state.state is KVPoll.Failed:
            return
        if info.rid != self.rid or info.room != self.room:
            self._fail(f"receiver info for {info.rid}/{info.room}, not {self.rid}/{self.room}")
            return
        layers = range(self.regions[0].layer, self.regions[-1].layer + 1)
        try:
            validate_receiver_info(
                info,
                local_layout=self.layout,
                layers=layers,
                metadata_nbytes=SLOT_NBYTES if self.is_last_stage else None,
            )
        except InvalidReceiverInfo as exc:
            self._fail(f"invalid receiver info: {exc}")
            return
        mover = self._mover = self.endpoint.mover_for(info, self.regions)
        self._launcher = mover if isinstance(mover, CudaIpcMover) else None
        self._info = info
        with self._watch_lock:
            if self._state.advance_unless_failed(KVPoll.WaitingForInput):
                self._watching = info.session_id
                self.endpoint.liveness.watch(info.session_id)

    def send(self, page_indices: list[int], first_token: FirstToken | None = None) -> None:
        """Start writing K and V of `page_indices` (this stage's pages, in token order).

        Call it once the KV is queued on the current stream, computed or not: the write
        reads it only after (the copy queued behind it, or Mooncake after the stream's event). The
        last stage's first token comes here or, when it is sampled after the KV was queued,
        through `send_first_token`; the request succeeds only once both have landed. A sender
        failed meanwhile (abort, timeout, dead peer) ignores the call: the decision to drop
        the request is already made elsewhere.
        """
        start = time.perf_counter()
        if self._state.state is KVPoll.Failed:
            return
        # Raises IllegalTransition unless WaitingForInput; False if it failed meanwhile.
        if not self._state.advance_unless_failed(KVPoll.Transferring):
            return
        info, mover = self._info, self._mover
        assert info is not None and mover is not None  # WaitingForInput implies receiver info
        if len(page_indices) > len(info.page_indices):
            self._fail(
                f"request needs {len(page_indices)} pages, receiver offered {len(info.page_indices)}"
            )
            return
        awaiting_token = self.is_last_stage and first_token is None
        launcher = self._launcher
        if launcher is not None:
            try:
                runs = launcher.plan_pages(page_indices)
            except Exception as exc:
                self._fail(f"KV write to {info.session_id} could not start ({exc!r})")
                return
            if runs is not None:
                self._launch(info, launcher, runs, first_token, start, awaiting_token)
                return
        remote = {address.layer: address for address in info.layers}
        segments = kv_segments(
            self.regions,
            remote,
            list(page_indices),
            list(info.page_indices[: len(page_indices)]),
            self.layout.page_nbytes,
        )
        try:
            ticket = mover.prepare()  # where the KV is complete on this stream, taken now
        except Exception as exc:  # e.g. a CUDA error recording the stream's position
            self._fail(f"KV write to {info.session_id} could not start ({exc!r})")
            return
        if awaiting_token:  # one write with the record: it starts with the token
            self._pending = (segments, ticket, start)
            return
        self._submit(segments, ticket, first_token, start)

    def send_first_token(self, first_token: FirstToken) -> None:
        """The last stage's first token, after `send` started its KV without one.

        Ignored once the sender failed; raises if no KV write waits for a token.
        """
        if self._state.state is KVPoll.Failed:
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            segments, ticket, start = pending
            self._submit(segments, ticket, first_token, start)
            return
        launched = self._launched
        if launched is None or not launched.awaiting_token:
            raise RuntimeError(f"{self.rid}: no KV write of this sender waits for a first token")
        assert self._info is not None
        error = None
        with launched.lock:  # a settle (the pool's, after a failure) either ran or waits
            if launched.settled or launched.handed_off:
                return
            try:
                launched.slot, launched.record = self._submit_record(self._info, first_token)
            except Exception as exc:  # no metadata slot free, or Mooncake refused the write
                # Still awaiting the token, so no poll settles it as a Success meanwhile.
                error = f"first-token record to {self._info.session_id} could not start ({exc!r})"
            else:
                launched.stats.nbytes += SLOT_NBYTES
                launched.stats.segments += 1
                launched.awaiting_token = False
        if error is not None:
            self._fail(error)

    def _submit(
        self, segments: Segments, ticket: Any, first_token: FirstToken | None, start: float
    ) -> None:
        """The general path: one write (KV, then the record if any) on the pool."""
        info, mover = self._info, self._mover
        assert info is not None and mover is not None
        slot = None
        if first_token is not None:
            try:
                slot = self.endpoint.metadata.acquire()
            except Exception as exc:  # every slot held: this request fails, not the stage
                self._fail(f"first-token record to {info.session_id} could not start ({exc!r})")
                return
            self.endpoint.metadata.write(slot, first_token)
            segments.add(self.endpoint.metadata.address(slot), info.metadata.address, SLOT_NBYTES)
        self._in_flight = True

        def write() -> None:
            start = time.perf_counter()
            try:
                rc = mover.write(info.session_id, segments, ticket)
            except Exception as exc:  # a bug or a Mooncake exception: fail, never hang
                log.exception("KV write raised", extra=self._log_extra())
                rc, error = -1, repr(exc)
            else:
                error = f"rc={rc}"
            finally:
                if slot is not None:
                    self.endpoint.metadata.release(slot)
                self._in_flight = False
            self.stats = TransferStats(
                segments.nbytes, len(segments), time.perf_counter() - start, mover.name
            )
            if rc == 0:
                self._state.advance_unless_failed(KVPoll.Success)
                self._unwatch()
            else:
                self._fail(f"KV write to {info.session_id} failed ({error})")

        self.endpoint.submit(info.session_id, write)

    def _submit_record(
        self, info: ReceiverInfo, first_token: FirstToken
    ) -> tuple[int, PendingWrite]:
        """The first-token record by Mooncake, not waited for: its metadata slot and write."""
        metadata = self.endpoint.metadata
        slot = metadata.acquire()
        try:
            ctypes.memmove(metadata.address(slot), first_token.pack(), SLOT_NBYTES)
            record = self.endpoint.write_async(
                info.session_id, metadata.address(slot), info.metadata.address, SLOT_NBYTES
            )
        except BaseException:
            metadata.release(slot)
            raise
        return slot, record

    def _launch(
        self,
        info: ReceiverInfo,
        mover: CudaIpcMover,
        runs: PageRuns,
        first_token: FirstToken | None,
        start: float,
        awaiting_token: bool,
    ) -> None:
        """The fast path from `send`: record submitted, copy queued behind the KV, no waiting.

        The record goes first: its tcp round trip then overlaps the launch and the copy.
        """
        slot = record = None
        if first_token is not None:
            slot, record = self._submit_record(info, first_token)
        try:
            copy = mover.launch(runs)  # first: what follows is off the copy's critical path
        except Exception as exc:  # the peer went away (mapping closed), or a CUDA error
            self._in_flight = record is not None  # the record may still read the slot
            self._launched = _Launched(None, record, slot, start, self._stats(runs, record, mover))
            self._fail(f"KV write to {info.session_id} failed ({exc!r})")
            return
        stats = self._stats(runs, record, mover)
        self._in_flight = True
        self._launched = _Launched(copy, record, slot, start, stats, awaiting_token)
        if self._state.state is KVPoll.Failed:  # aborted meanwhile: nobody will poll it through
            self._hand_off()

    def _stats(self, runs: PageRuns, record: PendingWrite | None, mover: KVMover) -> TransferStats:
        """What a launched write moves: each run is one range per (layer, K or V) row."""
        rows = len(self.regions) * 2
        return TransferStats(
            rows * 8 * runs.words + (SLOT_NBYTES if record else 0),
            rows * len(runs) + (1 if record else 0),
            0.0,
            mover.name,
        )

    def _settle(self, block: bool) -> bool:
        """Finish the launched write if it ended: give back what it held, move the state.

        Returns False while the copy or the record still runs (only when not `block`).
        """
        launched = self._launched
        if launched is None:
            return True
        error = None
        # Whoever holds the lock is settling it (the pool, blocking): others do not wait.
        if not launched.lock.acquire(blocking=block):
            return False
        try:
            if launched.settled:
                return True
            if launched.awaiting_token and not block:  # the record is still to come
                return False
            try:
                if launched.copy is not None:
                    if block:
                        launched.copy.wait()
                    elif not launched.copy.landed():
                        return False
            except Exception as exc:  # a CUDA error: the copy will not run any more
                error = f"IPC copy failed ({exc!r})"
            if launched.record is not None:
                if block:
                    rc = launched.record.wait(self.endpoint.config.transfer_timeout_s)
                else:
                    rc = launched.record.poll()
                if rc is None and not block:
                    return False
                if rc != 0:
                    error = error or launched.record.error or "first-token record unfinished"
            launched.settled = True
        finally:
            launched.lock.release()
        if launched.copy is not None:
            launched.copy.release()
        if launched.slot is not None:
            self.endpoint.metadata.release(launched.slot)
        launched.stats.seconds = time.perf_counter() - launched.start
        self.stats = launched.stats
        self._in_flight = False
        assert self._info is not None
        if error is None:
            if self._state.advance_unless_failed(KVPoll.Success):
                self._unwatch()
        else:
            self._fail(f"KV write to {self._info.session_id} failed ({error})")
        return True

    def _hand_off(self) -> None:
        """Failed with a launched write still running: the pool waits for it and gives back
        the slot and the mapping (a failed sender is not polled through to the end)."""
        launched = self._launched
        if launched is None:
            return
        with launched.hand_off_lock:  # not launched.lock: a settle in progress may hold it
            if launched.settled or launched.handed_off:
                return
            launched.handed_off = True
        self.endpoint.run_soon(lambda: self._settle(block=True))

    def abort(self, reason: str = "aborted") -> None:
        """Fail unless already finished, and stop watching the peer. Safe to call repeatedly."""
        self._fail(reason)
        self._unwatch()

    # -- internals ---------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        # Stop watching before anyone can see `Failed`: whoever sees it may check that
        # nothing is watched any more (the pool's thread fails a write while a poller looks).
        with self._watch_lock:
            session, self._watching = self._watching, None
            if session is not None:
                self.endpoint.liveness.unwatch(session)
            failed_now = self._state.fail(reason)
        if failed_now:
            log.warning("KV sender failed: %s", reason, extra=self._log_extra())
        if self._launched is not None:
            self._hand_off()

    def _unwatch(self) -> None:
        with self._watch_lock:
            session, self._watching = self._watching, None
        if session is not None:
            self.endpoint.liveness.unwatch(session)

    def _log_extra(self) -> dict[str, object]:
        return {"rid": self.rid, "room": self.room, "pp_rank": self.pp_rank}
