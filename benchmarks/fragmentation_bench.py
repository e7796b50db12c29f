"""How many page runs, and so Mooncake segments, a max-length prompt gets after an abort storm.

`make serve`'s defaults: SmolLM2 (30 layers), a decode cache of 2048 pages of 16 tokens for the
whole model, and PP-2 prefill stages of 15 layers with 1024 pages each. The storm: 240 requests
of 4-300-word prompts (about 1.3 tokens a word), 48 at once; on decode each holds its prompt's
pages and grows page by page over 1-40 output tokens, on prefill each holds its prompt's pages
for 1-8 steps (chunks, then the transfer); a third are cut early, and what ends in a step is
freed in random order. Then an 8,180-token prompt arrives and is allocated as soon as it fits,
with the storm's last requests still in flight ("in flight"), and once more after they all
ended ("drained").

`kv_segments` writes one segment per run per layer per K/V: 2 x 15 x runs for one prefill
stage. The "prefill->decode" rows pair the prompt's prefill pages with its decode pages, as the
sender does (a run must step by one on both sides). The old allocator, a FIFO of single pages,
is kept here as `FifoPageAllocator` and replays the same seeds. A second table times one
allocate and one free on a 100k-page cache cut into thousands of free runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.report import write_report
from engine.kv_cache import KVLayerRegion
from engine.page_allocator import PageAllocator, PageTable, pages_needed
from transport.receiver_info import LayerAddress
from transport.segments import kv_segments, page_runs

PAGE_SIZE = 16
DECODE_PAGES = 2048
PREFILL_PAGES = 1024
STAGE_LAYERS = 15
PAGE_NBYTES = PAGE_SIZE * 3 * 64 * 2  # SmolLM2-135M: 3 KV heads of 64, bfloat16
MAX_PROMPT = 8180
REQUESTS = 240
CONCURRENT = 48


class FifoPageAllocator:
    """The allocator before free runs (the baseline): freed pages queue up behind the rest."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._in_use: set[int] = set()
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    def can_allocate(self, count: int) -> bool:
        with self._lock:
            return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        with self._lock:
            pages = [self._free.popleft() for _ in range(count)]
            self._in_use.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        pages = list(pages)
        with self._lock:
            self._in_use.difference_update(pages)
            self._free.extend(pages)


ALLOCATORS: dict[str, type] = {"fifo (old)": FifoPageAllocator, "runs (new)": PageAllocator}


@dataclass
class Request:
    prompt_tokens: int
    steps: int  # decode: output tokens; prefill: steps its pages are held
    cut_after: int | None  # a third are cut early, after this many steps
    table: PageTable = field(default_factory=lambda: PageTable(PAGE_SIZE))
    done: int = 0  # steps taken

    @property
    def ends_after(self) -> int:
        return self.steps if self.cut_after is None else self.cut_after


def storm_requests(rng: random.Random, max_steps: int) -> list[Request]:
    out = []
    for _ in range(REQUESTS):
        steps = rng.randint(1, max_steps)
        cut = rng.randint(0, steps - 1) if rng.random() < 1 / 3 else None
        out.append(Request(round(rng.randint(4, 300) * 1.3), steps, cut))
    return out


def decode_tokens(r: Request) -> int:
    """Tokens a decode replica holds pages for: prompt and every token sampled so far."""
    return r.prompt_tokens + r.done + 1


def prefill_tokens(r: Request) -> int:
    return r.prompt_tokens


def after_storm(alloc: Any, rng: random.Random, decode: bool) -> tuple[list[int], list[int]]:
    """The max-length prompt's pages while the storm's last requests are in flight, then after
    every one of them ended."""
    tokens = decode_tokens if decode else prefill_tokens
    waiting = deque(storm_requests(rng, 40 if decode else 8))
    running: list[Request] = []
    prompt = Request(MAX_PROMPT, 1, None)
    while True:
        while waiting and len(running) < CONCURRENT:  # FIFO admission, as both replicas do
            r = waiting[0]
            if not alloc.can_allocate(pages_needed(tokens(r), PAGE_SIZE)):
                break
            r.table.grow_to(tokens(r), alloc)
            running.append(waiting.popleft())
        if not waiting and alloc.can_allocate(pages_needed(tokens(prompt), PAGE_SIZE)):
            in_flight = alloc.allocate(pages_needed(tokens(prompt), PAGE_SIZE))
            break
        ended = []
        for r in running:
            r.done += 1
            if r.done >= r.ends_after:
                ended.append(r)
            elif decode:
                r.table.grow_to(tokens(r), alloc)  # one more page every 16 tokens
        rng.shuffle(ended)
        for r in ended:
            running.remove(r)
            r.table.release(alloc)
    alloc.free(in_flight)
    rng.shuffle(running)
    for r in running:
        r.table.release(alloc)
    drained = alloc.allocate(pages_needed(tokens(prompt), PAGE_SIZE))
    return in_flight, drained


