"""The router ranks every replica together, so Serve picks the least loaded of all of them
(its default ranks two random ones)."""

from __future__ import annotations

import asyncio

from deployments.routing import LeastOutstandingRouter, router_config


def test_every_candidate_is_in_the_first_rank() -> None:
    router = LeastOutstandingRouter.__new__(LeastOutstandingRouter)  # no Serve internals needed
    replicas = [object() for _ in range(5)]
    ranks = asyncio.run(router.choose_replicas(replicas))  # type: ignore[arg-type]
    assert ranks == [replicas]
    assert asyncio.run(router.choose_replicas([])) == []


def test_router_config_names_the_router() -> None:
    config = router_config()["request_router_config"]
    assert "LeastOutstandingRouter" in str(config.request_router_class)
