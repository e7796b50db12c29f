"""A colocated deployment: prefill and decode in one process on the same engine.

The baseline PD is measured against (and a way to serve a model that fits one device without
disaggregation). It streams the same `TokenChunk`s as the decode deployment, so the same
ingress serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from cluster.messages import Accepted, DecodeRequest, TokenChunk
from cluster.thread_budget import apply_thread_budget
from deployments.decode import DecodeConfig, chunk_of, on_this_actor, step_and_dispatch
from deployments.health import Readiness
from engine import LLM, OutOfPagesError

log = logging.getLogger(__name__)


class ColocatedDeployment:
    """The whole model, prefill and decode in one continuous-batching loop."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from engine.logs import configure_logging

        configure_logging()
        self.config = DecodeConfig.model_validate(config)
        apply_thread_budget("colocated")
        self.llm = LLM(on_this_actor(self.config.engine))
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._new: list[DecodeRequest] = []
        self._aborts: list[str] = []
        self._work = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def generate(self, request: DecodeRequest) -> AsyncIterator[Accepted | TokenChunk]:
        """`Accepted` first (the ingress's queue wait ends here), then the tokens."""
        yield Accepted()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        n = request.sampling.n
        children = [request.rid] + [f"{request.rid}#{i}" for i in range(1, n)]
        for child in children:
            self._streams[child] = queue
        self._new.append(request)
        self._work.set()
        ended: set[int] = set()
        try:
            while len(ended) < n:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield chunk_of(out)
                if out.finished:
                    ended.add(out.index)
        finally:
            for child in children:
                self._streams.pop(child, None)
            self._aborts += children
            self._work.set()

    async def stats(self) -> dict[str, Any]:
        return {
            "running": len(self._streams),
            "pages_in_use": self.llm.allocator.num_in_use,
            "prealloc": 0,
            "transfer": 0,
            "metadata_slots_held": 0,
        }

    async def readiness(self) -> dict[str, Any]:
        reasons = ["colocated: the engine loop stopped"] if self._task.done() else []
        return Readiness("colocated", tuple(reasons)).as_dict()

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("the engine loop stopped")

    async def _loop(self) -> None:
        while True:
            for request in self._new:
                # The ingress validates; this is the safety net: a bad prompt, or one larger
                # than the whole KV cache, fails its own request, not the loop serving the rest.
                # Each of n choices is its own sequence here (its own prefill).
                try:
                    params = request.sampling
                    for i in range(params.n):
                        rid = request.rid if i == 0 else f"{request.rid}#{i}"
                        choice = params.for_choice(i) if params.n > 1 else params
                        self.llm.add_request(request.prompt_token_ids, choice, rid=rid, index=i)
                except (ValueError, OutOfPagesError) as exc:
                    queue = self._streams.get(request.rid)
                    if queue is not None:
                        queue.put_nowait(exc)
            self._new.clear()
            for rid in self._aborts:
                self.llm.abort(rid)
            self._aborts.clear()
            if not self.llm.has_unfinished():
                self._work.clear()
                await self._work.wait()
                continue
            await step_and_dispatch(self.llm, self._streams)


def build_colocated_app(config: Any) -> Any:
    """The same ingress in front of one colocated engine (`config` is an `AppConfig`)."""
    from ray import serve

    from deployments.ingress import ingress_deployment

    engine_config = config.decode(role="both")
    actor: dict[str, Any] = {"num_cpus": engine_config.num_cpus}
    if engine_config.num_gpus:
        actor["num_gpus"] = engine_config.num_gpus
    engine = serve.deployment(ColocatedDeployment).options(
        name="colocated",
        num_replicas=engine_config.num_replicas,
        ray_actor_options=actor,
        max_ongoing_requests=10_000,
    )
    ingress = ingress_deployment(config.ingress_replicas, config.ingress_num_cpus)
    return ingress.bind(
        config.ingress().model_dump(mode="json"), engine.bind(engine_config.model_dump(mode="json"))
    )
