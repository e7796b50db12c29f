"""No request waits forever: a deployment that cannot take requests gets them a 503 in time.

The end-to-end cases deploy an app whose prefill (or decode) needs GPUs no node of the test
cluster has, so Serve keeps its placement pending; then a node that fits joins, and the
requests answered 503 before must not run after all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from cluster.messages import Accepted
from deployments.admission import (
    RoleUnavailable,
    accepted_stream,
    deployment_problem,
)
from deployments.app import build_app
from tests.e2e.conftest import API_KEY, app_config
from transport.config import TransportConfig

QUEUE_TIMEOUT_S = 3.0


# -- the pieces ---------------------------------------------------------------------------------


@dataclass
class Overview:
    """The fields of Serve's DeploymentStatusOverview that matter here."""

    status: str
    replica_states: dict[str, int]
    message: str = ""


def test_a_deployment_with_a_running_replica_has_no_problem() -> None:
    assert deployment_problem(Overview("HEALTHY", {"RUNNING": 1})) is None
    assert deployment_problem(Overview("UPDATING", {"RUNNING": 1, "STARTING": 1})) is None


def test_problems_quote_serve() -> None:
    pending = "Deployment 'prefill' in application 'a' has 1 replicas that have taken more "
    pending += "than 2s to be scheduled. Resources required for each replica: ..."
    assert deployment_problem(Overview("UPDATING", {"STARTING": 1}, pending)) == (
        f"placement pending: {pending}"
    )
    assert deployment_problem(Overview("UNHEALTHY", {"RUNNING": 1}, "health check failed")) == (
        "deployment is UNHEALTHY: health check failed"
    )
    assert deployment_problem(Overview("UPDATING", {"STARTING": 1})) == (
        "no running replica (1 STARTING; deployment UPDATING)"
    )


@dataclass
class FakeResponse:
    """A Serve response stream: `items` one after another, or nothing ever (`hang`)."""

    items: list[Any]
    hang: bool = False
    cancelled: bool = False
    _index: int = field(default=0)

    def __aiter__(self) -> FakeResponse:
        return self

    async def __anext__(self) -> Any:
        if self.hang:
            await asyncio.Event().wait()
        if self._index == len(self.items):
            raise StopAsyncIteration
        self._index += 1
        return self.items[self._index - 1]

    def cancel(self) -> None:
        self.cancelled = True


def collect(stream: AsyncIterator[Any]) -> list[Any]:
    async def main() -> list[Any]:
        return [item async for item in stream]

    return asyncio.run(main())


def test_items_after_accepted_pass_through() -> None:
    response = FakeResponse([Accepted(), 1, 2])
    stream = accepted_stream(response, role="decode", app="", deployment="decode", timeout_s=1)
    assert collect(stream) == [1, 2]
    assert not response.cancelled


