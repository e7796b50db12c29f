"""How a PP stage's hidden states reach the next stage: one channel per neighbouring pair, with
the producer's end (`HiddenSender`, stage k) and the consumer's end (`HiddenInbox`, stage k+1).

Every step, the producer turns its output into a small `HiddenHandoff` that travels as the
return value of its step call into the next stage's step call (`StageGroup.step` chains them),
and the consumer turns the handoff back into a tensor on its device. Three paths, chosen per
pair at connect time (`connect_sender`, `TransportConfig.hidden_channel`):

- `host`: the handoff carries the tensor itself (`.cpu()` first when it is on a GPU) through
  Ray's object store. CPU stages (`auto` on the CPU is this, exactly the old behaviour), and the
  fallback whenever another path cannot be set up or a step does not fit the slots.
- `ipc` (same node, both stages on GPUs): the consumer owns a ring of 2 input slots
  (`max_batched_tokens x hidden_size` each, in the stage's dtype) exported with CUDA IPC; the
  producer maps them once. Per step the producer's stream waits on the consumer's "consumed"
  event of slot `i` (the i-th handoff's slot is `i % 2`), copies its output into the slot and
  records its own "produced" event; the consumer's stream waits on that event, copies the slot
  into a tensor of its own (device to device) and records "consumed". No side waits on the host.
- `mooncake` (GPUs on different nodes; forced for tests on the CPU): the consumer registers its
  slots with its `TransferEndpoint`; the producer copies its output into a registered outbox,
  waits for its stream, and writes the outbox into the slot with one synchronous Mooncake write
  (tcp, or rdma with GPUDirect) before it returns the handoff.

Why a ring of 2 and the consumed events are enough: the controller awaits every stage's report
of a step before it issues the next one (deployments/prefill.py `_run`), so one step is in flight
at a time. When the producer writes handoff i's slot, the consumer's step that read handoff i-2
from the same slot has returned, so its "consumed" record was issued (CUDA IPC: the producer's
stream waits for it on the GPU; Mooncake: the consumer waited on the host for its copy out of
the other slot before returning, so the slot written next is free). The consumer reads a slot
only after the producer's step returned its handoff, so the "produced" record it waits on is the
one of this handoff, not an older one. Waiting on an event never recorded passes at once.

Why a dead stage stays survivable: handoffs still flow through the chained Ray calls (no compiled
graph), so a dead producer surfaces as a `RayActorError` in the chain and the consumer never
receives a handoff for it, so it never waits on an event that no live process will record.
Slots, mappings and events belong to one generation of the stage group, set up by
`StageGroup.start` after the actors are ready; on any failure the group is killed and rebuilt
whole, so no process keeps a mapping or an event of a dead peer in use.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Any, Protocol

import torch

from cluster.messages import HiddenHandoff, HiddenLink, HiddenSlots
from transport.cuda_ipc.backend import IpcBackend
from transport.cuda_ipc.driver import IpcOpenError, node_id
from transport.endpoint import TransferEndpoint, TransportError

log = logging.getLogger(__name__)

NUM_SLOTS = 2  # enough with one step in flight (see the module doc)


class HiddenChannelError(RuntimeError):
    """A handoff could not be made or read: the step fails and the group is rebuilt."""


class HiddenSender(Protocol):
    """The producer's end of one path: its output tensor in, the handoff out."""

    link: HiddenLink  # the path chosen, why, and what the consumer needs to read it

    def send(self, hidden: torch.Tensor) -> HiddenHandoff: ...

    def close(self) -> None: ...


def host_handoff(hidden: torch.Tensor) -> HiddenHandoff:
    """The states themselves, in host memory (Ray's object store moves them)."""
    return HiddenHandoff("host", hidden.shape[0], tensor=hidden.cpu() if hidden.is_cuda else hidden)


class HostSender:
    """The host path: every handoff carries the tensor."""

    def __init__(self, why: str) -> None:
        self.link = HiddenLink("host", why)

    def send(self, hidden: torch.Tensor) -> HiddenHandoff:
        return host_handoff(hidden)

    def close(self) -> None:
        return None


