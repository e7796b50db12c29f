"""A decode process whose KV cache lives on the GPU, driven over a pipe (GPU tests, benchmarks).

Like tests/transport/peer.py, but the cache is CUDA memory, so a same-node prefill stage in the
parent process can take the CUDA IPC fast path; pages are compared by checksum on the device
instead of shipping whole caches back.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import torch

from tests.transport.peer import FILL, CacheShape


def page_checksums(layers: list[torch.Tensor], pages: list[int]) -> torch.Tensor:
    """`[layers, 2, len(pages)]` exact sums of each page's K and V (as int32 words), on the CPU.

    Equal sums page by page (in order) stand in for equal bytes where copying caches back is
    too slow; tests on small caches compare the bytes themselves.
    """
    index = torch.tensor(pages, device=layers[0].device, dtype=torch.long)
    return torch.stack(
        [
            layer.index_select(1, index).view(torch.int32).to(torch.int64).sum(dim=(2, 3, 4))
            for layer in layers
        ]
    ).cpu()


def _serve(conn: Any, shape: CacheShape, config_json: str) -> None:
    from engine.kv_cache import PagedKVCache
    from transport import KVReceiver, TransferEndpoint, TransportConfig

    torch.cuda.set_device(0)
    endpoint = TransferEndpoint(TransportConfig.model_validate_json(config_json))
    cache = PagedKVCache(shape.spec(), first_layer=0, num_layers=shape.num_layers, device="cuda")
    for layer in cache.layers:
        layer.view(torch.uint8).fill_(FILL)
    endpoint.register_cache(cache)
    torch.cuda.synchronize()
    receivers: dict[str, KVReceiver] = {}
    conn.send(endpoint.session_id)
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            endpoint.close()
            conn.send(None)
            return
        if cmd == "receive":
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
            r = receivers.pop(rid)
            conn.send((int(r.poll()), r.failure_reason, r.first_token))
            r.release()
        elif cmd == "checksums":
            conn.send(page_checksums(cache.layers, args[0]))
        elif cmd == "layers":
            conn.send([layer.view(torch.uint8).cpu() for layer in cache.layers])
        elif cmd == "fill":
            for layer in cache.layers:
                layer.view(torch.uint8).fill_(FILL)
            torch.cuda.synchronize()
            conn.send(None)


class GpuDecodePeer:
    """Handle on the child process; every method is one round trip."""

    def __init__(self, shape: CacheShape, config: Any = None) -> None:
        from transport import TransportConfig

        self.shape = shape
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        config = config or TransportConfig(hostname="127.0.0.1")
        self.process = ctx.Process(
            target=_serve, args=(child, shape, config.model_dump_json()), daemon=True
        )
        self.process.start()
        deadline = time.monotonic() + 120
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                raise RuntimeError(f"GPU decode peer exited ({self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError("GPU decode peer did not start")
        self.session_id: str = self._conn.recv()

    def _call(self, *msg: Any) -> Any:
        self._conn.send(msg)
        if not self._conn.poll(120):
            raise TimeoutError(f"GPU decode peer did not answer {msg[0]}")
        return self._conn.recv()

    def receive(self, rid: str, room: int, pages: list[int], num_stages: int = 1) -> Any:
        from transport import ReceiverInfo

        return ReceiverInfo.model_validate_json(self._call("receive", rid, room, pages, num_stages))

    def result(self, rid: str, ok: bool, reason: str | None = None, stage: int = 0) -> Any:
        """Report stage `stage`'s outcome; returns the receiver's (state, reason, first token)."""
        return self._call("result", rid, stage, ok, reason)

    def checksums(self, pages: list[int]) -> torch.Tensor:
        return self._call("checksums", pages)

    def layers(self) -> list[torch.Tensor]:
        """The whole cache as bytes on the CPU (small caches only)."""
        return self._call("layers")

    def fill(self) -> None:
        self._call("fill")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._call("stop")
            finally:
                self.process.join(10)
        if self.process.is_alive():
            self.kill()
