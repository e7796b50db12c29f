"""Set-up for the KV transfer bench (kv_transfer_bench.py): the request shapes, the decode
process, this process's sending side, and the GPU buffers the flows run against (stand-in
forwards, the reference copy). Kept apart so the bench itself reads as its flows.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from engine.kv_cache import PagedKVCache
from tests.transport.peer import CacheShape, DecodePeer, PrefillStage, page_checksums
from transport import FirstToken, KVPoll, KVSender, TransportConfig

SHAPE = CacheShape(
    num_layers=28, num_pages=1024 + 64, page_size=16, num_kv_heads=2, head_dim=128, dtype="bfloat16"
)
OFFSET = 32  # decode pages start here: runs are contiguous on both sides, just not aligned


CASES = [
    ("2k tokens", 2048, None),
    ("16k tokens", 16384, None),
    ("2k tokens, runs of 4 pages", 2048, 4),
]


def scattered_pages(n: int, run: int, seed: int = 0) -> list[int]:
    """`n` decode pages in runs of `run`, the runs in shuffled order (a busy allocator)."""
    starts = list(range(OFFSET, OFFSET + n, run))
    random.Random(seed).shuffle(starts)
    return [s + k for s in starts for k in range(run)]


def case_pages(tokens: int, run: int | None) -> tuple[list[int], list[int], int]:
    """A case's prefill pages, its decode pages (contiguous from OFFSET, or shuffled runs of
    `run`) and the bytes it moves over all layers."""
    n = tokens // SHAPE.page_size
    remote = list(range(OFFSET, OFFSET + n)) if run is None else scattered_pages(n, run)
    return list(range(n)), remote, 2 * SHAPE.num_layers * n * SHAPE.layout().page_nbytes


def decode_peer(gpu: int = 0) -> DecodePeer:
    """The decode side: a spawned process with its cache on GPU `gpu` (this process sends from
    GPU 0; another GPU makes the fast path a peer-access copy: multi_gpu_fast_path.py)."""
    torch.cuda.set_device(0)
    return DecodePeer(SHAPE, device=f"cuda:{gpu}", timeout_s=120)


def launches_in_send(sender: KVSender) -> bool:
    """The fast path over a page route: `send` launches the copy itself, so polling back to
    back starves nothing. Without a route (a peer GPU) the copy is launched from the transfer
    pool, whose thread needs the GIL, as Mooncake's writes do."""
    mover = sender.mover
    return mover is not None and getattr(mover, "route", None) is not None


def poll_until_done(sender: KVSender, busy: bool, timeout: float = 120.0) -> None:
    """Poll until done: back to back (`busy`: the fast path needs no other thread), or every
    20 us (a write on the pool needs the GIL now and then)."""
    deadline = time.monotonic() + timeout
    while (state := sender.poll()) not in (KVPoll.Success, KVPoll.Failed):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sender.rid} stuck in {state.name}")
        if not busy:
            time.sleep(20e-6)
    if state is KVPoll.Failed:
        raise RuntimeError(sender.failure_reason)


class PrefillSide(PrefillStage):
    """This process's side: a stage holding every layer on the GPU, sending toward `peer`
    (the flows that time it: `kv_transfer_bench.Prefill`)."""

    def __init__(self, peer: DecodePeer, config: TransportConfig, tag: str) -> None:
        super().__init__(SHAPE, config, device="cuda")
        self.peer = peer
        self.tag = tag
        self._n = 0

    def prepare(self, remote: list[int], last: bool) -> tuple[KVSender, FirstToken | None]:
        """A sender with the decode side's receiver info for `remote`, waiting for input."""
        self._n += 1
        sender = self.sender_to(self.peer, f"{self.tag}{self._n}", self._n, remote, is_last=last)
        pages = len(remote)
        token = FirstToken(self._n, 1, 0.0, pages * SHAPE.page_size) if last else None
        return sender, token

    def _let_go(self, sender: KVSender, reference: bool) -> None:
        """Free the decode side's receiver: settled as delivered, or (a reference copy ran in
        the place of `send`) the sender aborted and the receiver failed."""
        if reference:
            sender.abort("reference only")
            self.peer.settle(sender.rid, False, "reference only")
        else:
            self.peer.settle(sender.rid, True)

    def check(self, local: list[int], remote: list[int]) -> bool:
        return torch.equal(self.peer.checksums(remote), page_checksums(self.cache.layers, local))


