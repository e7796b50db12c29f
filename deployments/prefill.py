"""The prefill deployment: a Serve replica that is the controller of one prefill instance.

`PrefillInstance` is the controller's event loop around the pure `PrefillController`: it
builds one plan per step, awaits the stages (never blocking the loop on the network), applies
their reports once, and resolves the callers' futures. `PrefillDeployment` puts it in Ray
Serve; `build_prefill_app` turns a `PrefillConfig` into a Serve application.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import ray
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, model_validator

from cluster.errors import error_reason
from cluster.messages import Accepted, PrefillRequest, PrefillResult
from cluster.metrics import PrefillMetrics, reason_label
from cluster.metrics_export import export_process_metrics, serve_replica_identity
from cluster.stage_actor import StageSpec
from cluster.stage_group import Placement, StageGroup, StageGroupError
from deployments.health import FailureStreak, Readiness
from deployments.prefill_controller import ControllerConfig, Ended, PrefillController
from engine import EngineConfig
from engine.config import ModelConfig
from engine.layer_range import split_layers
from transport.config import TransportConfig
from transport.receiver_info import ReceiverInfo

log = logging.getLogger(__name__)

# Failures that are this instance's own doing (a stage died: the rebuild is the repair, and
# the readiness view says so while it runs; a decode peer died or the caller left: not ours).
OWN_FAILURES = frozenset({"write_failed", "transfer_timeout", "other", "unknown"})
PEER_RECENT_S = 60.0  # a decode peer that sent nothing this long is no longer checked
PROBE_TIMEOUT_S = 5.0


@dataclass
class DecodePeer:
    """A decode replica this instance writes to, as its requests named it."""

    replica: str | None  # its Ray actor name (Serve replicas are named), when it has one
    last_seen: float


class PrefillConfig(BaseModel):
    """One prefill role: every stage's engine (model, KV pages per stage), PP size, placement,
    scheduling and transport."""

    engine: EngineConfig
    pp_size: PositiveInt = 2
    placement_strategy: Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"] = "PACK"
    num_gpus_per_stage: float = Field(1.0, ge=0)
    num_cpus_per_stage: float = Field(1.0, ge=0)
    max_prompt_len: PositiveInt = 4096
    max_batched_tokens: PositiveInt = 2048
    max_batched_requests: PositiveInt = 64
    idle_tick_s: PositiveFloat = Field(
        0.005, description="pause between steps while only bootstraps or transfers are pending"
    )
    num_replicas: PositiveInt = 1
    transport: TransportConfig = Field(default_factory=TransportConfig)

    @model_validator(mode="after")
    def _pages_are_counted(self) -> PrefillConfig:
        if self.engine.num_pages is None:
            raise ValueError("engine.num_pages: a prefill instance needs its KV pages counted")
        return self

    def stage_specs(self, replica: str = "", app: str = "") -> list[StageSpec]:
        num_layers = ModelConfig.from_dir(self.engine.model).num_hidden_layers
        return [
            StageSpec(
                engine=self.engine,
                start=r.start,
                end=r.end,
                pp_rank=i,
                pp_size=self.pp_size,
                replica=replica,
                app=app,
                transport=self.transport,
                max_batched_tokens=self.max_batched_tokens,
            )
            for i, r in enumerate(split_layers(num_layers, self.pp_size))
        ]

    def controller(self) -> ControllerConfig:
        """The controller's pages are the stages' pages: one page table for the instance."""
        return ControllerConfig(
            num_pages=self.engine.num_pages,  # type: ignore[arg-type]  # checked below
            page_size=self.engine.page_size,
            max_batched_tokens=self.max_batched_tokens,
            max_prompt_len=self.max_prompt_len,
            max_batched_requests=self.max_batched_requests,
        )

    def placement(self) -> Placement:
        return Placement(
            strategy=self.placement_strategy,
            num_gpus=self.num_gpus_per_stage,
            num_cpus=self.num_cpus_per_stage,
        )


class PrefillFailed(RuntimeError):
    """A request the instance could not prefill and ship; the message is the reason."""


class PrefillInstance:
    """Controller loop of one prefill instance (its stages live in `StageGroup`)."""

    def __init__(self, config: PrefillConfig, name: str = "", app: str = "") -> None:
        self.config = config
        self.name = name or uuid.uuid4().hex[:8]
        self.controller = PrefillController(config.controller())
        self.group = StageGroup(config.stage_specs(self.name, app), config.placement(), self.name)
        self.metrics = PrefillMetrics(self.name, config.pp_size, self.controller.queue_sizes)
        self._futures: dict[str, asyncio.Future[Ended]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.healthy = False
        self.last_error: str | None = None
        self.ended_log: deque[Ended] = deque(maxlen=1024)  # recent outcomes, for diagnostics
        self.streak = FailureStreak()
        self.peers: dict[str, DecodePeer] = {}  # decode session -> who it is, last request
        self._lost: str | None = None  # a stage found dead outside a step: rebuild it

    async def start(self) -> None:
        await self.group.start()
        self._set_healthy(True)
        self._loop_task = asyncio.create_task(self._run(), name=f"prefill-{self.name}")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for ended in self.controller.fail_all("prefill instance shutting down"):
            self._resolve(ended)
        await self.group.shutdown()
        self.metrics.close()

    def _set_healthy(self, up: bool) -> None:
        self.healthy = up
        self.metrics.healthy(up)

    @property
    def stage_sessions(self) -> list[str]:
        return [i["session_id"] for i in self.group.info]

    # -- caller-facing ------------------------------------------------------------------------

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Prefill one prompt and ship its KV; raises `PromptRejected` or `PrefillFailed`.

        Cancelling the awaiting task (a client disconnect) aborts the request everywhere.
        """
        self.controller.add(request)  # PromptRejected propagates before any state exists
        if request.receiver_info is not None:
            self.peers[request.receiver_info.session_id] = DecodePeer(
                request.decode_replica, time.monotonic()
            )
        future: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self._futures[request.rid] = future
        self._wake.set()
        try:
            ended = await future
        except asyncio.CancelledError:
            self.abort(request.rid, "cancelled by the caller")
            raise
        finally:
            self._futures.pop(request.rid, None)
        if not ended.ok or ended.first_token is None:
            raise PrefillFailed(ended.reason or "prefill failed")
        return PrefillResult(request.rid, ended.first_token, self.stage_sessions, ended.phases)

    def set_receiver_info(self, rid: str, info: ReceiverInfo) -> bool:
        accepted = self.controller.set_receiver_info(rid, info)
        self._wake.set()
        return accepted

    def abort(self, rid: str, reason: str = "aborted by the caller") -> None:
        ended = self.controller.abort(rid, reason)
        if ended is not None:
            self._resolve(ended)
            self._wake.set()

    # -- the loop -----------------------------------------------------------------------------

    async def readiness(self) -> Readiness:
        """Ready unless the stages are being rebuilt, a stage cannot reach a live decode peer,
        or the last requests all failed here. A stage found dead is rebuilt now, not at the
        next request."""
        reasons: list[str] = []
        if not self.healthy:
            reasons.append(f"prefill stages are being rebuilt ({self.last_error})")
        elif self._lost is None:
            reasons += await self._unreachable_peers()
        if (streak := self.streak.verdict()) is not None:
            reasons.append(f"prefill {self.name}: {streak}")
        self.metrics.healthy(not reasons)
        return Readiness(f"prefill/{self.name}", tuple(reasons), {"peers": len(self.peers)})

    async def _unreachable_peers(self) -> list[str]:
        """Probe every live decode peer from every stage (the path KV writes take)."""
        sessions = await asyncio.to_thread(self._live_peers)
        try:
            found = await asyncio.wait_for(
                self.group.call_all("unreachable", sessions), PROBE_TIMEOUT_S
            )
        except TimeoutError:
            return [f"prefill {self.name}: a stage did not answer a probe in {PROBE_TIMEOUT_S}s"]
        except ray.exceptions.RayActorError as exc:  # died while idle: rebuild it now
            self._lost = f"a prefill stage failed: {error_reason(exc)}"
            self._wake.set()
            return [f"prefill {self.name}: {self._lost}"]
        except Exception as exc:  # the probe itself failed: say so, it is not a dead stage
            return [f"prefill {self.name}: probing decode peers failed: {error_reason(exc)}"]
        return [
            f"prefill {self.name} pp_rank {rank} cannot reach decode peer {session}: {why}"
            for rank, unreachable in enumerate(found)
            for session, why in unreachable.items()
        ]

    def _live_peers(self) -> list[str]:
        """Decode sessions heard from lately whose replica is alive (a replica that died or
        was replaced is no reason for this one to be restarted). Blocking: GCS lookups."""
        now = time.monotonic()
        live = []
        for session, peer in list(self.peers.items()):
            if now - peer.last_seen > PEER_RECENT_S:
                self.peers.pop(session, None)
                continue
            if peer.replica is not None:
                try:
                    ray.get_actor(peer.replica, namespace="serve")
                except ValueError:  # gone: forget it
                    self.peers.pop(session, None)
                    continue
            live.append(session)
        return live

    async def _run(self) -> None:
        while True:
            if self._lost is not None:
                await self._recover(self._lost)
                continue
            if not self.controller.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            plan = self.controller.plan()
            start = time.perf_counter()
            try:
                reports = await self.group.step(plan)
            except StageGroupError as exc:
                await self._recover(str(exc))
                continue
            self.metrics.observe_step(time.perf_counter() - start)
            ended = self.controller.apply(plan, reports)
            for e in ended:
                self._resolve(e)
            if not plan.batch and not ended:
                # Only bootstraps or transfers pending: poll at a steady rate, not a hot spin.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_tick_s)

    async def _recover(self, reason: str) -> None:
        """A stage died: fail everything in flight, rebuild the stages, serve again."""
        log.error("prefill stage group failed; rebuilding", extra={"reason": reason})
        self._lost = None
        self._set_healthy(False)
        self.last_error = reason
        self.metrics.stage_failure()
        for ended in self.controller.fail_all(reason):
            self._resolve(ended)
        while True:
            try:
                await self.group.rebuild()
            except Exception as exc:  # keep trying; the health check reports us meanwhile
                self.last_error = f"rebuilding stages failed: {exc}"
                log.exception("stage rebuild failed")
                await asyncio.sleep(1.0)
                continue
            self._set_healthy(True)
            self.last_error = None
            return

    def _resolve(self, ended: Ended) -> None:
        self.metrics.request_ended(ended)
        self.ended_log.append(ended)
        if ended.ok:
            self.streak.succeeded()
        elif reason_label(ended.reason) in OWN_FAILURES:
            self.streak.failed(ended.reason or "unknown")
        future = self._futures.get(ended.rid)
        if future is not None and not future.done():
            future.set_result(ended)


