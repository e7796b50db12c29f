"""The decode deployment: the whole model, its paged KV registered with Mooncake, and a
continuous-batching loop that streams tokens.

A request's life here: preallocate pages for its prompt (waiting, with a bound, when memory is
short), publish receiver info and ask the prefill deployment to fill those pages, learn that
every stage delivered, then join the running batch with the first token the last stage sent
through the KV transfer. Cancelling the caller's stream aborts it here and at the prefill side;
pages that a stage might still write into stay out of reuse until no write can land.

The engine step runs in a worker thread, so the event loop never touches the batch while a step
runs: it queues page requests (the prealloc queue), joins and aborts, and the decode loop applies
them between steps. Only frees reach the allocator from the loop during a step (the allocator is
thread-safe); they never break the scheduler's check-then-allocate, which allocations would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt

from cluster.errors import error_reason
from cluster.gpu_visibility import actor_device
from cluster.messages import Accepted, DecodeRequest, PrefillRequest, TokenChunk
from cluster.metrics import DecodeMetrics
from cluster.metrics_export import export_process_metrics, serve_replica_identity
from cluster.thread_budget import apply_thread_budget
from deployments.admission import (
    DEFAULT_QUEUE_TIMEOUT_S,
    RoleUnavailable,
    accepted_stream,
)
from deployments.health import FailureStreak, Readiness
from engine import LLM, EngineConfig
from engine.page_allocator import pages_needed
from transport.config import TransportConfig
from transport.endpoint import TransferEndpoint
from transport.metadata import FirstToken
from transport.poll import KVPoll
from transport.receiver import KVReceiver
from transport.receiver_info import KVLayout

log = logging.getLogger(__name__)


class DecodeConfig(BaseModel):
    """One decode role: its engine (model, KV pages, batching), how long to wait for memory
    and for a prefill replica, and what each replica asks Ray for."""

    engine: EngineConfig
    prealloc_timeout_s: PositiveFloat = Field(
        30.0, description="a request waiting this long for KV pages fails with 503"
    )
    num_prefill_stages: PositiveInt = Field(2, description="the prefill role's PP size")
    num_gpus: float = Field(1.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_replicas: PositiveInt = 1
    queue_timeout_s: PositiveFloat = Field(
        DEFAULT_QUEUE_TIMEOUT_S,
        description="a request no prefill replica takes within this fails with 503",
    )
    transport: TransportConfig = Field(default_factory=TransportConfig)


def on_this_actor(engine: EngineConfig) -> EngineConfig:
    """The engine config as this actor runs it: `device: auto` resolves to the GPU Ray gave
    this actor (decode and colocated replicas alike)."""
    return engine.model_copy(update={"device": actor_device(engine.device)})


class DecodeOverloaded(RuntimeError):
    """No KV pages freed up within the prealloc bound: the caller should retry (503)."""


class DecodeFailed(RuntimeError):
    """The request could not be prefilled or its KV never arrived (502/500)."""


@dataclass(eq=False)
class _PageRequest:
    """A request in the prealloc queue; the decode loop grants its pages between steps."""

    rid: str
    count: int
    granted: asyncio.Future[list[int]]


@dataclass(frozen=True)
class ChoicePages:
    """The pages of a request's n choices: the prompt's full pages, which every choice reads and
    none writes, held once; and one tail per choice, from the prompt's last, partial page on,
    where each choice writes its own tokens. The KV arrives into choice 0's pages; forking
    copies choice 0's first tail page onto the others' and adds holders to the full pages."""

    shared: list[int]
    tails: list[list[int]]

    @staticmethod
    def needed(num_prompt_tokens: int, n: int, page_size: int) -> int:
        """Pages for the prompt and each choice's first token."""
        full = num_prompt_tokens // page_size
        return full + n * (pages_needed(num_prompt_tokens + 1, page_size) - full)

    @classmethod
    def split(cls, pages: list[int], num_prompt_tokens: int, n: int, page_size: int) -> ChoicePages:
        full = num_prompt_tokens // page_size
        tail = (len(pages) - full) // n
        return cls(pages[:full], [pages[full + i * tail : full + (i + 1) * tail] for i in range(n)])

    def of_choice(self, index: int) -> list[int]:
        return self.shared + self.tails[index]

    @property
    def all(self) -> list[int]:
        """Every page once, as preallocated (before the fork, each has one holder)."""
        return self.shared + [page for tail in self.tails for page in tail]


