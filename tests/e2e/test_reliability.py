"""Reliability of the whole service: each failure users saw, as a named regression with its
sequence written out, then a two-minute chaos soak of the same scenarios (`make soak` runs the
long one on the real model). Real Ray, Serve, Mooncake over tcp and the `openai` client; the
faults are real kills and the transport's own fault hook (a write that fails as Mooncake's
would, a peer that stops answering probes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.soak import SMALL, PhaseRow, Soak, SoakTarget, run_soak
from cluster.metrics import REGISTRY
from tests.e2e.conftest import API_KEY, app_config
from tests.e2e.test_openai import assert_idle
from transport.config import TransportConfig

MODEL = "pdserve-test"
PP = 2
TRANSFER_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def target(deploy, llama_dir) -> SoakTarget:
    transport = TransportConfig(
        transfer_timeout_s=TRANSFER_TIMEOUT_S,
        bootstrap_timeout_s=TRANSFER_TIMEOUT_S,
        max_segments_per_write=8,  # every KV write of the tests goes out in several batches
    )
    url = deploy(app_config(llama_dir, pp=PP, transport=transport))
    return SoakTarget(
        base_url=url,
        app_name=url.rsplit("/", 1)[-1],
        model=MODEL,
        api_key=API_KEY,
        max_model_len=4096,
        vocab_size=640,
        transfer_timeout_s=TRANSFER_TIMEOUT_S,
        pp_size=PP,
    )


def metric(target: SoakTarget, name: str, **labels: str) -> float:
    text = httpx.get(f"{target.base_url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def soak(target: SoakTarget, seed: int = 0) -> Soak:
    return Soak(target, SMALL, seed)


async def _close(s: Soak) -> None:
    await s.client.close()
    await s.http.aclose()


def run(s: Soak, *coroutines: Any) -> list[Any]:
    async def main() -> list[Any]:
        try:
            return [await c for c in coroutines]
        finally:
            await _close(s)

    return asyncio.run(main())


def test_every_counter_has_its_series_before_the_first_request(target) -> None:
    """Dashboards and `rate()` need a 0 to start from: no family waits for its first event."""
    text = httpx.get(f"{target.base_url}/metrics", timeout=10).text
    exported = {family.name for family in text_string_to_metric_families(text) if family.samples}
    counters = {family.name for family in REGISTRY.collect() if family.type == "counter"} | {
        "pdserve_stage_failures",
        "pdserve_request_retries",
        "pdserve_transport_repairs",
    }
    assert counters <= exported, counters - exported
    assert metric(target, "pdserve_stage_failures_total") == 0


def test_storm_then_a_max_length_prompt_then_short_requests_all_succeed(target) -> None:
    """The sequence that once left every later request failing: an abort storm, one prompt
    of nearly the whole context (its KV in many write batches), then short requests."""
    s = soak(target)
    run(s, s.storm(PhaseRow("storm")), s.max_length(PhaseRow("max_length")))
    storm = [o for o in s.outcomes if o.phase == "storm"]
    longest = [o for o in s.outcomes if o.phase == "max_length"]
    assert not [o for o in storm if not o.ok and not o.cancelled], storm
    assert longest and all(o.ok for o in longest), longest
    assert_idle(target.app_name)


def test_a_failed_kv_write_then_the_next_request_on_the_same_peer_succeeds(target) -> None:
    """A write fails (the fault hook, on the path a Mooncake failure takes): the request is
    retried invisibly, the stage's session to the decode peer is repaired, and the request
    after it goes through the same stage and peer without a retry."""
    from ray import serve

    prefill = serve.get_deployment_handle("prefill", app_name=target.app_name)
    retried = metric(target, "pdserve_request_retries_total")
    repaired = metric(target, "pdserve_transport_repairs_total")
    prefill.debug_inject_fault.remote(1, "fail_next_writes", 1).result()
    s = soak(target)
    first, second = run(s, s.short("fault"), s.short("after"))
    assert first.ok and second.ok, (first, second)
    assert metric(target, "pdserve_request_retries_total") == retried + 1
    assert metric(target, "pdserve_transport_repairs_total") >= repaired + 1
    assert_idle(target.app_name)


def test_stage_death_retries_queued_requests_and_streaming_ones_finish(target) -> None:
    """A stage actor dies with requests in the bootstrap and waiting queues and others
    already streaming: the queued ones are sent again once the stages are rebuilt and answer
    200, the streaming ones (decode holds their KV) finish; none ends in an error."""
    from ray import serve

    prefill = serve.get_deployment_handle("prefill", app_name=target.app_name)
    failures = metric(target, "pdserve_stage_failures_total")
    retried = metric(target, "pdserve_request_retries_total")
    s = soak(target)

    async def scenario() -> list[Any]:
        streaming = [
            asyncio.create_task(s.request("streaming", s.words(3, 8), 200)) for _ in range(3)
        ]
        await asyncio.sleep(1.0)  # they have their KV and are decoding
        queued = [asyncio.create_task(s.request("queued", s.words(50, 200), 4)) for _ in range(12)]
        await asyncio.sleep(0.2)
        await prefill.debug_kill_stage.remote(0)
        return await asyncio.gather(*streaming, *queued)

    outcomes = run(s, scenario())[0]
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    assert metric(target, "pdserve_stage_failures_total") == failures + 1
    assert metric(target, "pdserve_request_retries_total") > retried
    assert_idle(target.app_name)


def test_health_is_unhealthy_while_a_decode_peer_is_unreachable_and_healthy_after(target) -> None:
    """A stage that cannot reach a live decode peer makes `/health` and `/ready` say so (and
    Serve's health check of the prefill replica fail); once it can, both are healthy again."""
    from ray import serve

    prefill = serve.get_deployment_handle("prefill", app_name=target.app_name)
    s = soak(target)
    assert run(s, s.short("warm"))[0].ok  # prefill learns its decode peer from a request
    assert httpx.get(f"{target.base_url}/health", timeout=30).status_code == 200
    prefill.debug_inject_fault.remote(0, "set_unreachable", None, True).result()
    try:
        health = httpx.get(f"{target.base_url}/health", timeout=30)
        ready = httpx.get(f"{target.base_url}/ready", timeout=30)
    finally:
        prefill.debug_inject_fault.remote(0, "set_unreachable", None, False).result()
    assert health.status_code == 503, health.text
    assert any("pp_rank 0 cannot reach decode peer" in r for r in health.json()["reasons"])
    body = ready.json()
    assert ready.status_code == 503 and not body["ready"]
    (part,) = [p for name, p in body["parts"].items() if name.startswith("prefill")]
    assert not part["ready"] and part["reasons"]
    assert body["parts"]["ingress"]["ready"] and body["parts"]["decode"]["ready"]

    deadline = time.monotonic() + 30
    while httpx.get(f"{target.base_url}/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "health did not recover"
        time.sleep(0.5)
    s = soak(target)
    assert run(s, s.short("after"))[0].ok


def test_chaos_soak_two_minutes(target) -> None:
    """`make soak`'s scenario list for two minutes: no failure without a token outside a
    decode replica's death, every gauge back to 0 after every phase, health ok and a final
    batch served at the end. Last in this module: it kills the decode replica."""
    summary = run_soak(target, minutes=2, scale=SMALL, seed=1)
    assert summary["passed"], summary
    assert summary["retried"] > 0


def test_a_streak_of_own_failures_makes_a_replica_unready_until_a_success_or_a_quiet_spell(
    monkeypatch,
) -> None:
    """What Serve's health check reads besides rebuilds and peers: the replica's own failures
    in a row (a wedged transport, a broken engine). Failures that are not its own never count."""
    from cluster.metrics import reason_label
    from deployments import health
    from deployments.health import FailureStreak
    from deployments.prefill import OWN_FAILURES

    own = ["KV write to 10.0.0.2:1234 failed (rc=-1)", "transfer timeout: KV write unfinished"]
    not_own = [
        "a prefill stage failed: The actor is dead",
        "aborted by the caller",
        "decode peer 10.0.0.2:1234 unreachable",
        "bootstrap timeout: no receiver info after 30.0s",
    ]
    assert all(reason_label(r) in OWN_FAILURES for r in own)
    assert not any(reason_label(r) in OWN_FAILURES for r in not_own)

    now = [1000.0]
    monkeypatch.setattr(health.time, "monotonic", lambda: now[0])
    streak = FailureStreak(threshold=3, window_s=60)
    for _ in range(2):
        streak.failed(own[0])
    assert streak.verdict() is None
    streak.failed(own[0])
    assert "the last 3 requests failed" in (streak.verdict() or "")
    streak.succeeded()
    assert streak.verdict() is None
    for _ in range(3):
        streak.failed(own[1])
    now[0] += 61  # nothing to disprove it for a minute: a restart is not needed for that
    assert streak.verdict() is None


def test_the_metrics_directory_outlives_the_placement_group_of_its_creator(target) -> None:
    """Whoever asks first creates the directory; a Serve replica captures what it creates in
    its own placement group, which went away with the replica and took the directory (and
    every later `/metrics`) with it. Here its creator is such an actor, then its group goes."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.metrics_export import DIRECTORY_NAME, NAMESPACE, directory

    ray.kill(ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE), no_restart=True)

    @ray.remote(num_cpus=0.1)
    class Creator:  # as a Serve replica is: an actor whose group captures what it creates
        def create(self) -> None:
            ray.get(directory().register.remote("127.0.0.1:1", {"app": "probe"}))

    pg = placement_group([{"CPU": 0.1}])
    ray.get(pg.ready(), timeout=60)
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    creator = Creator.options(scheduling_strategy=strategy).remote()
    ray.get(creator.create.remote(), timeout=60)
    remove_placement_group(pg)
    time.sleep(2)
    assert ray.get(directory().targets.remote("probe"), timeout=30)
    # Every process of the app registers again with the new directory within REFRESH_S:
    # ingress, decode, prefill controller and its stages.
    deadline = time.monotonic() + 60
    while len(httpx.get(f"{target.base_url}/metrics/targets", timeout=10).json()) < 3 + PP:
        assert time.monotonic() < deadline, "the app's processes did not register again"
        time.sleep(1)
