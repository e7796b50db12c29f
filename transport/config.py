"""Transport settings, one pydantic model passed down whole from the role's config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, model_validator


class TransportConfig(BaseModel):
    """How a process talks Mooncake and how long it waits for its peers."""

    hostname: str = Field(
        "auto",
        description=(
            "address peers reach this process on; 'auto' = the node IP Ray reports for the "
            "process (one config serves every node), loopback outside Ray"
        ),
    )
    protocol: Literal["tcp", "rdma", "nvlink"] = "tcp"
    device_names: str = Field(
        "", description="comma-separated RDMA devices (e.g. 'mlx5_0,mlx5_1'); empty = all"
    )
    bootstrap_timeout_s: PositiveFloat = Field(
        30.0, description="a sender that never receives receiver info fails after this"
    )
    transfer_timeout_s: PositiveFloat = Field(
        30.0, description="a started KV write that has not finished fails after this"
    )
    receive_timeout_s: PositiveFloat = Field(
        300.0,
        description="a decode-side receiver that never hears from every stage fails after this",
    )
    liveness_interval_s: PositiveFloat = Field(
        1.0, description="how often peers with transfers pending are probed"
    )
    send_threads: PositiveInt = Field(4, description="threads that run KV writes")
    max_segments_per_write: PositiveInt = Field(
        512,
        description=(
            "most segments in one Mooncake batch write; a request's KV with more goes in several "
            "batches, one after another. Mooncake's tcp transport (0.3.13) holds at most 1024 "
            "segments per peer in its queue plus 1024 waiting up to 1 s for a place "
            "(MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER, MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER), "
            "shared by every batch in flight to that peer: a batch of about 2050 or more fails "
            "(rc -1) and can wedge the path to that peer. rdma has no per-batch count limit (it "
            "cuts segments into 64 KiB slices queued behind 256 work requests per queue pair)"
        ),
    )
    metadata_slots: PositiveInt = Field(
        1024, description="first-token metadata slots; bounds requests in flight per process"
    )
    cuda_ipc: bool = Field(
        True,
        description=(
            "same-node fast path: copy KV GPU to GPU through CUDA IPC when the decode process is "
            "on this node and its GPU is visible here; Mooncake otherwise"
        ),
    )

    hidden_channel: Literal["auto", "host", "ipc", "mooncake"] = Field(
        "auto",
        description=(
            "how hidden states move between PP stages (cluster/hidden_channel.py): 'auto' = CUDA "
            "IPC when both stages are on one node's GPUs, Mooncake device to device across "
            "nodes, through the host (Ray's object store) for CPU stages; 'host', 'ipc' or "
            "'mooncake' forces one (a path that cannot be set up falls back to the host)"
        ),
    )

    def resolved_hostname(self) -> str:
        """The address this process advertises; resolved where the endpoint starts."""
        if self.hostname != "auto":
            return self.hostname
        try:
            import ray
        except ImportError:  # a process outside any Ray cluster (benchmarks on a bare GPU box)
            return "127.0.0.1"
        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"

    @model_validator(mode="after")
    def _rdma_needs_a_real_host(self) -> TransportConfig:
        if self.protocol == "rdma" and self.hostname in ("127.0.0.1", "localhost"):
            raise ValueError(f"protocol {self.protocol!r} needs the node's own IP as hostname")
        return self
