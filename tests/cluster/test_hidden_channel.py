"""The hidden-state channel between PP stages (cluster/hidden_channel.py), both ends in this
process: the host path, the CUDA IPC path's decisions and bytes through `FakeIpc` (CPU memory,
events counted), and the Mooncake path for real over tcp on loopback between two endpoints.
The real CUDA path is tested in tests/gpu/test_hidden_channel_gpu.py."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("GLOG_minloglevel", "1")

from cluster.hidden_channel import (
    NUM_SLOTS,
    HiddenChannelError,
    HiddenInbox,
    HostSender,
    IpcSender,
    MooncakeSender,
    connect_sender,
)
from cluster.messages import HiddenHandoff
from tests.transport.fake_ipc import FakeIpc
from transport import TransportConfig
from transport.endpoint import TransferEndpoint

CPU = torch.device("cpu")
ROWS, HIDDEN = 32, 24


def states(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, HIDDEN, generator=g).to(dtype)


def inbox(mode: str, dtype=torch.float32, backend=None, endpoint=None) -> HiddenInbox:
    return HiddenInbox(mode, CPU, dtype, ROWS, HIDDEN, backend, endpoint)


def connect(mode: str, consumer: HiddenInbox, backend=None, endpoint=None):
    """Both ends of one channel, connected as `StageGroup.start` does (through pickles, as
    Ray would carry the messages)."""
    slots = pickle.loads(pickle.dumps(consumer.offer()))
    sender = connect_sender(slots, mode, CPU, backend, endpoint)
    consumer.connect(pickle.loads(pickle.dumps(sender.link)))
    return sender


def hop(sender, consumer: HiddenInbox, hidden: torch.Tensor) -> tuple[HiddenHandoff, torch.Tensor]:
    handoff = pickle.loads(pickle.dumps(sender.send(hidden)))
    return handoff, consumer.receive(handoff)


# -- host -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "host"])
def test_cpu_stages_hand_over_the_tensor_itself_through_the_host(mode: str) -> None:
    consumer = inbox(mode, backend=FakeIpc())
    assert consumer.offer().addresses == ()  # no slots allocated
    sender = connect(mode, consumer, backend=FakeIpc())
    assert isinstance(sender, HostSender) and consumer.link.path == "host"
    for n in (1, 7, ROWS, 3 * ROWS):  # the host path takes any size
        hidden = states(n, seed=n)
        handoff, got = hop(sender, consumer, hidden)
        assert handoff.path == "host" and handoff.slot is None
        assert torch.equal(got, hidden)


# -- CUDA IPC, through the fake ----------------------------------------------------------------


def test_ipc_producer_writes_the_slot_and_the_consumer_reads_the_same_bytes() -> None:
    backend = FakeIpc()
    consumer = inbox("ipc", backend=backend)
    sender = connect("ipc", consumer, backend=backend)
    assert isinstance(sender, IpcSender) and consumer.link.path == "ipc"
    assert backend.opened == 1  # the slots are mapped once, at connect
    slots_seen = []
    for step, n in enumerate([5, ROWS, 1, 17, 9]):
        hidden = states(n, seed=step)
        handoff, got = hop(sender, consumer, hidden)
        assert handoff.path == "ipc" and handoff.tensor is None and handoff.num_tokens == n
        slots_seen.append(handoff.slot)
        assert torch.equal(got.view(torch.uint8), hidden.view(torch.uint8))
        # The consumer's tensor is its own: the producer's next write into the slot leaves it.
        assert got.data_ptr() != consumer.offer().addresses[handoff.slot]
    assert slots_seen == [0, 1, 0, 1, 0]
    assert backend.opened == 1 and backend.copies == 5


def test_ipc_events_order_every_slot_reuse_behind_the_consumers_read() -> None:
    backend = FakeIpc()
    consumer = inbox("ipc", backend=backend)
    slots = consumer.offer()
    sender = connect("ipc", consumer, backend=backend)
    consumed = slots.consumed_events
    produced = sender.link.produced_events
    assert len(consumed) == len(produced) == NUM_SLOTS
    for step in range(4):
        hop(sender, consumer, states(3, seed=step))
    k = [0, 1, 0, 1]
    want = []
    for slot in k:  # producer: wait consumed, (copy), record produced; consumer the mirror
        want += [("wait", consumed[slot]), ("record", produced[slot])]
        want += [("wait", produced[slot]), ("record", consumed[slot])]
    assert backend.event_log == want


def test_ipc_falls_back_to_the_host_when_the_slots_cannot_be_exported() -> None:
    class NoExport(FakeIpc):
        def export(self, tensor):  # e.g. expandable segments: no legacy IPC handle
            return None

    backend = NoExport()
    consumer = inbox("ipc", backend=backend)
    assert consumer.offer().ipc is None and "cannot be exported" in consumer.offer().why
    sender = connect("ipc", consumer, backend=backend)
    assert isinstance(sender, HostSender) and "cannot be exported" in sender.link.why
    hidden = states(4)
    handoff, got = hop(sender, consumer, hidden)
    assert handoff.path == "host" and torch.equal(got, hidden)


def test_ipc_falls_back_to_the_host_when_the_producer_cannot_open_the_slots() -> None:
    consumer = inbox("ipc", backend=FakeIpc())
    sender = connect("ipc", consumer, backend=FakeIpc(fail_open=True))
    assert isinstance(sender, HostSender) and "CUDA IPC unavailable" in sender.link.why
    assert torch.equal(hop(sender, consumer, states(2))[1], states(2))


def test_ipc_needs_both_stages_on_one_node() -> None:
    from dataclasses import replace

    backend = FakeIpc()
    consumer = inbox("ipc", backend=backend)
    elsewhere = replace(consumer.offer(), node_id="other-host/boot")
    sender = connect_sender(elsewhere, "ipc", CPU, backend, None)
    assert isinstance(sender, HostSender) and "one node" in sender.link.why


def test_ipc_needs_the_consumers_gpu_visible_here() -> None:
    consumer = inbox("ipc", backend=FakeIpc(device_uuid="GPU-OTHER"))
    sender = connect("ipc", consumer, backend=FakeIpc())
    assert isinstance(sender, HostSender) and "not visible" in sender.link.why


def test_a_step_too_large_for_the_slots_goes_through_the_host_and_keeps_the_ring() -> None:
    backend = FakeIpc()
    consumer = inbox("ipc", backend=backend)
    sender = connect("ipc", consumer, backend=backend)
    assert hop(sender, consumer, states(3))[0].slot == 0
    big = states(ROWS + 1, seed=1)
    handoff, got = hop(sender, consumer, big)
    assert handoff.path == "host" and torch.equal(got, big)
    assert hop(sender, consumer, states(3))[0].slot == 1  # the ring did not move for it


def test_a_handoff_outside_the_slots_is_refused() -> None:
    backend = FakeIpc()
    consumer = inbox("ipc", backend=backend)
    connect("ipc", consumer, backend=backend)
    with pytest.raises(HiddenChannelError):
        consumer.receive(HiddenHandoff("ipc", ROWS + 1, 0))
    with pytest.raises(HiddenChannelError):
        consumer.receive(HiddenHandoff("ipc", 1, NUM_SLOTS))
    with pytest.raises(HiddenChannelError):
        consumer.receive(HiddenHandoff("mooncake", 1, 0))


# -- Mooncake, for real over tcp on loopback -----------------------------------------------------


@pytest.fixture(scope="module")
def endpoints() -> Iterator[tuple[TransferEndpoint, TransferEndpoint]]:
    config = TransportConfig(hostname="127.0.0.1", cuda_ipc=False)
    producer, consumer = TransferEndpoint(config), TransferEndpoint(config)
    yield producer, consumer
    producer.close()
    consumer.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mooncake_writes_the_states_into_the_consumers_slot_byte_exact(endpoints, dtype) -> None:
    producer_ep, consumer_ep = endpoints
    consumer = inbox("mooncake", dtype=dtype, endpoint=consumer_ep)
    slots = consumer.offer()
    assert slots.session_id == consumer_ep.session_id and slots.ipc is None
    sender = connect("mooncake", consumer, endpoint=producer_ep)
    assert isinstance(sender, MooncakeSender) and consumer.link.path == "mooncake"
    seen = []
    for step, n in enumerate([ROWS, 1, 13, 7]):
        hidden = states(n, dtype, seed=10 + step)
        handoff, got = hop(sender, consumer, hidden)
        assert handoff.path == "mooncake" and handoff.tensor is None
        seen.append(handoff.slot)
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.uint8), hidden.view(torch.uint8))
    assert seen == [0, 1, 0, 1]
    sender.close()
    consumer.close()


def test_mooncake_write_failure_fails_the_step(endpoints) -> None:
    producer_ep, consumer_ep = endpoints
    consumer = inbox("mooncake", endpoint=consumer_ep)
    sender = connect("mooncake", consumer, endpoint=producer_ep)
    producer_ep.faults.fail_next_writes(1)
    try:
        with pytest.raises(HiddenChannelError, match="rc="):
            sender.send(states(2))
    finally:
        sender.close()
        consumer.close()


def test_auto_on_cpu_stages_never_registers_or_exports() -> None:
    consumer = inbox("auto", backend=FakeIpc())
    slots = consumer.offer()
    assert slots.addresses == () and slots.session_id is None and slots.ipc is None