class JoinState(enum.Enum):
    WAITING = "waiting"  # queued for the loop
    JOINED = "joined"  # in the batch: leaving early means an abort
    FAILED = "failed"  # add_prefilled raised; the loop gave the pages back
    CANCELLED = "cancelled"  # its caller left first: the loop drops it, its caller freed the pages


@dataclass(eq=False)
class _Join:
    """A prefilled request waiting to join the batch; the decode loop adds it between steps and
    puts its first output (or the error) into `stream`."""

    request: DecodeRequest
    pages: ChoicePages
    first: FirstToken
    stream: asyncio.Queue[Any]
    state: JoinState = JoinState.WAITING
    forked: bool = False  # each choice holds the shared pages (until then, the request does)

    def children(self) -> list[tuple[str, int, list[int]]]:
        """(engine rid, choice index, pages) of each of the request's choices."""
        rid = self.request.rid
        return [
            (rid if i == 0 else f"{rid}#{i}", i, self.pages.of_choice(i))
            for i in range(len(self.pages.tails))
        ]


class DecodeInstance:
    """The decode engine of one replica and the per-request protocol around it."""

    def __init__(
        self,
        config: DecodeConfig,
        prefill: Any,
        replica: str = "decode",
        actor_name: str | None = None,
    ) -> None:
        self.config = config
        self.prefill = prefill  # a handle (or object) with `async prefill(PrefillRequest)`
        self.replica = replica
        self.actor_name = actor_name  # told to prefill, which checks we are alive
        self.streak = FailureStreak()
        apply_thread_budget(replica)
        self.llm = LLM(on_this_actor(config.engine))
        self.endpoint = TransferEndpoint(config.transport)
        self.endpoint.register_cache(self.llm.kv_cache)
        self.layout = KVLayout.from_spec(
            self.llm.kv_cache.spec, self.llm.model_config.num_hidden_layers
        )
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        # What the event loop asks of the batch; the decode loop applies it between steps.
        self._prealloc: deque[_PageRequest] = deque()
        self._joins: list[_Join] = []
        self._pending_aborts: list[str] = []
        self._work = asyncio.Event()
        self._quarantined = 0
        self.counts = {"prealloc": 0, "transfer": 0}
        self.metrics = DecodeMetrics(
            replica,
            self.llm.allocator.num_pages,
            queues=self.queue_sizes,
            pages_in_use=lambda: self.llm.allocator.num_in_use,
        )
        self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    # -- one request --------------------------------------------------------------------------

    async def generate(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """Stream a request's tokens; the first comes from the prefill side."""
        timer = self.metrics.request(len(request.prompt_token_ids))
        started = time.perf_counter()
        try:
            pages = await self._preallocate(request)  # the prompt's, and n choices' tails
        except DecodeOverloaded as exc:
            self.metrics.failed(str(exc), before_transfer=True)
            raise
        n = request.sampling.n
        choices = ChoicePages.split(
            pages, len(request.prompt_token_ids), n, self.config.engine.page_size
        )
        try:
            receiver = KVReceiver(
                self.endpoint,
                rid=request.rid,
                room=request.room,
                regions=self.llm.kv_cache.regions(),
                layout=self.layout,
                page_indices=choices.of_choice(0),  # the KV comes once; the others fork it
                num_stages=self.config.num_prefill_stages,
            )
        except Exception:  # e.g. every metadata slot held: nothing was published yet
            self._free(pages)
            raise
        join: _Join | None = None
        finished = False
        timeline = {"prealloc": time.perf_counter() - started}
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
                        decode_replica=self.actor_name,
                    )
                )
            except RoleUnavailable as exc:  # no prefill replica took it: 503, as it is
                receiver.abort(str(exc))
                raise
            except Exception as exc:
                receiver.abort(f"prefill failed: {exc}")
                raise DecodeFailed(f"prefill failed: {error_reason(exc)}") from exc
            finally:
                self.counts["transfer"] -= 1
            prefilled = time.perf_counter()
            timeline["prefill_call"] = prefilled - started - timeline["prealloc"]
            for stage in range(len(result.stage_sessions)):
                receiver.on_stage_result(stage, True)
            if receiver.poll() is not KVPoll.Success or receiver.first_token is None:
                reason = f"KV transfer incomplete: {receiver.failure_reason}"
                self.metrics.failed(reason, before_transfer=False)
                self.streak.failed(reason)
                raise DecodeFailed(reason)
            # The first token was read from our own pages' metadata slot; the loop joins the
            # request between steps and puts its first output in the stream.
            # Its top alternatives and the prompt's scores, when asked, came with the
            # prefill's answer.
            first = dataclasses.replace(
                receiver.first_token,
                top_logprobs=result.first_token.top_logprobs,
                prompt_logprobs=result.first_token.prompt_logprobs,
                more_choices=result.first_token.more_choices,
            )
            join = _Join(request, choices, first, asyncio.Queue())
            self._joins.append(join)
            self._work.set()
            ended: set[int] = set()
            while not finished:
                item = await join.stream.get()
                if isinstance(item, BaseException):  # the batch failed it: our own failure
                    self.streak.failed(str(item))
                    raise item
                timer.tokens(len(item.token_ids))
                if "join" not in timeline:
                    timeline["join"] = time.perf_counter() - prefilled
                    self._record(request.rid, timeline, result.phases)
                yield chunk_of(item)
                if item.finished:
                    ended.add(item.index)
                finished = len(ended) == n
            timer.finished()
            self.streak.succeeded()
        finally:
            self._leave(request.rid, join, finished, pages, receiver)
            receiver.release()

    def _record(self, rid: str, timeline: dict[str, float], prefill: dict[str, float]) -> None:
        """One request's way to its first token: the decode phases as histograms, and the
        whole timeline (the prefill side's phases inside `prefill_call`) in one log line."""
        for phase, seconds in timeline.items():
            self.metrics.phase(phase, seconds)
        phases = {**timeline, **{f"prefill.{k}": v for k, v in prefill.items()}}
        log.info(
            "first token",
            extra={"rid": rid, "phases_ms": {k: round(v * 1e3, 2) for k, v in phases.items()}},
        )

    def _leave(
        self,
        rid: str,
        join: _Join | None,
        finished: bool,
        pages: list[int],
        receiver: KVReceiver,
    ) -> None:
        """The request's stream ended (finished, failed or cancelled): give back what it holds,
        exactly once, by who holds it at this moment."""
        if join is None:  # never queued to join: the pages are still ours
            self._release(pages, receiver)
            return
        children = [child for child, _, _ in join.children()]
        for child in children:
            if self._streams.get(child) is join.stream:
                del self._streams[child]
        if join.state is JoinState.WAITING:
            join.state = JoinState.CANCELLED  # the loop drops it: never joined after this
            log.info("request left before joining the batch", extra={"rid": rid})
            self._release(pages, receiver)  # the KV arrived: nothing can write into them
        elif join.state is JoinState.JOINED and not finished:
            self._pending_aborts += children  # the engine frees their pages (ended ones: no-op)
            self._work.set()
        # FAILED: the loop gave the pages back; JOINED and finished: the engine did.

    async def _preallocate(self, request: DecodeRequest) -> list[int]:
        """Pages for the prompt and the first token, granted by the loop between steps (the
        scheduler inside a step checks free pages, then takes them: nobody may take any in
        between). Waits, with a bound, while memory is short."""
        need = ChoicePages.needed(
            len(request.prompt_token_ids), request.sampling.n, self.config.engine.page_size
        )
        if need > self.llm.allocator.num_pages:  # would hold the queue's head until it timed out
            raise DecodeOverloaded(
                f"the prompt needs {need} KV pages, this decode replica's whole cache has "
                f"{self.llm.allocator.num_pages}"
            )
        ask = _PageRequest(request.rid, need, asyncio.get_running_loop().create_future())
        self._prealloc.append(ask)
        self._work.set()
        self.counts["prealloc"] += 1
        pages: list[int] | None = None
        try:
            async with asyncio.timeout(self.config.prealloc_timeout_s):
                pages = await ask.granted
            return pages
        except TimeoutError:
            raise DecodeOverloaded(
                f"no KV memory for {need} pages within {self.config.prealloc_timeout_s}s"
            ) from None
        finally:
            self.counts["prealloc"] -= 1
            if not ask.granted.done():
                ask.granted.cancel()  # the loop drops it
            elif pages is None and not ask.granted.cancelled():
                # Granted, but the timeout or a cancel reached us before we resumed.
                self._free(ask.granted.result())

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
        """Give pages back (safe while a step runs) and wake the loop for the prealloc queue."""
        self.llm.allocator.free(pages)
        self._work.set()

    # -- the batch ----------------------------------------------------------------------------

    async def _decode_loop(self) -> None:
        """The batch's one driver. Between steps, with no step running, it applies aborts,
        grants pages and joins requests; the step runs in a worker thread meanwhile."""
        while True:
            self._apply_aborts()
            self._grant_pages()
            self._apply_joins()
            if not self.llm.has_unfinished():
                self._work.clear()
                await self._work.wait()
                continue
            await step_and_dispatch(self.llm, self._streams)

    def _apply_aborts(self) -> None:
        aborts, self._pending_aborts = self._pending_aborts, []
        for rid in aborts:
            self.llm.abort(rid)

    def _grant_pages(self) -> None:
        """Hand pages to the prealloc queue in arrival order. The oldest request that does not
        fit holds back those behind it (as vLLM's waiting queue does): granting whatever fits
        let a stream of small requests take every page freed, and a large one waited until it
        timed out."""
        allocator, queue = self.llm.allocator, self._prealloc
        while queue:
            ask = queue[0]
            if not ask.granted.done():  # else its caller gave up
                if not allocator.can_allocate(ask.count):
                    return
                ask.granted.set_result(allocator.allocate(ask.count))
            queue.popleft()

    def _apply_joins(self) -> None:
        """Add the prefilled requests to the batch; each gets its first output or the error."""
        joins, self._joins = self._joins, []
        for join in joins:
            if join.state is not JoinState.WAITING:
                continue  # its caller left first and freed the pages
            request = join.request
            try:
                outs = self._join_choices(join)
            except Exception as exc:
                log.exception("joining the batch failed", extra={"rid": request.rid})
                join.state = JoinState.FAILED
                self._undo_join(join)
                join.stream.put_nowait(
                    DecodeFailed(f"joining the batch failed: {error_reason(exc)}")
                )
                continue
            join.state = JoinState.JOINED
            for child, out in outs:
                if not out.finished:
                    self._streams[child] = join.stream
                join.stream.put_nowait(out)

    def _join_choices(self, join: _Join) -> list[tuple[str, Any]]:
        """Adds each of the request's choices to the batch, with its first token, all on the
        pages the KV arrived in (no step runs meanwhile)."""
        request, first = join.request, join.first
        firsts = [(first.token_id, first.logprob, first.top_logprobs), *first.more_choices]
        if len(firsts) != len(join.children()):
            raise RuntimeError(f"{len(firsts)} first tokens for {len(join.children())} choices")
        self._fork(join)
        outs = []
        for (child, index, pages), (token, logprob, top) in zip(
            join.children(), firsts, strict=True
        ):
            params = request.sampling.for_choice(index) if request.sampling.n > 1 else None
            out = self.llm.add_prefilled(
                child,
                request.prompt_token_ids,
                params or request.sampling,
                pages,
                token,
                logprob,
                top,
                first.prompt_logprobs,
                index=index,
            )
            outs.append((child, out))
        return outs

    def _fork(self, join: _Join) -> None:
        """Choices 1..n-1 get the prompt's last, partial page copied from choice 0 (each writes
        its own tokens into it) and become holders of the full pages."""
        pages, n = join.pages, len(join.pages.tails)
        if n > 1 and len(join.request.prompt_token_ids) % self.config.engine.page_size:
            first_tail = pages.tails[0][0]
            self.llm.kv_cache.copy_pages(
                [first_tail] * (n - 1), [tail[0] for tail in pages.tails[1:]]
            )
        self.llm.allocator.share(pages.shared, holders=n - 1)  # none for n = 1
        join.forked = True

    def _undo_join(self, join: _Join) -> None:
        """Joining raised: free the join's pages once, each choice's through the engine if it
        got into the batch (then they are its pages), else here."""
        if not join.forked:  # no choice holds anything yet
            self._free(join.pages.all)
            return
        running = self.llm.scheduler.running
        for child, _, pages in join.children():
            if any(s.rid == child and s.page_table.pages == pages for s in running):
                self.llm.abort(child)
            else:
                self._free(pages)

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
            "joining": sum(j.state is JoinState.WAITING for j in self._joins),
            "running": len(self._streams),
            "pages_in_use": self.llm.allocator.num_in_use,
            "pages_quarantined": self._quarantined,
            "pages_total": self.llm.allocator.num_pages,
            "metadata_slots_held": self.endpoint.metadata.num_held,
        }

    def readiness(self) -> Readiness:
        """Ready unless the decode loop stopped or the last requests all failed here."""
        reasons = []
        if self._loop_task.done():
            reasons.append(f"decode {self.replica}: the decode loop stopped")
        if (streak := self.streak.verdict()) is not None:
            reasons.append(f"decode {self.replica}: {streak}")
        self.metrics.healthy(not reasons)
        return Readiness(f"decode/{self.replica}", tuple(reasons))

    async def close(self) -> None:
        """Stop the loop and let go of the transport and the metrics (a replica's process ends
        with them; tests that start an instance in-process call this)."""
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self.endpoint.close()
        self.metrics.close()


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
        top_logprobs=list(out.top_logprobs),
        prompt_logprobs=out.prompt_logprobs,
        index=out.index,
        text=out.text,
        finish_reason=out.finish_reason.value if out.finish_reason else None,
        num_prompt_tokens=out.num_prompt_tokens,
        num_output_tokens=out.num_output_tokens,
    )


