"""Request routing between replicas of a role: the one with the fewest outstanding requests.

Serve's default router probes two random replicas and takes the less loaded; pdserve's roles
have few replicas and long requests, so the router probes every candidate and Serve picks the
lowest queue length among them (the base class does the probing and the choice).
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class LeastOutstandingRouter(FIFOMixin, RequestRouter):
    """All candidates in one rank: the least loaded replica wins."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        return [list(candidate_replicas)] if candidate_replicas else []


def router_config() -> dict[str, object]:
    """Deployment options that install the router."""
    from ray.serve.config import RequestRouterConfig

    return {
        "request_router_config": RequestRouterConfig(request_router_class=LeastOutstandingRouter)
    }