class Forward:
    """A stand-in for the last prefill stage's forward, queued on the current stream.

    Host-bound (`LightForward`): per layer one 2048^2 bf16 matmul (~30 us) and a rewrite of the
    request's K/V pages; its ~56 launches take about as long on the host as the GPU takes to
    run them, so little GPU work is left queued when `send` is called (the engine's short
    prefills are host-bound too). Model-sized (`ModelForward`): per layer the MLP matmuls of
    Qwen2-1.5B (hidden 1536, intermediate 8960) over the request's tokens, then the K/V rewrite:
    GPU-bound, milliseconds of GPU work still queued when `send` is called. The K/V pages are
    multiplied by one, so their bytes stay what the checksums expect.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.layers = cache.layers

    def layer(self) -> None:
        raise NotImplementedError

    def queue(self, pages: list[int]) -> None:
        first, last = pages[0], pages[-1] + 1  # the bench's local pages are one run
        for layer in self.layers:
            self.layer()
            layer[:, first:last].mul_(1)

    def sync(self) -> None:
        """Wait for the forward the way a stage does: `out.cpu()` of its output."""
        self.output().cpu()

    def output(self) -> torch.Tensor:
        raise NotImplementedError

    def gpu_ms(self, pages: list[int], reps: int = 10) -> float:
        """The forward's own GPU time (median ms, GPU busy before it: launches hidden)."""
        return 1e3 * statistics.median(gpu_time(lambda: self.queue(pages), reps, busy=True))


class LightForward(Forward):
    def __init__(self, cache: PagedKVCache, size: int = 2048) -> None:
        super().__init__(cache)
        self.a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
        self.b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
        self.c = torch.empty_like(self.a)

    def layer(self) -> None:
        torch.mm(self.a, self.b, out=self.c)

    def output(self) -> torch.Tensor:
        return self.c[-1]


class ModelForward(Forward):
    HIDDEN, INTERMEDIATE = 1536, 8960

    def __init__(self, cache: PagedKVCache, tokens: int) -> None:
        super().__init__(cache)
        h, i = self.HIDDEN, self.INTERMEDIATE
        self.x = torch.randn(tokens, h, dtype=torch.bfloat16, device="cuda") * 0.01
        self.up = torch.randn(h, 2 * i, dtype=torch.bfloat16, device="cuda") * 0.01
        self.down = torch.randn(i, h, dtype=torch.bfloat16, device="cuda") * 0.01
        self.mid = torch.empty(tokens, 2 * i, dtype=torch.bfloat16, device="cuda")
        self.out = torch.empty_like(self.x)

    def layer(self) -> None:
        torch.mm(self.x, self.up, out=self.mid)  # gate and up
        torch.mm(self.mid[:, : self.INTERMEDIATE], self.down, out=self.out)

    def output(self) -> torch.Tensor:
        return self.out  # a middle stage's hidden states, handed to Ray on the CPU


class OneCopy:
    """One `copy_` of `nbytes` contiguous bytes between two buffers of its own (the reference).

    `dst_device`: where the destination lives; another GPU than the current one makes it the
    device-to-device copy between the two (cudaMemcpyPeer-like, on the source's stream)."""

    def __init__(self, nbytes: int, dst_device: torch.device | str | None = None) -> None:
        self.src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        self.dst = torch.empty_like(self.src, device=dst_device or self.src.device)

    def __call__(self) -> None:
        self.dst.copy_(self.src)


def gpu_time(fn, reps: int, busy: bool = False) -> list[float]:
    """GPU seconds between events around `fn`'s work. `busy`: the GPU is kept busy while the
    host launches, so only the work itself counts (else an idle GPU waits for the launch)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy:
            torch.cuda._sleep(1_000_000)  # ~0.5 ms, longer than any launch
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times
