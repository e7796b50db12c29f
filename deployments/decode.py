"""The decode deployment: the whole model, its paged KV registered with Mooncake, and a
continuous-batching loop that streams tokens.

A request's life here: preallocate pages for its prompt (waiting, with a bound, when memory is
short), publish receiver info and ask the prefill deployment to fill those pages, learn that
every stage delivered, then join the running batch with the first token the last stage sent
through the KV transfer. Cancelling the caller's stream aborts it here and at the prefill side;
pages that a stage might still write into stay out of reuse until no write can land.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt

from cluster.gpu_visibility import actor_device
from cluster.metrics import DecodeMetrics
from cluster.metrics_export import export_process_metrics, serve_replica_identity
from cluster.plan import PrefillRequest
from engine import LLM, EngineConfig, SamplingParams
from engine.page_allocator import pages_needed
from transport.config import TransportConfig
from transport.endpoint import TransferEndpoint
from transport.poll import KVPoll
from transport.receiver import KVReceiver
from transport.receiver_info import KVLayout

log = logging.getLogger(__name__)


class DecodeConfig(BaseModel):
    """One decode role: model, KV pages, batching, and how long to wait for memory."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    page_size: PositiveInt = 16
    num_pages: PositiveInt = 2048
    max_num_seqs: PositiveInt = 64
    max_model_len: PositiveInt | None = None
    prealloc_timeout_s: PositiveFloat = Field(
        30.0, description="a request waiting this long for KV pages fails with 503"
    )
    num_prefill_stages: PositiveInt = Field(2, description="the prefill role's PP size")
    num_gpus: float = Field(1.0, ge=0)
    num_replicas: PositiveInt = 1
    transport: TransportConfig = Field(default_factory=TransportConfig)


class DecodeOverloaded(RuntimeError):
    """No KV pages freed up within the prealloc bound: the caller should retry (503)."""


class DecodeFailed(RuntimeError):
    """The request could not be prefilled or its KV never arrived (502/500)."""