class _SlotWriter:
    """What the slot paths share: which slot is next, and whether a step's states fit one."""

    def __init__(self, slots: HiddenSlots) -> None:
        self.slots = slots
        self._next = 0
        self._warned = False

    def fits(self, hidden: torch.Tensor) -> bool:
        s = self.slots
        ok = (
            hidden.dim() == 2
            and hidden.shape[0] <= s.rows
            and hidden.shape[1] == s.hidden_size
            and hidden.dtype == s.torch_dtype
        )
        if not ok and not self._warned:
            self._warned = True
            log.warning(
                "hidden states %s %s do not fit the next stage's slots (%d x %d %s); this step "
                "and any like it go through the host",
                tuple(hidden.shape),
                hidden.dtype,
                s.rows,
                s.hidden_size,
                s.dtype,
            )
        return ok

    def take_slot(self) -> int:
        slot = self._next
        self._next = (slot + 1) % self.slots.num_slots
        return slot


class IpcSender(_SlotWriter):
    """The same-node path: copy into the consumer's slot, mapped here through CUDA IPC."""

    def __init__(self, slots: HiddenSlots, backend: IpcBackend, device: torch.device, why: str):
        super().__init__(slots)
        if slots.ipc is None or len(slots.consumed_events) != slots.num_slots:
            raise IpcOpenError(slots.why or "the consumer exported no slots")
        self.backend = backend
        self.device = device
        self._mapped = backend.open(slots.ipc, device)
        try:
            self._addresses = [self._mapped + (a - slots.ipc.base) for a in slots.addresses]
            self._consumed = [backend.open_event(h, device) for h in slots.consumed_events]
            produced = [backend.export_event(device) for _ in slots.addresses]
        except Exception:
            backend.close(self._mapped, device)
            raise
        self._produced = [event for event, _ in produced]
        self.link = HiddenLink("ipc", why, tuple(handle for _, handle in produced))

    def send(self, hidden: torch.Tensor) -> HiddenHandoff:
        if not self.fits(hidden):
            return host_handoff(hidden)
        src = hidden.contiguous()
        slot = self.take_slot()
        self.backend.wait_event(self._consumed[slot], self.device)
        nbytes = src.numel() * src.element_size()
        self.backend.copy_async(self._addresses[slot], src.data_ptr(), nbytes, self.device)
        self.backend.record_event(self._produced[slot], self.device)
        return HiddenHandoff("ipc", src.shape[0], slot)

    def close(self) -> None:
        self.backend.close(self._mapped, self.device)


class MooncakeSender(_SlotWriter):
    """The any-node path: one synchronous Mooncake write from a registered outbox into the
    consumer's registered slot."""

    def __init__(
        self, slots: HiddenSlots, endpoint: TransferEndpoint, device: torch.device, why: str
    ) -> None:
        super().__init__(slots)
        if slots.session_id is None:
            raise TransportError(slots.why or "the consumer registered no slots")
        self.endpoint = endpoint
        self.device = device
        self.session = slots.session_id
        self._outbox = torch.zeros(slots.rows, slots.hidden_size, dtype=slots.torch_dtype)
        self._outbox = self._outbox.to(device)
        endpoint.register(self._outbox.data_ptr(), slots.slot_nbytes)
        self.link = HiddenLink("mooncake", why)

    def send(self, hidden: torch.Tensor) -> HiddenHandoff:
        if not self.fits(hidden):
            return host_handoff(hidden)
        n = hidden.shape[0]
        self._outbox[:n].copy_(hidden)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        slot = self.take_slot()
        nbytes = n * self.slots.hidden_size * self._outbox.element_size()
        rc = self.endpoint.write(
            self.session, [self._outbox.data_ptr()], [self.slots.addresses[slot]], [nbytes]
        )
        if rc != 0:
            raise HiddenChannelError(f"Mooncake write of hidden states to {self.session}: rc={rc}")
        return HiddenHandoff("mooncake", n, slot)

    def close(self) -> None:
        self.endpoint.unregister(self._outbox.data_ptr())


