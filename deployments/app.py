"""One config for the whole service and the builder that turns it into a Serve application.

The same builder backs `pdserve serve`, `serve run deployments.app:app_builder` with
arguments, and a RayService's `serveConfigV2` (import path `deployments.app:app_builder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from cluster.gpu_visibility import all_gpus_visible_runtime_env
from deployments.admission import DEFAULT_QUEUE_TIMEOUT_S
from deployments.decode import DecodeConfig, DecodeDeployment
from deployments.ingress import API_KEY_ENV, IngressConfig, ingress_deployment
from deployments.prefill import PrefillConfig, build_prefill_app
from deployments.routing import router_config
from engine import EngineConfig, ModelSettings
from engine.config import ModelConfig
from engine.engine_config import Role
from transport.config import TransportConfig


class AppConfig(ModelSettings):
    """Everything a pdserve deployment needs, validated at the edge; each role's config is
    derived from it (`prefill`, `decode`, `ingress`), the shared model settings
    (`ModelSettings`: model, dtype, device, page size) through one `engine` base."""

    served_model_name: str | None = Field(None, description="name in the API; default: dir name")
    pp_size: PositiveInt = 2
    prefill_replicas: PositiveInt = 1
    decode_replicas: PositiveInt = 1
    ingress_replicas: PositiveInt = 1
    prefill_num_pages: PositiveInt = 1024
    decode_num_pages: PositiveInt = 2048
    max_model_len: PositiveInt | None = None
    max_prompt_len: PositiveInt | None = None
    max_batched_tokens: PositiveInt = 2048
    max_num_seqs: PositiveInt = 64
    placement_strategy: Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"] = "PACK"
    num_gpus_per_stage: float = Field(1.0, ge=0)
    # CPUs each process asks Ray for. A GPU node has several cores per GPU; a 2-core machine
    # that simulates GPUs (`pdserve-local.yaml`) gives each a fraction.
    num_cpus_per_stage: float = Field(1.0, ge=0)
    decode_num_gpus: float = Field(1.0, ge=0)
    decode_num_cpus: float = Field(1.0, ge=0)
    ingress_num_cpus: float = Field(0.5, ge=0)
    prealloc_timeout_s: PositiveFloat = 30.0
    queue_timeout_s: PositiveFloat = Field(
        DEFAULT_QUEUE_TIMEOUT_S,
        description="a request that no replica of a role takes within this gets a 503",
    )
    transport: TransportConfig = Field(default_factory=TransportConfig)
    host: str = "127.0.0.1"
    port: PositiveInt = 8000
    api_key: str | None = Field(None, description=f"bearer token; also read from ${API_KEY_ENV}")

    def sharing_cores(self, cores: int, mode: str) -> AppConfig:
        """This config with the compute roles' CPUs split between `cores` of one machine (the
        embedded `--local-cluster`), where not set explicitly. Each engine process computes on
        the floor of its `num_cpus` threads (cluster/thread_budget.py), so the split is the
        thread budget:
        - colocated: the one engine takes every core;
        - pd: decode takes half the cores and the prefill stages share the other half. Decode
          runs a step every few tens of milliseconds for as long as any request streams, so it
          gets cores of its own; the stages of one micro-batch run one after the other, so
          between them they mostly keep one half busy, and overlap only when the pipeline
          holds several micro-batches. The OS, not pinning, settles that overlap: pinned
          halves would leave the prefill cores idle while decode is short of them.
        The ingress and the controller compute little and keep their small shares."""
        explicit = self.model_fields_set
        update: dict[str, float] = {}
        if mode == "colocated":
            update["decode_num_cpus"] = float(cores)
        else:
            update["decode_num_cpus"] = max(1.0, cores / 2)
            update["num_cpus_per_stage"] = max(0.25, cores / 2 / self.pp_size)
        return self.model_copy(update={k: v for k, v in update.items() if k not in explicit})

    def resolved_max_model_len(self) -> int:
        limit = ModelConfig.from_dir(self.model).max_position_embeddings
        return min(self.max_model_len or limit, limit)

    def engine(self) -> EngineConfig:
        """The engine settings every role starts from (each updates its own KV and batching)."""
        shared = self.model_dump(include=set(ModelSettings.model_fields))
        return EngineConfig(**shared, max_model_len=self.resolved_max_model_len())

    def prefill(self) -> PrefillConfig:
        return PrefillConfig(
            engine=self.engine().model_copy(update={"num_pages": self.prefill_num_pages}),
            pp_size=self.pp_size,
            placement_strategy=self.placement_strategy,
            num_gpus_per_stage=self.num_gpus_per_stage,
            num_cpus_per_stage=self.num_cpus_per_stage,
            max_prompt_len=self.max_prompt_len or self.resolved_max_model_len(),
            max_batched_tokens=self.max_batched_tokens,
            num_replicas=self.prefill_replicas,
            transport=self.transport,
        )

    def decode(self, role: Role = "decode") -> DecodeConfig:
        """The decode role's config; the colocated engine is the same with `role="both"`
        (a PD decode replica never prefills, so it keeps only decode's copy of the weights)."""
        engine = self.engine().model_copy(
            update={
                "num_pages": self.decode_num_pages,
                "max_num_seqs": self.max_num_seqs,
                "role": role,
            }
        )
        return DecodeConfig(
            engine=engine,
            prealloc_timeout_s=self.prealloc_timeout_s,
            num_prefill_stages=self.pp_size,
            num_gpus=self.decode_num_gpus,
            num_cpus=self.decode_num_cpus,
            num_replicas=self.decode_replicas,
            queue_timeout_s=self.queue_timeout_s,
            transport=self.transport,
        )

    def ingress(self) -> IngressConfig:
        return IngressConfig(
            model=self.model,
            served_model_name=self.served_model_name or Path(self.model).name,
            max_model_len=self.resolved_max_model_len(),
            max_prompt_len=self.max_prompt_len or self.resolved_max_model_len(),
            queue_timeout_s=self.queue_timeout_s,
            api_key=self.api_key,  # the ingress also reads $PDSERVE_API_KEY where it runs
        )


def build_app(config: AppConfig) -> Any:
    """ingress -> decode -> prefill, each role its own deployment with its own replicas."""
    from ray import serve

    prefill = build_prefill_app(config.prefill())
    decode_config = config.decode()
    decode_actor: dict[str, Any] = {"num_cpus": decode_config.num_cpus}
    if decode_config.num_gpus:
        decode_actor["num_gpus"] = decode_config.num_gpus
        # Prefill stages on this node map its KV through CUDA IPC (cluster/gpu_visibility.py).
        decode_actor["runtime_env"] = all_gpus_visible_runtime_env()
    decode = serve.deployment(DecodeDeployment).options(
        name="decode",
        num_replicas=decode_config.num_replicas,
        ray_actor_options=decode_actor,
        max_ongoing_requests=10_000,
        **router_config(),
    )
    ingress = ingress_deployment(config.ingress_replicas, config.ingress_num_cpus)
    return ingress.bind(
        config.ingress().model_dump(mode="json"),
        decode.bind(decode_config.model_dump(mode="json"), prefill),
        prefill,  # the ingress asks it for its readiness only
    )


MODES = ("pd", "colocated")


def build_service(config: AppConfig, mode: str = "pd") -> Any:
    """The app for `mode`: `pd` (prefill/decode disaggregation, `build_app`) or `colocated`
    (one engine does both, the same ingress and API), so the two compare on one machine."""
    if mode == "pd":
        return build_app(config)
    if mode == "colocated":
        from deployments.colocated import build_colocated_app

        return build_colocated_app(config)
    raise ValueError(f"mode is one of {MODES}, not {mode!r}")


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run deployments.app:app_builder model=/path pp_size=2` and RayService entry."""
    return build_app(AppConfig.model_validate(args))
