"""A mixed load for watching pdserve's metrics move: completions and chats, streamed and not,
client aborts (a stream dropped after its first chunk) and invalid requests (400s)."""

from __future__ import annotations

import asyncio
import random
import time

from openai import AsyncOpenAI

WORDS = ["red", "fox", "jumps", "over", "the", "lazy", "dog", "and", "runs", "far"]


async def mixed_load(
    base_url: str, api_key: str, model: str, seconds: float, concurrency: int = 6, seed: int = 7
) -> dict[str, int]:
    """`concurrency` clients in a loop for `seconds`; returns how many requests of each kind
    ended as expected (one in five is aborted, one in five rejected)."""
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    counts = {"ok": 0, "aborted": 0, "rejected": 0}
    deadline = time.monotonic() + seconds
    rng = random.Random(seed)

    async def one(kind: int) -> None:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 60)))
        if kind == 0:
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=40, stream=True
            )
            async for _ in stream:
                break
            await stream.close()
            counts["aborted"] += 1
        elif kind == 1:
            try:
                await client.completions.create(model=model, prompt=prompt, max_tokens=-1)
            except Exception:
                counts["rejected"] += 1
        elif kind == 2:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=rng.randrange(2, 12),
                stream=True,
            )
            async for _ in stream:
                pass
            counts["ok"] += 1
        else:
            await client.completions.create(
                model=model, prompt=prompt, max_tokens=rng.randrange(2, 12)
            )
            counts["ok"] += 1

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            await one((w + i) % 5)

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await client.close()
    return counts
