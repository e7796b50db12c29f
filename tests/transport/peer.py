"""The two sides of a KV transfer for tests and benchmarks: a decode replica's transport in a
child process, driven over a pipe (`DecodePeer`), and a prefill stage's in the caller's process
(`PrefillStage`).

The tests are the prefill side; the child owns a real `TransferEndpoint`, a real paged KV
cache filled with a known byte pattern, and the `KVReceiver`s, so every transfer crosses a
process boundary: over Mooncake's tcp transport on loopback, or, with the cache on the GPU
(`device="cuda"`: tests/gpu, benchmarks/gpu), by the CUDA IPC fast path from a same-node stage.
`device="cuda:1"` puts a side's cache on GPU 1 (`"cuda"` is GPU 0): the multi-GPU tests and
benchmarks send from a stage on one GPU into a decode cache on another (peer access).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

FILL = 0x5A  # every byte of the decode cache before any transfer


@dataclass(frozen=True)
class CacheShape:
    num_layers: int = 4
    num_pages: int = 64
    page_size: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "float32"

    def spec(self) -> Any:
        from engine.kv_cache import KVCacheSpec

        return KVCacheSpec(
            num_pages=self.num_pages,
            page_size=self.page_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=getattr(torch, self.dtype),
        )

    def layout(self) -> Any:
        from transport.receiver_info import KVLayout

        return KVLayout.from_spec(self.spec(), self.num_layers)


def page_checksums(layers: list[torch.Tensor], pages: list[int]) -> torch.Tensor:
    """`[layers, 2, len(pages)]` exact sums of each page's K and V (as int32 words), on the CPU.

    Equal sums page by page (in order) stand in for equal bytes where copying caches back is
    too slow (GPU caches); tests on small caches compare the bytes themselves.
    """
    index = torch.tensor(pages, device=layers[0].device, dtype=torch.long)
    return torch.stack(
        [
            layer.index_select(1, index).view(torch.int32).to(torch.int64).sum(dim=(2, 3, 4))
            for layer in layers
        ]
    ).cpu()


def on_gpu(device: str) -> bool:
    """`device` names a GPU: `"cuda"` (GPU 0) or `"cuda:<i>"`."""
    return device.startswith("cuda")


def _serve(conn: Any, shape: CacheShape, config_json: str, device: str) -> None:
    from engine.kv_cache import PagedKVCache
    from transport import KVReceiver, TransferEndpoint, TransportConfig

    if on_gpu(device):  # the cache's GPU is the current device (streams, IPC exports)
        torch.cuda.set_device(torch.device(device).index or 0)
    endpoint = TransferEndpoint(TransportConfig.model_validate_json(config_json))
    cache = PagedKVCache(shape.spec(), first_layer=0, num_layers=shape.num_layers, device=device)

    def fill() -> None:
        for layer in cache.layers:
            layer.view(torch.uint8).fill_(FILL)
        if on_gpu(device):
            torch.cuda.synchronize()

    fill()
    endpoint.register_cache(cache)
    receivers: dict[str, KVReceiver] = {}
    conn.send(endpoint.session_id)
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            endpoint.close()
            conn.send(None)
            return
        if cmd == "reset":
            for r in receivers.values():
                r.abort("test reset")
            receivers.clear()
            fill()
            conn.send(None)
        elif cmd == "receive":
            rid, room, pages, num_stages = args
            receivers[rid] = KVReceiver(
                endpoint,
                rid=rid,
                room=room,
                regions=cache.regions(),
                layout=shape.layout(),
                page_indices=pages,
                num_stages=num_stages,
            )
            conn.send(receivers[rid].publish().model_dump_json())
        elif cmd == "result":
            rid, stage, ok, reason = args
            receivers[rid].on_stage_result(stage, ok, reason)
            conn.send(None)
        elif cmd == "settle":  # a stage's result, the poll after it and the release, one trip
            rid, stage, ok, reason = args
            r = receivers.pop(rid)
            r.on_stage_result(stage, ok, reason)
            conn.send((int(r.poll()), r.failure_reason, r.first_token))
            r.release()
        elif cmd == "poll":
            r = receivers[args[0]]
            conn.send((int(r.poll()), r.failure_reason, r.first_token))
        elif cmd == "abort":
            receivers.pop(args[0]).abort()
            conn.send(None)
        elif cmd == "layers":
            # Copies: sending the cache's own CPU tensors would move their storage into shared
            # memory (torch's pickling), away from the addresses Mooncake registered.
            conn.send([layer.view(torch.uint8).to("cpu", copy=True) for layer in cache.layers])
        elif cmd == "checksums":
            conn.send(page_checksums(cache.layers, args[0]))
        elif cmd == "slots_held":
            conn.send(endpoint.metadata.num_held)


class DecodePeer:
    """Handle on the child process; every method is one round trip."""

    def __init__(
        self,
        shape: CacheShape | None = None,
        config: Any = None,
        device: str = "cpu",
        timeout_s: float = 60,
    ) -> None:
        from transport import TransportConfig

        self.shape = shape or CacheShape()
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        if config is None:  # the GPU machines of tests/gpu have no Ray to ask for a node IP
            config = TransportConfig(hostname="127.0.0.1") if on_gpu(device) else TransportConfig()
        self.process = ctx.Process(
            target=_serve,
            args=(child, self.shape, config.model_dump_json(), device),
            daemon=True,
        )
        self.process.start()
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                raise RuntimeError(f"decode peer exited ({self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError("decode peer did not start")
        self.session_id: str = self._conn.recv()

    def _call(self, *msg: Any) -> Any:
        self._conn.send(msg)
        if not self._conn.poll(self.timeout_s):
            raise TimeoutError(f"decode peer did not answer {msg[0]}")
        return self._conn.recv()

    def receive(self, rid: str, room: int, pages: list[int], num_stages: int = 1) -> Any:
        from transport import ReceiverInfo

        return ReceiverInfo.model_validate_json(self._call("receive", rid, room, pages, num_stages))

    def reset(self) -> None:
        """Forget every receiver and refill the cache with the pattern."""
        self._call("reset")

    def result(self, rid: str, stage: int, ok: bool, reason: str | None = None) -> None:
        self._call("result", rid, stage, ok, reason)

    def poll(self, rid: str) -> tuple[int, str | None, Any]:
        return self._call("poll", rid)

    def settle(
        self, rid: str, ok: bool, reason: str | None = None, stage: int = 0
    ) -> tuple[int, str | None, Any]:
        """Report stage `stage`'s outcome, then poll and release the receiver (its metadata
        slot is free again); returns (state, reason, first token)."""
        return self._call("settle", rid, stage, ok, reason)

    def checksums(self, pages: list[int]) -> torch.Tensor:
        return self._call("checksums", pages)

    def abort(self, rid: str) -> None:
        self._call("abort", rid)

    def layers(self) -> list[torch.Tensor]:
        return self._call("layers")

    def slots_held(self) -> int:
        return self._call("slots_held")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def pause(self) -> None:
        """SIGSTOP, returning once the process is stopped (the signal lands asynchronously)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{self.process.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            time.sleep(0.001)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._call("stop")
            finally:
                self.process.join(10)
        if self.process.is_alive():
            self.kill()


class PrefillStage:
    """One prefill stage's transport in this process: its endpoint and a KV cache of layers
    `layers` (default: all) filled with seeded random values on `device`, registered with it."""

    def __init__(
        self,
        shape: CacheShape,
        config: Any,
        layers: range | None = None,
        device: str = "cpu",
    ) -> None:
        from engine.kv_cache import PagedKVCache
        from transport import TransferEndpoint

        layers = layers if layers is not None else range(shape.num_layers)
        self.shape = shape
        self.layers = layers
        self.is_last = layers.stop == shape.num_layers
        self.endpoint = TransferEndpoint(config)
        self.cache = PagedKVCache(
            shape.spec(), first_layer=layers.start, num_layers=len(layers), device=device
        )
        gen = torch.Generator(device=device).manual_seed(layers.start)
        for layer in self.cache.layers:
            layer.normal_(generator=gen)
        if on_gpu(device):
            torch.cuda.synchronize(device)
        self.endpoint.register_cache(self.cache)

    def sender(self, rid: str, room: int, pp_rank: int = 0, is_last: bool | None = None) -> Any:
        """A sender of this stage's layers (the last stage's unless `is_last` says)."""
        from transport import KVSender

        return KVSender(
            self.endpoint,
            rid=rid,
            room=room,
            regions=self.cache.regions(),
            layout=self.shape.layout(),
            is_last_stage=self.is_last if is_last is None else is_last,
            pp_rank=pp_rank,
        )

    def sender_to(
        self, peer: DecodePeer, rid: str, room: int, remote: list[int], is_last: bool = True
    ) -> Any:
        """A sender with `peer`'s receiver info for pages `remote`, waiting for input."""
        from transport import KVPoll

        sender = self.sender(rid, room, is_last=is_last)
        sender.set_receiver_info(peer.receive(rid, room, remote))
        if sender.poll() is not KVPoll.WaitingForInput:
            raise RuntimeError(f"sender {rid} not ready: {sender.failure_reason}")
        return sender

    def close(self) -> None:
        self.endpoint.close()