class DecodeDeployment:
    """Serve replica of the decode role; streams `TokenChunk`s."""

    async def __init__(self, config: dict[str, Any], prefill: Any) -> None:
        from engine.logs import configure_logging

        configure_logging()
        self.config = DecodeConfig.model_validate(config)
        import ray

        app, replica = serve_replica_identity()
        actor_name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
        prefill_handle = _PrefillHandle(prefill, app, self.config.queue_timeout_s)
        self.instance = DecodeInstance(self.config, prefill_handle, replica, actor_name)
        export_process_metrics(app, "decode")

    async def generate(self, request: DecodeRequest) -> AsyncIterator[Accepted | TokenChunk]:
        """`Accepted` first (the caller's queue wait ends here), then the tokens."""
        yield Accepted()
        async for chunk in self.instance.generate(request):
            yield chunk

    async def stats(self) -> dict[str, Any]:
        return self.instance.stats()

    async def readiness(self) -> dict[str, Any]:
        return self.instance.readiness().as_dict()

    async def check_health(self) -> None:
        """Serve replaces a replica that stays unready (three failed checks in a row)."""
        readiness = self.instance.readiness()
        if not readiness.ready:
            raise RuntimeError("; ".join(readiness.reasons))


class _PrefillHandle:
    """Adapts a Serve handle to the `async prefill(request)` the instance calls, with a bounded
    wait for a prefill replica to take the request (`deployments.admission`)."""

    def __init__(self, handle: Any, app: str, queue_timeout_s: float) -> None:
        self._handle = handle
        self._app = app
        self._timeout_s = queue_timeout_s

    async def prefill(self, request: PrefillRequest) -> Any:
        name = self._handle.deployment_name
        stream = accepted_stream(
            self._handle.prefill.options(stream=True).remote(request),
            role=name,
            app=self._app,
            deployment=name,
            timeout_s=self._timeout_s,
        )
        async for result in stream:
            return result
        raise RuntimeError(f"{name} ended its stream without a result")