def test_no_replica_within_the_timeout_cancels_the_call_and_says_why() -> None:
    response = FakeResponse([], hang=True)
    stream = accepted_stream(response, role="prefill", app="", deployment="p", timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(RoleUnavailable, match=r"^prefill unavailable: Serve has no status"):
        collect(stream)
    assert time.monotonic() - started < 5
    assert response.cancelled  # Serve drops it from its queue


# -- end to end ---------------------------------------------------------------------------------


def deploy_pending(name: str, config: Any, running: tuple[str, ...], base: str) -> None:
    """Deploy without waiting for RUNNING, then wait until the deployments that can be placed
    run and the HTTP proxy routes to the app (`/v1/models` answers)."""
    from ray import serve
    from ray.serve.api import RunTarget

    serve.run_many(
        [RunTarget(build_app(config), name=name, route_prefix=f"/{name}")],
        wait_for_applications_running=False,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        states = {d: str(s.status.value) for d, s in status.deployments.items()} if status else {}
        if all(states.get(d) == "HEALTHY" for d in running):
            with contextlib.suppress(httpx.HTTPError):
                headers = {"Authorization": f"Bearer {API_KEY}"}
                if httpx.get(f"{base}/v1/models", headers=headers, timeout=10).is_success:
                    return
        time.sleep(0.5)
    raise AssertionError(f"{name}: {running} never ran: {states}")


def wait_running(name: str, timeout_s: float = 180) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if str(serve.status().applications[name].status.value) == "RUNNING":
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} is not RUNNING: {serve.status().applications[name]}")


def unavailable_count(base: str, deployment: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pdserve_requests_unavailable_total"
        and s.labels.get("deployment") == deployment
    )


def ask(client: OpenAI, stream: bool = False) -> Any:
    kwargs: dict[str, Any] = dict(
        model="pdserve-test",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        stream=stream,
    )
    out = client.chat.completions.create(**kwargs)
    return list(out) if stream else out


def assert_503_in_time(client: OpenAI, stream: bool, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        ask(client, stream)
    elapsed = time.monotonic() - started
    assert err.value.status_code == 503, err.value
    assert reason in err.value.message, err.value.message
    assert QUEUE_TIMEOUT_S - 0.5 < elapsed < QUEUE_TIMEOUT_S + 10, elapsed


@pytest.fixture
def apps(ray_cluster) -> Iterator[list[str]]:
    from ray import serve

    names: list[str] = []
    yield names
    for name in names:
        serve.delete(name)


def test_decode_placement_pending_gets_503_and_models_still_answers(
    serve_port: int, llama_dir, apps: list[str]
) -> None:
    name = "pending-decode"
    apps.append(name)
    base = f"http://127.0.0.1:{serve_port}/{name}"
    config = app_config(llama_dir, pp=2, decode_num_gpus=3, queue_timeout_s=3)
    deploy_pending(name, config, ("ingress",), base)
    client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["pdserve-test"]
    assert_503_in_time(client, False, "decode unavailable: placement pending")
    assert_503_in_time(client, True, "decode unavailable: placement pending")
    ready = httpx.get(f"{base}/ready", timeout=30)
    assert ready.status_code == 503
    reasons = ready.json()["parts"]["serve"]["reasons"]
    assert any(r.startswith("serve: decode: placement pending") for r in reasons), reasons
    assert unavailable_count(base, "decode") == 2


def test_prefill_placement_pending_gets_503_and_nothing_runs_once_it_is_placed(
    ray_cluster, serve_port: int, llama_dir, apps: list[str]
) -> None:
    from ray import serve

    name = "pending-prefill"
    apps.append(name)
    transport = TransportConfig(transfer_timeout_s=5, bootstrap_timeout_s=5)
    config = app_config(
        llama_dir, pp=2, num_gpus_per_stage=3, queue_timeout_s=3, transport=transport
    )
    base = f"http://127.0.0.1:{serve_port}/{name}"
    deploy_pending(name, config, ("ingress", "decode"), base)
    client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert_503_in_time(client, False, "prefill unavailable: placement pending")
    assert_503_in_time(client, True, "prefill unavailable: placement pending")
    assert unavailable_count(base, "prefill") == 2
    decode = serve.get_deployment_handle("decode", name)
    stats = decode.stats.remote().result(timeout_s=30)
    assert stats["transfer"] == 0 and stats["prealloc"] == 0
    # Their pages wait out the transfer timeout (a write could have been under way had a
    # replica taken the request at the last instant), then come back.
    deadline = time.monotonic() + 30
    while decode.stats.remote().result(timeout_s=30)["pages_in_use"]:
        assert time.monotonic() < deadline, decode.stats.remote().result(timeout_s=30)
        time.sleep(0.5)

    node = ray_cluster.add_node(num_cpus=2, num_gpus=6)  # now both stages fit on one node
    try:
        wait_running(name)
        time.sleep(2)  # anything still queued would have reached the replica by now
        prefill = serve.get_deployment_handle("prefill", name)
        assert prefill.stats.remote().result(timeout_s=30)["requests_admitted"] == 0
        assert ask(client).choices[0].finish_reason in ("stop", "length")
        assert prefill.stats.remote().result(timeout_s=30)["requests_admitted"] == 1
    finally:
        serve.delete(name)
        apps.remove(name)
        ray_cluster.remove_node(node)