class PrefillDeployment:
    """Serve replica = controller of one prefill instance (its stages are its own actors)."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from engine.logs import configure_logging

        configure_logging()
        self.config = PrefillConfig.model_validate(config)
        app, name = serve_replica_identity()
        self.instance = PrefillInstance(self.config, name=name, app=app)
        export_process_metrics(app, "prefill")
        await self.instance.start()

    async def prefill(self, request: PrefillRequest) -> AsyncIterator[Accepted | PrefillResult]:
        """`Accepted` the moment this replica takes the request (the caller's bounded queue
        wait ends there), then the result."""
        yield Accepted()
        yield await self.instance.prefill(request)

    async def abort(self, rid: str, reason: str = "aborted by the caller") -> None:
        self.instance.abort(rid, reason)

    async def stats(self) -> dict[str, Any]:
        return {
            "name": self.instance.name,
            "healthy": self.instance.healthy,
            "queues": self.instance.controller.queue_sizes(),
            "pages_in_use": self.instance.controller.allocator.num_in_use,
            "requests_admitted": self.instance.controller.admitted,
            "stages": await self.instance.group.call_all("stats"),
            "placement": self.instance.group.info,
        }

    async def debug_admit_untracked(self, pp_rank: int, rid: str) -> None:
        """Test hook: make rank `pp_rank` hold a request this controller never admitted (the
        orphan SGLang's per-rank queues leave behind), so alerts on it can be exercised."""
        await self.instance.group.call_one(pp_rank, "admit_untracked", rid)

    async def readiness(self) -> dict[str, Any]:
        return (await self.instance.readiness()).as_dict()

    async def check_health(self) -> None:
        """Serve replaces a replica that stays unready (three failed checks in a row)."""
        readiness = await self.instance.readiness()
        if not readiness.ready:
            raise RuntimeError("; ".join(readiness.reasons))

    async def debug_inject_fault(self, pp_rank: int, fault: str, *args: Any) -> None:
        """Fault hook for tests and the soak: `fault` on stage `pp_rank`'s transport
        (`StageActor.inject_fault`)."""
        await self.instance.group.call_one(pp_rank, "inject_fault", fault, *args)

    async def debug_kill_stage(self, pp_rank: int) -> None:
        """Fault hook for tests and the soak: kill one stage actor, as a node loss would."""
        ray.kill(self.instance.group.actors[pp_rank], no_restart=True)


def build_prefill_app(config: PrefillConfig, name: str = "prefill") -> Any:
    """A Serve application of `config.num_replicas` prefill instances, each gang-scheduled with
    its stages: bundle 0 holds the controller, bundles 1..pp one stage each."""
    from ray import serve

    from deployments.routing import router_config

    stage_bundle = config.placement().bundle()
    deployment = serve.deployment(PrefillDeployment).options(
        name=name,
        num_replicas=config.num_replicas,
        ray_actor_options={"num_cpus": 0.1},
        placement_group_bundles=[{"CPU": 0.1}] + [stage_bundle] * config.pp_size,
        placement_group_strategy=config.placement_strategy,
        max_ongoing_requests=100_000,  # queueing is the controller's job, not Serve's
        health_check_period_s=5,
        health_check_timeout_s=30,
        **router_config(),
    )
    return deployment.bind(config.model_dump(mode="json"))
