"""Metrics of a running pdserve, through the API's `/metrics` and through a real Prometheus
(Debian's package) that finds every process with the API's HTTP service discovery, while a
load with aborts runs; then the alert for a queue that does not drain, quiet and firing."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboards.prometheus_server import PrometheusServer, rules_with_for, scrape_config
from dashboards.traffic import mixed_load
from tests.e2e.conftest import API_KEY, app_config

MODEL = "pdserve-test"
PP = 2
SELECTOR = re.compile(r"pdserve_[a-z_]+(?:\{[^}]*\})?")


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


@pytest.fixture(scope="module")
def app(deploy, llama_dir) -> tuple[str, str]:
    url = deploy(app_config(llama_dir, pp=PP))
    return url, url.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def prometheus(app, tmp_path_factory) -> Iterator[PrometheusServer]:
    url, _ = app
    workdir = tmp_path_factory.mktemp("prometheus")
    # The only change to the shipped rules: the queue alert's 2m becomes 3s.
    rules = rules_with_for({"PdserveQueueNotDraining": "3s"}, workdir / "alerts.yml")
    server = PrometheusServer(scrape_config(url, 1, [rules]), workdir)
    yield server
    server.stop()


def discovered(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/metrics/targets", timeout=10).json()


def test_every_process_is_discoverable_and_merged_into_the_api_metrics(app) -> None:
    url, _ = app
    # ingress, decode, prefill controller, PP stage actors: one process each.
    groups = wait_for(lambda: len(discovered(url)) >= 3 + PP and discovered(url), 60, "targets")
    roles = sorted(g["labels"]["__meta_pdserve_roles"] for g in groups)
    assert roles.count("prefill-stage") == PP and {"ingress", "decode", "prefill"} <= set(roles)

    merged = httpx.get(f"{url}/metrics", timeout=10)
    assert merged.status_code == 200 and merged.headers["content-type"].startswith("text/plain")
    per_process: set[Any] = set()
    for group in groups:
        (address,) = group["targets"]
        per_process |= series(httpx.get(f"http://{address}/metrics", timeout=10).text)
    got = series(merged.text)
    # Histograms move between the two reads; compare which series exist, not their values.
    assert got == per_process
    queues = {
        (labels["role"], labels["pp_rank"], labels["queue"]): s.value
        for family in text_string_to_metric_families(merged.text)
        for s in family.samples
        if s.name == "pdserve_queue_size"
        for labels in [s.labels]
    }
    expected = {
        ("prefill", str(rank), q)
        for rank in range(PP)
        for q in ("bootstrap", "waiting", "inflight")
    }
    expected |= {
        ("prefill", "controller", q) for q in ("bootstrap", "waiting", "running", "inflight")
    }
    expected |= {("decode", "", q) for q in ("prealloc", "transfer", "waiting", "running")}
    assert set(queues) == expected and set(queues.values()) == {0.0}, queues
    assert all(name.startswith("pdserve_") for name, _ in got)


def test_prometheus_scrapes_every_rank_and_every_panel_and_rule_has_data(app, prometheus) -> None:
    from dashboards.generate import concrete, panel_expressions

    url, _ = app
    wait_for(
        lambda: (
            len(prometheus.targets()) >= 3 + PP
            and all(t["health"] == "up" for t in prometheus.targets())
        ),
        60,
        "prometheus to scrape every process",
    )
    counts = asyncio.run(mixed_load(f"{url}/v1", API_KEY, MODEL, seconds=15))
    assert counts["ok"] > 10 and counts["aborted"] > 2 and counts["rejected"] > 2, counts
    time.sleep(3)  # a few more scrapes after the load

    empty = [
        (title, concrete(expr))
        for title, expr in panel_expressions()
        if not prometheus.query(concrete(expr))
    ]
    assert not empty, f"panels without data: {empty}"

    rules = prometheus.rules()
    assert rules and all(r["health"] == "ok" for r in rules), rules
    for rule in rules:
        for selector in SELECTOR.findall(rule["query"]):
            assert prometheus.query(selector), f"{rule['name']}: {selector} has no data"

    # Per-rank queues reached Prometheus for every rank, and read 0 once the load is over.
    ranks = {r["metric"]["pp_rank"] for r in prometheus.query('pdserve_queue_size{role="prefill"}')}
    assert ranks == {str(r) for r in range(PP)} | {"controller"}
    wait_for(
        lambda: (
            prometheus.query("max(pdserve_queue_size)")[0]["value"][1] == "0"
            and prometheus.query("sum(pdserve_kv_pages_in_use)")[0]["value"][1] == "0"
            and prometheus.query("sum(pdserve_requests_in_flight)")[0]["value"][1] == "0"
        ),
        30,
        "every queue, page count and in-flight gauge to read 0",
    )
    time.sleep(6)  # longer than the alert's `for` (3s): it must still be quiet
    assert not [
        a for a in prometheus.alerts() if a["labels"]["alertname"] == "PdserveQueueNotDraining"
    ]
    assert not [a for a in prometheus.alerts() if a["state"] == "firing"], prometheus.alerts()


def test_a_stuck_request_fires_the_queue_alert_until_the_controller_reconciles(
    app, prometheus
) -> None:
    from ray import serve

    url, name = app
    prefill = serve.get_deployment_handle("prefill", app_name=name)
    prefill.debug_admit_untracked.remote(1, "stuck-request").result()

    def firing() -> list[dict[str, Any]]:
        return [
            a
            for a in prometheus.alerts()
            if a["labels"]["alertname"] == "PdserveQueueNotDraining" and a["state"] == "firing"
        ]

    (alert,) = wait_for(firing, 30, "the queue alert to fire")
    assert alert["labels"]["pp_rank"] == "1" and alert["labels"]["queue"] == "bootstrap"

    # The next request makes the controller reconcile rank 1: the orphan is dropped and the
    # alert resolves. (SGLang's design had no owner to do this.)
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    client.completions.create(model=MODEL, prompt="the red fox", max_tokens=3)
    wait_for(lambda: not firing(), 30, "the queue alert to resolve")
    # Every queue reads 0 again once Prometheus has scraped after the request (a sample taken
    # while it ran may still be the newest for a second).
    wait_for(
        lambda: prometheus.query("max(pdserve_queue_size)")[0]["value"][1] == "0",
        10,
        "every queue to read 0",
    )


def test_prometheus_module_is_real(prometheus) -> None:
    """Guard: the binary is Debian's prometheus, not a stand-in."""
    build = httpx.get(f"{prometheus.url}/api/v1/status/buildinfo", timeout=5).json()["data"]
    assert build["version"].startswith("2."), build
    assert Path(prometheus.config_file).exists()