def stage_segments(local: list[int], remote: list[int]) -> int:
    """`len(kv_segments(...))` for one 15-layer stage whose page strides equal page sizes."""
    span = DECODE_PAGES * PAGE_NBYTES
    regions = [
        KVLayerRegion(layer, (1 + 2 * layer) * span, 2 * span, span, PAGE_NBYTES, 1, PAGE_NBYTES)
        for layer in range(STAGE_LAYERS)
    ]
    addresses = {r.layer: LayerAddress.from_region(r) for r in regions}
    return len(kv_segments(regions, addresses, local, remote[: len(local)], PAGE_NBYTES))


def fragmentation_rows(seeds: int) -> list[dict[str, Any]]:
    found: dict[tuple[str, str, str], list[int]] = {}
    for name, make in ALLOCATORS.items():
        for seed in range(seeds):
            # The same seed on both sides: the same storm for the old allocator and the new.
            decode = after_storm(make(DECODE_PAGES), random.Random(seed), decode=True)
            prefill = after_storm(make(PREFILL_PAGES), random.Random(seed), decode=False)
            for when, d, p in zip(("in flight", "drained"), decode, prefill, strict=True):
                for cache, local, remote in (
                    (f"decode {DECODE_PAGES}", d, d),
                    (f"prefill {PREFILL_PAGES}", p, p),
                    ("prefill->decode", p, d),
                ):
                    runs = len(page_runs(local, remote[: len(local)]))
                    segments = stage_segments(local, remote)
                    assert segments == 2 * STAGE_LAYERS * runs
                    found.setdefault((cache, when, name), []).append(runs)
    rows = []
    for (cache, when, name), runs in sorted(found.items(), key=lambda kv: kv[0][:2]):
        rows.append(
            {
                "cache": cache,
                "when": when,
                "allocator": name,
                "runs_p50": statistics.median(runs),
                "runs_max": max(runs),
                "segments_p50": 2 * STAGE_LAYERS * statistics.median(runs),
                "segments_max": 2 * STAGE_LAYERS * max(runs),
            }
        )
    return rows


def cost_rows(rounds: int) -> list[dict[str, Any]]:
    """Median microseconds of one call on 100k pages held in 1-32-page blocks, half freed."""
    rows = []
    for name, make in ALLOCATORS.items():
        rng = random.Random(0)
        alloc = make(100_000)
        blocks = []
        while alloc.num_free:
            blocks.append(alloc.allocate(min(rng.randint(1, 32), alloc.num_free)))
        rng.shuffle(blocks)
        freed = sorted(p for block in blocks[: len(blocks) // 2] for p in block)
        for block in blocks[: len(blocks) // 2]:
            alloc.free(block)
        row: dict[str, Any] = {
            "allocator": name,
            "num_pages": 100_000,
            "free_runs": len(page_runs(freed, freed)),
        }
        for count in (1, 16, 512):
            took_alloc, took_free = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                pages = alloc.allocate(count)
                took_alloc.append(time.perf_counter() - start)
                rng.shuffle(pages)
                start = time.perf_counter()
                alloc.free(pages)
                took_free.append(time.perf_counter() - start)
            row[f"allocate_{count}_us"] = 1e6 * statistics.median(took_alloc)
            row[f"free_{count}_us"] = 1e6 * statistics.median(took_free)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    rows = fragmentation_rows(args.seeds)
    cost = cost_rows(args.rounds)
    write_report("fragmentation", rows, list(rows[0]))
    write_report("fragmentation_cost", cost, list(cost[0]))


if __name__ == "__main__":
    main()