def connect_sender(
    slots: HiddenSlots,
    mode: str,
    device: torch.device,
    backend: IpcBackend | None,
    endpoint: TransferEndpoint | None,
) -> HiddenSender:
    """The producer's end toward the consumer that offered `slots`, per `mode`
    (`TransportConfig.hidden_channel`): CUDA IPC when both are on one node's GPUs, Mooncake for
    GPUs on different nodes, the host otherwise, or the one `mode` forces. A path that cannot be
    set up falls back to the host, and says why once."""
    if mode == "host":
        return HostSender("configured")
    if not slots.addresses:
        return _fallback(f"the next stage offers no slots ({slots.why})", mode)
    same_node = slots.node_id == node_id()
    on_gpus = device.type == "cuda" and slots.device.startswith("cuda")
    if mode == "ipc" or (mode == "auto" and on_gpus and same_node):
        if not same_node:
            return _fallback(f"CUDA IPC needs one node; the next stage is on {slots.node_id}", mode)
        if backend is None:
            return _fallback("no CUDA IPC backend here", mode)
        if (
            slots.device_uuid is not None
            and slots.device_uuid not in backend.visible_device_uuids()
        ):
            return _fallback(f"the next stage's GPU {slots.device_uuid} is not visible here", mode)
        try:
            return IpcSender(slots, backend, device, "same node")
        except (IpcOpenError, RuntimeError, KeyError) as exc:
            return _fallback(f"CUDA IPC unavailable ({exc})", mode)
    if mode == "mooncake" or (mode == "auto" and on_gpus):
        if endpoint is None:
            return _fallback("no transfer endpoint here", mode)
        why = "configured" if mode == "mooncake" else "the next stage is on another node"
        try:
            return MooncakeSender(slots, endpoint, device, why)
        except (TransportError, RuntimeError) as exc:
            return _fallback(f"Mooncake unavailable ({exc})", mode)
    return HostSender("CPU stages")


def _fallback(why: str, mode: str) -> HostSender:
    log.warning("hidden states go through the host (hidden_channel=%s): %s", mode, why)
    return HostSender(why)


