"""The PP stage actor: layers `[a, b)` of the model, their KV pages, their senders, one
Mooncake engine, and a seat in the instance's collective group.

It runs every plan the controller sends, in order (`PlanExecutor`). Stage k's step takes stage
k-1's `HiddenHandoff` as an argument and returns its own, so Ray starts it once it exists; the
hidden states themselves stay on the GPU where they can (`cluster.hidden_channel`). Consensus
ticks run on the stage's own thread, so no step waits on an all-reduce.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from cluster.consensus import gloo_allreduce_min
from cluster.gpu_visibility import NOSET_VISIBLE_DEVICES, actor_device
from cluster.messages import HiddenHandoff, HiddenLink, HiddenSlots, StageReport, StepPlan
from cluster.metrics import StageMetrics
from cluster.metrics_export import export_process_metrics
from cluster.plan_executor import PlanExecutor
from cluster.stage_requests import StageRequests
from cluster.thread_budget import apply_thread_budget
from engine import EngineConfig
from engine.config import ModelConfig
from engine.kv_cache import KVCacheSpec
from engine.logs import configure_logging
from transport.config import TransportConfig
from transport.receiver_info import KVLayout

if TYPE_CHECKING:
    import torch

    from cluster.hidden_channel import HiddenInbox, HiddenSender
    from transport.cuda_ipc.backend import IpcBackend
    from transport.sender import KVSender

log = logging.getLogger(__name__)


# Ray concurrency groups of a stage actor beside its one default thread (steps, in order).
HEALTH_GROUP = {"health": 1}


@dataclass(frozen=True)
class StageSpec:
    """Everything one stage actor needs to build itself: the instance's engine settings (model,
    dtype, device, KV pages) and its own place in the pipeline."""

    engine: EngineConfig
    start: int
    end: int
    pp_rank: int
    pp_size: int
    replica: str = ""
    app: str = ""  # the Serve application, for metrics discovery
    transport: TransportConfig = field(default_factory=TransportConfig)
    # The most tokens one step carries: the rows of the hidden-state slots (None: the engine's
    # `max_num_batched_tokens`; a larger step's states go through the host).
    max_batched_tokens: int | None = None


class StageActor:
    """One PP stage of one prefill instance (created as a Ray actor by `StageGroup`).

    The model, the KV cache and the transfer engine are imported where they are built, in the
    actor's own process: the prefill controller that creates these actors imports this module
    too, and holds no model, so it never loads torch."""

    def __init__(self, spec: StageSpec) -> None:
        from cluster.hidden_channel import HiddenInbox, HostSender
        from cluster.stage_compute import LayerCompute
        from engine.kv_cache import PagedKVCache
        from engine.layer_range import LayerRange
        from engine.loader import load_stage
        from engine.runner import StageRunner, freeze_loaded_objects, resolve_device, resolve_dtype
        from transport.cuda_ipc.backend import CudaIpc
        from transport.endpoint import TransferEndpoint

        configure_logging()
        apply_thread_budget(f"prefill-stage-{spec.pp_rank}")
        self.spec = spec
        engine = spec.engine
        if engine.num_pages is None:
            raise ValueError("a stage needs its KV pages counted (engine.num_pages)")
        self.num_pages = engine.num_pages
        config = ModelConfig.from_dir(engine.model)
        device = resolve_device(actor_device(engine.device))
        dtype = resolve_dtype(engine.dtype, device)
        stage = load_stage(  # prefill only: no decode panels
            engine.model, LayerRange(spec.start, spec.end), dtype, device, config, decode=False
        )
        kv_spec = KVCacheSpec(
            num_pages=self.num_pages,
            page_size=engine.page_size,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=dtype,
        )
        self.cache = PagedKVCache(kv_spec, spec.start, spec.end - spec.start, device)
        self.runner = StageRunner(stage, self.cache)
        self.layout = KVLayout.from_spec(kv_spec, config.num_hidden_layers)
        self.is_last = spec.end == config.num_hidden_layers
        self.endpoint = TransferEndpoint(spec.transport)
        self.endpoint.register_cache(self.cache)
        freeze_loaded_objects()
        self.requests = StageRequests(
            self._make_sender,
            pp_rank=spec.pp_rank,
            on_transferred=lambda s: self.metrics.transferred(s.stats.nbytes, s.stats.seconds),
        )
        self._group: str | None = None
        compute = LayerCompute(
            self.runner, spec.pp_rank, spec.start == 0, self.is_last, model=engine.model
        )
        self.executor = PlanExecutor(
            self.requests,
            self._allreduce_min,
            compute,
            self.is_last,
            on_tick=lambda seconds: self.metrics.observe_tick(seconds),
        )
        self.metrics = StageMetrics(
            spec.replica,
            spec.pp_rank,
            self.num_pages,
            queues=self.executor.queue_sizes,
            pages_in_use=lambda: self.requests.pages_in_use,
        )
        self.endpoint.on_repair = self.metrics.repaired
        self.device = device
        self._ipc: IpcBackend = (
            self.endpoint.cuda_ipc.backend if self.endpoint.cuda_ipc else CudaIpc()
        )
        self.hidden_in: HiddenInbox | None = None
        if spec.start > 0:
            self.hidden_in = HiddenInbox(
                spec.transport.hidden_channel,
                device,
                dtype,
                spec.max_batched_tokens or engine.max_num_batched_tokens,
                config.hidden_size,
                self._ipc,
                self.endpoint,
            )
        self.hidden_out: HiddenSender | None = None if self.is_last else HostSender("not connected")
        export_process_metrics(spec.app, "prefill-stage")

    def ready(self) -> dict[str, Any]:
        return {
            "pp_rank": self.spec.pp_rank,
            "session_id": self.endpoint.session_id,
            "pid": os.getpid(),
            "layers": [self.spec.start, self.spec.end],
            "device": str(self.runner.device),
            "gpus": [str(i) for i in ray.get_gpu_ids()],
            "all_gpus_visible": os.environ.get(NOSET_VISIBLE_DEVICES) == "1",
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def init_collective(self, world: int, rank: int, group: str) -> None:
        """Join the instance's gloo group; every stage must call this at the same time."""
        if world > 1:
            from ray.util import collective

            collective.init_collective_group(world, rank, backend="gloo", group_name=group)
            self._group = group

    def hidden_slots(self) -> HiddenSlots:
        """This stage's input slots, for the previous stage's `connect_downstream`."""
        if self.hidden_in is None:
            raise RuntimeError("the first stage takes token ids, not hidden states")
        return self.hidden_in.offer()

    def connect_downstream(self, slots: HiddenSlots) -> HiddenLink:
        """Choose how this stage's hidden states reach the next one (once per generation)."""
        from cluster.hidden_channel import connect_sender

        if self.hidden_out is None:
            raise RuntimeError("the last stage hands no hidden states on")
        self.hidden_out.close()
        self.hidden_out = connect_sender(
            slots, self.spec.transport.hidden_channel, self.device, self._ipc, self.endpoint
        )
        return self.hidden_out.link

    def connect_upstream(self, link: HiddenLink) -> None:
        """The previous stage's choice (`connect_downstream`'s answer)."""
        if self.hidden_in is None:
            raise RuntimeError("the first stage takes token ids, not hidden states")
        self.hidden_in.connect(link)

    def step(
        self, plan: StepPlan, upstream: list[ray.ObjectRef] | None = None
    ) -> tuple[StageReport, HiddenHandoff | None]:
        """Apply one plan; returns this stage's report and the handoff of its hidden states.

        `upstream` holds the previous stage's handoff as a reference, not the value (a list,
        so Ray does not wait for it before calling): this stage applies the plan and joins its
        tick while the stage before it computes, and fetches the handoff only then."""
        inbox = self.hidden_in

        def fetch() -> torch.Tensor:
            assert upstream is not None and inbox is not None
            return inbox.receive(ray.get(upstream[0]))

        report, out = self.executor.step(plan, fetch if upstream is not None else None)
        if out is None or self.hidden_out is None:
            return report, None
        return report, self.hidden_out.send(out)

    def read_pages(self, pages: list[int]) -> list[torch.Tensor]:
        """K and V of `pages` for every layer of this stage (tests compare them byte for byte)."""
        import torch

        index = torch.tensor(pages, dtype=torch.long)
        return [layer[:, index].cpu().clone() for layer in self.cache.layers]

    def stats(self) -> dict[str, Any]:
        return {
            "num_requests": len(self.requests.senders),
            "pages_in_use": self.requests.pages_in_use,
            "queue_sizes": self.executor.queue_sizes(),
            "metadata_slots_held": self.endpoint.metadata.num_held,
            "hidden_received": dict(self.hidden_in.received) if self.hidden_in else {},
        }

    @ray.method(concurrency_group="health")
    def unreachable(self, sessions: list[str]) -> dict[str, str]:
        """The decode sessions this stage's transport cannot reach now, with why. On a thread
        of its own (`HEALTH_GROUP`), so a health check never waits behind a long step."""
        return {s: "probe failed" for s in sessions if not self.endpoint.reachable(s)}

    def inject_fault(self, fault: str, *args: Any) -> None:
        """Fault hook (tests, the soak): `fail_next_writes(count)` or
        `set_unreachable(session or None, on)` on this stage's transport."""
        if fault not in ("fail_next_writes", "set_unreachable"):
            raise ValueError(f"unknown fault {fault!r}")
        log.warning("fault injected: %s%s", fault, args, extra={"pp_rank": self.spec.pp_rank})
        getattr(self.endpoint.faults, fault)(*args)

    def admit_untracked(self, rid: str) -> None:
        """Test hook: a request only this rank holds (see `PlanExecutor.admit_untracked`)."""
        self.executor.admit_untracked(rid)

    def shutdown(self) -> None:
        self.metrics.close()
        self.executor.close()
        for rid in list(self.requests.senders):
            self.requests.drop(rid, "stage shutting down")
        if self.hidden_out is not None:
            self.hidden_out.close()
        if self.hidden_in is not None:
            self.hidden_in.close()
        self.endpoint.close()
        if self._group is not None:
            from ray.util import collective

            collective.destroy_collective_group(self._group)
            self._group = None

    # -- internals ----------------------------------------------------------------------------

    def _make_sender(self, rid: str, room: int) -> KVSender:
        from transport.sender import KVSender

        return KVSender(
            self.endpoint,
            rid=rid,
            room=room,
            regions=self.cache.regions(),
            layout=self.layout,
            is_last_stage=self.is_last,
            pp_rank=self.spec.pp_rank,
        )

    def _allreduce_min(self, values: list[int]) -> list[int]:
        return gloo_allreduce_min(self._group)(values)
