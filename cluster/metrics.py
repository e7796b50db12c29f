"""pdserve's Prometheus series, exported through `ray.util.metrics`.

Ray's per-node metrics agent serves them (with a `ray_` prefix) for Prometheus to scrape, so
every actor and replica reports wherever it runs; `prometheus_client` inside an actor would
not reach that endpoint. Labels: `role`, `replica`, `pp_rank` (`controller` for the replica's
own queues), and `reason`/`outcome` on counters.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

_RANK_TAGS = ("role", "replica", "pp_rank")
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

_metrics: dict[str, Any] = {}


def _metric(kind: type, name: str, description: str, tags: tuple[str, ...], **kw: Any) -> Any:
    """One instance per series name per process (Ray refuses to redefine a metric)."""
    if name not in _metrics:
        _metrics[name] = kind(name, description=description, tag_keys=tags, **kw)
    return _metrics[name]


def bootstrap_queue() -> Gauge:
    return _metric(
        Gauge, "pdserve_bootstrap_queue_size", "Requests waiting for receiver info", _RANK_TAGS
    )


def waiting_queue() -> Gauge:
    return _metric(
        Gauge, "pdserve_waiting_queue_size", "Bootstrapped requests waiting to prefill", _RANK_TAGS
    )


def inflight_queue() -> Gauge:
    return _metric(
        Gauge, "pdserve_inflight_queue_size", "Requests whose KV is being transferred", _RANK_TAGS
    )


def running_queue() -> Gauge:
    return _metric(Gauge, "pdserve_running_queue_size", "Requests being prefilled", _RANK_TAGS)


def kv_pages_in_use() -> Gauge:
    return _metric(Gauge, "pdserve_kv_pages_in_use", "KV pages held by requests", _RANK_TAGS)


def kv_pages_total() -> Gauge:
    return _metric(Gauge, "pdserve_kv_pages_total", "KV pages in the cache", _RANK_TAGS)


def bootstrap_failures() -> Counter:
    return _metric(
        Counter,
        "pdserve_bootstrap_failures_total",
        "Requests failed before their transfer",
        (*_RANK_TAGS, "reason"),
    )


def transfer_failures() -> Counter:
    return _metric(
        Counter,
        "pdserve_transfer_failures_total",
        "KV transfers that failed",
        (*_RANK_TAGS, "reason"),
    )


def transfer_bytes() -> Counter:
    return _metric(
        Counter, "pdserve_kv_transfer_bytes_total", "KV bytes written to decode", _RANK_TAGS
    )


def transfer_seconds() -> Histogram:
    return _metric(
        Histogram,
        "pdserve_kv_transfer_seconds",
        "Duration of one request's KV write",
        _RANK_TAGS,
        boundaries=LATENCY_BUCKETS,
    )


def consensus_seconds() -> Histogram:
    return _metric(
        Histogram,
        "pdserve_consensus_tick_seconds",
        "Poll, all-reduce and apply of one tick",
        _RANK_TAGS,
        boundaries=LATENCY_BUCKETS,
    )


def step_seconds() -> Histogram:
    return _metric(
        Histogram,
        "pdserve_prefill_step_seconds",
        "One scheduler step across all stages",
        _RANK_TAGS,
        boundaries=LATENCY_BUCKETS,
    )


def prefill_requests() -> Counter:
    return _metric(
        Counter,
        "pdserve_prefill_requests_total",
        "Prefill requests by outcome",
        (*_RANK_TAGS, "outcome"),
    )


def stage_failures() -> Counter:
    return _metric(
        Counter, "pdserve_stage_failures_total", "Stage groups lost and rebuilt", _RANK_TAGS
    )


_REASONS = [
    ("bootstrap timeout", "bootstrap_timeout"),
    ("transfer timeout", "transfer_timeout"),
    ("receive timeout", "receive_timeout"),
    ("unreachable", "peer_unreachable"),
    ("unresponsive", "peer_unreachable"),
    ("invalid receiver info", "invalid_receiver_info"),
    ("write", "write_failed"),
    ("stage", "stage_failed"),
    ("abort", "aborted"),
    ("cancel", "aborted"),
]


def reason_label(reason: str | None) -> str:
    """A bounded label for a free-text failure reason (label values must not explode)."""
    text = (reason or "").lower()
    for needle, label in _REASONS:
        if needle in text:
            return label
    return "other" if text else "unknown"


class StageMetrics:
    """The series one stage actor reports after every step."""

    def __init__(self, replica: str, pp_rank: int, num_pages: int) -> None:
        self.tags = {"role": "prefill", "replica": replica, "pp_rank": str(pp_rank)}
        kv_pages_total().set(num_pages, tags=self.tags)

    def observe(self, queue_sizes: dict[str, int], pages_in_use: int, consensus_s: float) -> None:
        bootstrap_queue().set(queue_sizes["bootstrap"], tags=self.tags)
        waiting_queue().set(queue_sizes["waiting"], tags=self.tags)
        inflight_queue().set(queue_sizes["inflight"], tags=self.tags)
        kv_pages_in_use().set(pages_in_use, tags=self.tags)
        consensus_seconds().observe(consensus_s, tags=self.tags)

    def transferred(self, nbytes: int, seconds: float) -> None:
        transfer_bytes().inc(nbytes, tags=self.tags)
        transfer_seconds().observe(seconds, tags=self.tags)


class PrefillMetrics:
    """The series a prefill controller reports."""

    def __init__(self, replica: str) -> None:
        self.tags = {"role": "prefill", "replica": replica, "pp_rank": "controller"}

    def request_ended(self, ended: Any) -> None:
        """One count per request, whatever the number of ranks that saw it fail."""
        outcome = "ok" if ended.ok else reason_label(ended.reason)
        prefill_requests().inc(1, tags={**self.tags, "outcome": outcome})
        if not ended.ok and ended.phase is not None:
            counter = transfer_failures() if ended.phase == "inflight" else bootstrap_failures()
            counter.inc(1, tags={**self.tags, "reason": outcome})

    def observe_step(self, seconds: float) -> None:
        step_seconds().observe(seconds, tags=self.tags)

    def observe_queues(self, sizes: dict[str, int]) -> None:
        bootstrap_queue().set(sizes["bootstrap"], tags=self.tags)
        waiting_queue().set(sizes["waiting"], tags=self.tags)
        running_queue().set(sizes["running"], tags=self.tags)
        inflight_queue().set(sizes["inflight"], tags=self.tags)

    def stage_failure(self) -> None:
        stage_failures().inc(1, tags=self.tags)


def http_requests() -> Counter:
    return _metric(
        Counter,
        "pdserve_http_requests_total",
        "API requests by route and status code",
        ("route", "status"),
    )


def request_failures() -> Counter:
    return _metric(
        Counter,
        "pdserve_request_failures_total",
        "Requests that failed inside pdserve (5xx), by reason",
        ("reason",),
    )