class HiddenInbox:
    """The consumer's end: its input slots, offered to the producer, and every handoff turned
    back into a tensor on this stage's device."""

    def __init__(
        self,
        mode: str,
        device: torch.device,
        dtype: torch.dtype,
        rows: int,
        hidden_size: int,
        backend: IpcBackend | None,
        endpoint: TransferEndpoint | None,
    ) -> None:
        self.mode = mode
        self.device = device
        self.dtype = dtype
        self.rows = rows
        self.hidden_size = hidden_size
        self.backend = backend
        self.endpoint = endpoint
        self.link = HiddenLink("host", "not connected")
        self._slots: torch.Tensor | None = None
        self._offer: HiddenSlots | None = None
        self._consumed: list[Any] = []
        self._produced: list[Any] = []
        self._last_read: torch.cuda.Event | None = None  # Mooncake on a GPU: the last copy out
        self.received: Counter[str] = Counter()  # handoffs read, by path (stats, tests)

    def offer(self) -> HiddenSlots:
        """This stage's slots as the producer may reach them (allocated once)."""
        if self._offer is None:
            self._offer = self._make_offer()
        return self._offer

    def _make_offer(self) -> HiddenSlots:
        none = HiddenSlots(
            node_id=node_id(),
            device=str(self.device),
            device_uuid=None,
            num_slots=NUM_SLOTS,
            rows=self.rows,
            hidden_size=self.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            addresses=(),
        )
        if self.mode == "host":
            return replace(none, why="configured")
        if self.mode == "auto" and self.device.type != "cuda":
            return replace(none, why="CPU stages")
        shape = (NUM_SLOTS, self.rows, self.hidden_size)
        self._slots = slots = torch.zeros(shape, dtype=self.dtype, device=self.device)
        reasons: list[str] = []
        ipc, consumed, uuid = None, (), None
        if self.mode in ("auto", "ipc"):
            ipc, consumed, uuid = self._export(slots, reasons)
        session = self._register(slots, reasons) if self.mode in ("auto", "mooncake") else None
        return replace(
            none,
            device_uuid=uuid,
            addresses=tuple(slots[i].data_ptr() for i in range(NUM_SLOTS)),
            session_id=session,
            ipc=ipc,
            consumed_events=consumed,
            why="; ".join(reasons),
        )

    def _export(self, slots: torch.Tensor, why: list[str]) -> tuple[Any, tuple[bytes, ...], Any]:
        backend = self.backend
        if backend is None or not backend.is_device_memory(slots):
            why.append("slots in CPU memory: no CUDA IPC")
            return None, (), None
        try:
            ipc = backend.export(slots)
            if ipc is None:
                why.append("the slots' memory cannot be exported with CUDA IPC")
                return None, (), None
            events = [backend.export_event(self.device) for _ in range(NUM_SLOTS)]
            uuid = backend.device_uuid(self.device)
        except (RuntimeError, OSError) as exc:
            why.append(f"CUDA IPC export failed ({exc})")
            return None, (), None
        self._consumed = [event for event, _ in events]
        return ipc, tuple(handle for _, handle in events), uuid

    def _register(self, slots: torch.Tensor, why: list[str]) -> str | None:
        if self.endpoint is None:
            why.append("no transfer endpoint")
            return None
        try:
            self.endpoint.register(slots.data_ptr(), slots.numel() * slots.element_size())
        except TransportError as exc:
            why.append(f"Mooncake cannot register the slots ({exc})")
            return None
        return self.endpoint.session_id

    def close(self) -> None:
        """Unregister the slots from Mooncake (the memory goes with this object)."""
        if self._slots is not None and self._offer is not None and self._offer.session_id:
            assert self.endpoint is not None
            self.endpoint.unregister(self._slots.data_ptr())

    def connect(self, link: HiddenLink) -> None:
        """The producer's choice; for CUDA IPC, open the events it records."""
        if link.path == "ipc":
            if self.backend is None:
                raise HiddenChannelError("the producer chose CUDA IPC, but no backend is here")
            self._produced = [self.backend.open_event(h, self.device) for h in link.produced_events]
        self.link = link
        log.info("hidden states from the previous stage: %s (%s)", link.path, link.why)

    def receive(self, handoff: HiddenHandoff) -> torch.Tensor:
        """The handoff's hidden states as a tensor of this stage's own (the host path's may
        still be in host memory: the forward moves its input to the device)."""
        self.received[handoff.path] += 1
        if handoff.path == "host":
            if handoff.tensor is None:
                raise HiddenChannelError("a host handoff without its tensor")
            return handoff.tensor
        if handoff.path != self.link.path or self._slots is None:
            raise HiddenChannelError(
                f"a {handoff.path} handoff on a channel connected as {self.link.path}"
            )
        slot, n = handoff.slot, handoff.num_tokens
        if slot is None or not 0 <= slot < NUM_SLOTS or not 0 < n <= self.rows:
            raise HiddenChannelError(f"a handoff outside the slots: slot {slot}, {n} rows")
        if handoff.path == "ipc":
            assert self.backend is not None
            self.backend.wait_event(self._produced[slot], self.device)
            hidden = self._slots[slot, :n].clone()
            self.backend.record_event(self._consumed[slot], self.device)
            return hidden
        # Mooncake wrote the slot before the handoff left the producer. The producer's next
        # write goes to the other slot: our copy out of it (the last handoff) must be done
        # before this step returns.
        if self._last_read is not None:
            self._last_read.synchronize()
        hidden = self._slots[slot, :n].clone()
        if self.device.type == "cuda":
            self._last_read = torch.cuda.current_stream(self.device).record_event()
        return hidden