@dataclass(frozen=True)
class DecodeRequest:
    rid: str
    room: int
    prompt_token_ids: list[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class TokenChunk:
    """What the decode stream yields: new tokens, their text, and the end when it comes."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


class DecodeInstance:
    """The decode engine of one replica and the per-request protocol around it."""

    def __init__(self, config: DecodeConfig, prefill: Any, replica: str = "decode") -> None:
        self.config = config
        self.prefill = prefill  # a handle (or object) with `async prefill(PrefillRequest)`
        self.llm = LLM(
            EngineConfig(
                model=config.model,
                dtype=config.dtype,
                device=actor_device(config.device),
                page_size=config.page_size,
                num_pages=config.num_pages,
                max_num_seqs=config.max_num_seqs,
                max_model_len=config.max_model_len,
            )
        )
        self.endpoint = TransferEndpoint(config.transport)
        self.endpoint.register_cache(self.llm.kv_cache)
        self.layout = KVLayout.from_spec(
            self.llm.kv_cache.spec, self.llm.model_config.num_hidden_layers
        )
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._pending_aborts: list[str] = []
        self._memory_freed = asyncio.Event()
        self._work = asyncio.Event()
        self._quarantined = 0
        self.counts = {"prealloc": 0, "transfer": 0}
        self.metrics = DecodeMetrics(
            replica,
            config.num_pages,
            queues=self.queue_sizes,
            pages_in_use=lambda: self.llm.allocator.num_in_use,
        )
        self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    # -- one request --------------------------------------------------------------------------

    async def generate(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """Stream a request's tokens; the first comes from the prefill side."""
        timer = self.metrics.request(len(request.prompt_token_ids))
        try:
            pages = await self._preallocate(request)
        except DecodeOverloaded as exc:
            self.metrics.failed(str(exc), before_transfer=True)
            raise
        receiver = KVReceiver(
            self.endpoint,
            rid=request.rid,
            room=request.room,
            regions=self.llm.kv_cache.regions(),
            layout=self.layout,
            page_indices=pages,
            num_stages=self.config.num_prefill_stages,
        )
        added = False
        queue: asyncio.Queue[Any] = asyncio.Queue()
        try:
            self.counts["transfer"] += 1
            try:
                result = await self.prefill.prefill(
                    PrefillRequest(
                        request.rid,
                        request.room,
                        request.prompt_token_ids,
                        request.sampling,
                        receiver_info=receiver.publish(),
                    )
                )
            except Exception as exc:
                receiver.abort(f"prefill failed: {exc}")
                raise DecodeFailed(f"prefill failed: {_reason(exc)}") from exc
            finally:
                self.counts["transfer"] -= 1
            for stage in range(len(result.stage_sessions)):
                receiver.on_stage_result(stage, True)
            if receiver.poll() is not KVPoll.Success or receiver.first_token is None:
                reason = f"KV transfer incomplete: {receiver.failure_reason}"
                self.metrics.failed(reason, before_transfer=False)
                raise DecodeFailed(reason)
            first = receiver.first_token  # read from our own pages' metadata slot
            self._streams[request.rid] = queue
            out = self.llm.add_prefilled(
                request.rid,
                request.prompt_token_ids,
                request.sampling,
                pages,
                first.token_id,
                first.logprob,
            )
            added = True
            self._work.set()
            timer.tokens(len(out.token_ids))
            yield chunk_of(out)
            finished = out.finished
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                timer.tokens(len(item.token_ids))
                yield chunk_of(item)
                finished = item.finished
            timer.finished()
        finally:
            self._streams.pop(request.rid, None)
            if added:
                self._pending_aborts.append(request.rid)  # no-op if it already finished
                self._work.set()
            else:
                self._release(pages, receiver)
            receiver.release()

    async def _preallocate(self, request: DecodeRequest) -> list[int]:
        need = pages_needed(len(request.prompt_token_ids) + 1, self.config.page_size)
        deadline = time.monotonic() + self.config.prealloc_timeout_s
        self.counts["prealloc"] += 1
        try:
            while not self.llm.allocator.can_allocate(need):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DecodeOverloaded(
                        f"no KV memory for {need} pages within {self.config.prealloc_timeout_s}s"
                    )
                self._memory_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._memory_freed.wait(), min(left, 0.5))
            return self.llm.allocator.allocate(need)
        finally:
            self.counts["prealloc"] -= 1

    def _release(self, pages: list[int], receiver: KVReceiver) -> None:
        """Free pages now, or once no prefill write can land in them any more."""
        if not receiver.writes_may_land:
            self._free(pages)
            return
        self._quarantined += len(pages)
        delay = self.config.transport.transfer_timeout_s

        def later() -> None:
            self._quarantined -= len(pages)
            self._free(pages)

        asyncio.get_running_loop().call_later(delay, later)

    def _free(self, pages: list[int]) -> None:
        self.llm.allocator.free(pages)
        self._memory_freed.set()

    # -- the batch ----------------------------------------------------------------------------

    async def _decode_loop(self) -> None:
        while True:
            for rid in self._pending_aborts:
                self.llm.abort(rid)
            if self._pending_aborts:
                self._pending_aborts.clear()
                self._memory_freed.set()
            if not self.llm.has_unfinished():
                self._work.clear()
                await self._work.wait()
                continue
            if await step_and_dispatch(self.llm, self._streams):
                self._memory_freed.set()

    def queue_sizes(self) -> dict[str, int]:
        """Prealloc (waiting for pages), transfer (waiting for KV), and the engine's queues."""
        return {
            **self.counts,
            "waiting": len(self.llm.scheduler.waiting),
            "running": len(self.llm.scheduler.running),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "prealloc": self.counts["prealloc"],
            "transfer": self.counts["transfer"],
            "running": len(self._streams),
            "pages_in_use": self.llm.allocator.num_in_use,
            "pages_quarantined": self._quarantined,
            "pages_total": self.llm.allocator.num_pages,
            "metadata_slots_held": self.endpoint.metadata.num_held,
        }


async def step_and_dispatch(llm: LLM, streams: dict[str, asyncio.Queue[Any]]) -> bool:
    """One engine step off the event loop, its outputs to their streams; True if any finished.

    An engine error fails the requests in the batch (their streams get the error) and the loop
    keeps serving.
    """
    try:
        outputs = await asyncio.to_thread(llm.step)
    except Exception as exc:
        log.exception("engine step failed")
        for rid, queue in list(streams.items()):
            queue.put_nowait(DecodeFailed(f"engine step failed: {exc}"))
            llm.abort(rid)
        return True
    finished = False
    for out in outputs:
        queue = streams.get(out.rid)
        if queue is not None:
            queue.put_nowait(out)
        finished |= out.finished
    return finished


def chunk_of(out: Any) -> TokenChunk:
    return TokenChunk(
        token_ids=list(out.token_ids),
        logprobs=list(out.logprobs),
        text=out.text,
        finish_reason=out.finish_reason.value if out.finish_reason else None,
        num_prompt_tokens=out.num_prompt_tokens,
        num_output_tokens=out.num_output_tokens,
    )


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


class DecodeDeployment:
    """Serve replica of the decode role; streams `TokenChunk`s."""

    async def __init__(self, config: dict[str, Any], prefill: Any) -> None:
        from engine.logs import configure_logging

        configure_logging()
        self.config = DecodeConfig.model_validate(config)
        app, replica = serve_replica_identity()
        self.instance = DecodeInstance(self.config, _PrefillHandle(prefill), replica)
        export_process_metrics(app, "decode")

    async def generate(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in self.instance.generate(request):
            yield chunk

    async def stats(self) -> dict[str, Any]:
        return self.instance.stats()


class _PrefillHandle:
    """Adapts a Serve handle to the `async prefill(request)` the instance calls."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def prefill(self, request: PrefillRequest) -> Any:
        return await self._handle.prefill.remote(request)
