"""Bounded waits for a replica: no request waits forever for a deployment that cannot serve.

Serve queues a call until some replica of the target deployment takes it, with no bound: while
a deployment's placement is pending (GPUs short, a node draining, a replica being replaced) a
request would wait for good. Every call between roles here is a stream whose first item is
`Accepted`, sent by the replica the moment it starts on the request. A caller that sees no
`Accepted` within `queue_timeout_s` cancels the call (Serve drops it from its queue, so nothing
runs later) and fails with `RoleUnavailable`, a 503 whose reason is Serve's own account of the
deployment ("placement pending: ...").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from cluster.errors import error_reason
from cluster.messages import Accepted

log = logging.getLogger(__name__)

# Serve's view of a deployment that means it cannot serve (UPDATING and scaling can).
UNHEALTHY_DEPLOYMENT = ("UNHEALTHY", "DEPLOY_FAILED")
DEFAULT_QUEUE_TIMEOUT_S = 30.0


class RoleUnavailable(RuntimeError):
    """No replica of a role took the request within the queue timeout (HTTP 503)."""


def _value(state: Any) -> str:
    return str(getattr(state, "value", state))


def deployment_problem(overview: Any) -> str | None:
    """Why a deployment (Serve's `DeploymentStatusOverview`) cannot take requests, or None
    while it has a running replica and is healthy."""
    state = _value(overview.status)
    message = " ".join((overview.message or "").split())  # one line for logs and bodies
    replicas = {_value(k): n for k, n in overview.replica_states.items() if n}
    if state in UNHEALTHY_DEPLOYMENT:
        return f"deployment is {state}" + (f": {message}" if message else "")
    if replicas.get("RUNNING", 0):
        return None
    if "to be scheduled" in message:  # Serve's word for replicas waiting on resources
        return f"placement pending: {message}"
    counts = ", ".join(f"{n} {s}" for s, n in sorted(replicas.items())) or "none"
    detail = f"no running replica ({counts}; deployment {state})"
    return f"{detail}: {message}" if message else detail


def unavailable_reason(app: str, deployment: str) -> str:
    """Serve's account of why `deployment` of `app` took no request (blocking: asks the Serve
    controller; run it in a thread)."""
    import ray
    from ray import serve

    if not app or not ray.is_initialized():  # outside Serve: nobody to ask
        return "Serve has no status for it (not running in a Serve application)"
    try:
        overview = serve.status().applications[app].deployments[deployment]
    except Exception as exc:
        return f"Serve has no status for it ({error_reason(exc)})"
    return deployment_problem(overview) or "every running replica is at its request limit"


async def accepted_stream(
    response: Any, *, role: str, app: str, deployment: str, timeout_s: float
) -> AsyncIterator[Any]:
    """The items of a Serve stream after its `Accepted`; `RoleUnavailable` if no replica sent
    one within `timeout_s`. The call is cancelled then, wherever it is (still queued, or taken
    at that instant), so it leaves nothing behind."""
    try:
        try:
            first = await asyncio.wait_for(response.__anext__(), timeout_s)
        except TimeoutError:
            response.cancel()
            why = await asyncio.to_thread(unavailable_reason, app, deployment)
            log.warning("%s unavailable: %s", role, why)
            raise RoleUnavailable(f"{role} unavailable: {why}") from None
        if not isinstance(first, Accepted):
            raise TypeError(f"{role} answered {type(first).__name__} before Accepted")
        async for item in response:
            yield item
    except BaseException:
        with contextlib.suppress(Exception):
            response.cancel()
        raise
