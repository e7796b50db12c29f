"""pdserve's Prometheus series (`pdserve_*`), defined once, with prometheus-client.

Every process that owns a number (stage actor, prefill controller, decode replica, ingress)
records it in this module's `REGISTRY`; `cluster.metrics_export` serves that registry from the
process and lets Prometheus and the API's `/metrics` find it. Every series carries `role`,
`replica` and `pp_rank` (empty where a process is not a pipeline rank; `controller` for the
prefill controller's own view); failures add a bounded `reason`.

Queue sizes are read when Prometheus scrapes (`Gauge.set_function`), not pushed after a step,
so an idle system reports exactly what it holds, never the last busy value.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import disable_created_metrics as _disable_created

_disable_created()  # `_created` twins of every counter only double the series count

REGISTRY = CollectorRegistry(auto_describe=True)
LABELS = ("role", "replica", "pp_rank")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

# Prefill-side queues (controller and every rank) and decode-side ones; one family, `queue` label.
QUEUES_PREFILL_RANK = ("bootstrap", "waiting", "inflight")
QUEUES_CONTROLLER = ("bootstrap", "waiting", "running", "inflight")
QUEUES_DECODE = ("prealloc", "transfer", "waiting", "running")

queue_size = Gauge(
    "pdserve_queue_size",
    "Requests in a queue: prefill bootstrap/waiting/running/inflight, decode prealloc/transfer/waiting/running",
    (*LABELS, "queue"),
    registry=REGISTRY,
)
kv_pages_in_use = Gauge(
    "pdserve_kv_pages_in_use", "KV cache pages held by requests", LABELS, registry=REGISTRY
)
kv_pages_total = Gauge("pdserve_kv_pages_total", "KV cache pages", LABELS, registry=REGISTRY)
bootstrap_failures = Counter(
    "pdserve_bootstrap_failures_total",
    "Requests that failed before their KV transfer started, by reason",
    (*LABELS, "reason"),
    registry=REGISTRY,
)
transfer_failures = Counter(
    "pdserve_transfer_failures_total",
    "KV transfers that failed, by reason",
    (*LABELS, "reason"),
    registry=REGISTRY,
)
kv_transfer_bytes = Counter(
    "pdserve_kv_transfer_bytes_total", "KV bytes written to decode", LABELS, registry=REGISTRY
)
kv_transfer_seconds = Histogram(
    "pdserve_kv_transfer_seconds",
    "Duration of one request's KV write from one stage",
    LABELS,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
consensus_tick_seconds = Histogram(
    "pdserve_consensus_tick_seconds",
    "Poll, all-reduce and apply of one consensus tick on one rank",
    LABELS,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
prefill_step_seconds = Histogram(
    "pdserve_prefill_step_seconds",
    "One prefill scheduler step across all stages",
    LABELS,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
prefill_requests = Counter(
    "pdserve_prefill_requests_total",
    "Prefill requests by outcome (ok or a failure reason)",
    (*LABELS, "outcome"),
    registry=REGISTRY,
)
stage_failures = Counter(
    "pdserve_stage_failures_total",
    "Prefill stage groups lost and rebuilt",
    LABELS,
    registry=REGISTRY,
)
time_to_first_token = Histogram(
    "pdserve_time_to_first_token_seconds",
    "Request arrival at decode to its first token",
    LABELS,
    buckets=REQUEST_BUCKETS,
    registry=REGISTRY,
)
inter_token_latency = Histogram(
    "pdserve_inter_token_latency_seconds",
    "Time between two tokens of one request",
    LABELS,
    buckets=TOKEN_LATENCY_BUCKETS,
    registry=REGISTRY,
)
e2e_request_latency = Histogram(
    "pdserve_e2e_request_latency_seconds",
    "Request arrival at decode to its last token",
    LABELS,
    buckets=REQUEST_BUCKETS,
    registry=REGISTRY,
)
# Where a request's time to first token goes: the prefill controller's phases and the decode
# replica's own (`pdserve_request_phase_seconds{phase}`; the decode replica also logs each
# request's whole timeline).
PREFILL_PHASES = ("bootstrap", "queue_wait", "forward", "kv_transfer")
DECODE_PHASES = ("prealloc", "prefill_call", "join")
request_phase_seconds = Histogram(
    "pdserve_request_phase_seconds",
    "Time to first token by phase: prefill bootstrap (admitted to ready on every stage), "
    "queue_wait (ready to first chunk), forward (first to last chunk), kv_transfer (last chunk "
    "to delivered); decode prealloc (KV pages), prefill_call (the whole prefill call), join "
    "(KV delivered to the first token out)",
    (*LABELS, "phase"),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
prompt_tokens = Counter(
    "pdserve_prompt_tokens_total", "Prompt tokens of prefilled requests", LABELS, registry=REGISTRY
)
generation_tokens = Counter(
    "pdserve_generation_tokens_total", "Tokens generated", LABELS, registry=REGISTRY
)
http_requests = Counter(
    "pdserve_http_requests_total",
    "API requests by route and status code",
    (*LABELS, "route", "status"),
    registry=REGISTRY,
)
request_failures = Counter(
    "pdserve_request_failures_total",
    "Requests that failed inside pdserve (5xx), by reason",
    (*LABELS, "reason"),
    registry=REGISTRY,
)
requests_in_flight = Gauge(
    "pdserve_requests_in_flight",
    "API requests being answered now",
    LABELS,
    registry=REGISTRY,
)
request_retries = Counter(
    "pdserve_request_retries_total",
    "Requests that failed inside pdserve before their first token and were sent again, by reason",
    (*LABELS, "reason"),
    registry=REGISTRY,
)
requests_unavailable = Counter(
    "pdserve_requests_unavailable_total",
    "Requests answered 503 because no replica of a deployment took them within the queue "
    "timeout (placement pending, no running replica), by deployment",
    (*LABELS, "deployment"),
    registry=REGISTRY,
)
transport_repairs = Counter(
    "pdserve_transport_repairs_total",
    "Mooncake peer sessions repaired after a failed KV write",
    LABELS,
    registry=REGISTRY,
)
replica_healthy = Gauge(
    "pdserve_replica_healthy",
    "1 while a replica can serve, 0 while it cannot (its stages are being rebuilt)",
    LABELS,
    registry=REGISTRY,
)

_REASONS = [
    ("bootstrap timeout", "bootstrap_timeout"),
    ("transfer timeout", "transfer_timeout"),
    ("receive timeout", "receive_timeout"),
    ("no kv memory", "prealloc_timeout"),
    ("unreachable", "peer_unreachable"),
    ("unresponsive", "peer_unreachable"),
    ("invalid receiver info", "invalid_receiver_info"),
    ("transfer incomplete", "transfer_incomplete"),
    ("write", "write_failed"),
    ("stage", "stage_failed"),
    ("shutting down", "shutdown"),
    ("abort", "aborted"),
    ("cancel", "aborted"),
]
REASONS = (*tuple(dict.fromkeys(label for _, label in _REASONS)), "other", "unknown")


def reason_label(reason: str | None) -> str:
    """A bounded label for a free-text failure reason (label values must not explode)."""
    text = (reason or "").lower()
    for needle, label in _REASONS:
        if needle in text:
            return label
    return "other" if text else "unknown"


def replica_label(replica_tag: str | None) -> str:
    """A short, label-safe name for a Serve replica (its tag, or a random one outside Serve)."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in replica_tag or "")
    return safe[-40:] or uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Labels:
    """Who reports a series."""

    role: str
    replica: str
    pp_rank: str = ""

    def of(self, metric: Any, **extra: str) -> Any:
        return metric.labels(role=self.role, replica=self.replica, pp_rank=self.pp_rank, **extra)


class Owner:
    """The series one component owns: created at zero when it starts, removed when it stops,
    so a dashboard shows a 0 instead of nothing and a stopped component leaves no stale line."""

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self._children: set[tuple[Any, tuple[str, ...]]] = set()

    def child(self, metric: Any, pp_rank: str | None = None, **extra: str) -> Any:
        """`metric`'s series for this owner (`pp_rank` overrides the owner's own rank)."""
        labels = (
            self.labels
            if pp_rank is None
            else Labels(self.labels.role, self.labels.replica, pp_rank)
        )
        self._children.add((metric, (labels.role, labels.replica, labels.pp_rank, *extra.values())))
        return labels.of(metric, **extra)

    def live_queues(self, names: tuple[str, ...], read: Callable[[], dict[str, int]]) -> None:
        """Queue gauges computed from `read()` at scrape time."""
        for name in names:
            self.child(queue_size, queue=name).set_function(_live(lambda name=name: read()[name]))

    def init_failures(self, pp_rank: str | None = None) -> None:
        """Every known failure reason at 0, so rates over them exist before the first failure
        (a series born at 1 hides its first count from `rate`)."""
        for reason in REASONS:
            self.child(bootstrap_failures, pp_rank=pp_rank, reason=reason)
            self.child(transfer_failures, pp_rank=pp_rank, reason=reason)

    def healthy(self, up: bool) -> None:
        """1 while this replica can serve (its readiness), 0 while it cannot."""
        self.child(replica_healthy).set(1 if up else 0)

    def close(self) -> None:
        for metric, values in self._children:
            with contextlib.suppress(KeyError):
                metric.remove(*values)
        self._children.clear()


def _live(read: Callable[[], int]) -> Callable[[], float]:
    """A gauge function read from another thread at scrape time: a failed read reports NaN
    (never 0, which would look drained, and never an exception, which would fail the scrape)."""

    def value() -> float:
        try:
            return float(read())
        except Exception:
            return float("nan")

    return value


class StageMetrics(Owner):
    """The series of one prefill pipeline rank (a stage actor)."""

    def __init__(
        self,
        replica: str,
        pp_rank: int,
        num_pages: int,
        queues: Callable[[], dict[str, int]],
        pages_in_use: Callable[[], int],
    ) -> None:
        super().__init__(Labels("prefill", replica, str(pp_rank)))
        self.child(kv_pages_total).set(num_pages)
        self.child(kv_pages_in_use).set_function(_live(pages_in_use))
        self.live_queues(QUEUES_PREFILL_RANK, queues)
        self.child(kv_transfer_bytes)
        self.child(transport_repairs)
        self._transfer = self.child(kv_transfer_seconds)
        self._tick = self.child(consensus_tick_seconds)

    def repaired(self) -> None:
        self.child(transport_repairs).inc()

    def observe_tick(self, seconds: float) -> None:
        self._tick.observe(seconds)

    def transferred(self, nbytes: int, seconds: float) -> None:
        self.child(kv_transfer_bytes).inc(nbytes)
        self._transfer.observe(seconds)


class PrefillMetrics(Owner):
    """The series a prefill controller (one Serve replica) owns."""

    def __init__(self, replica: str, pp_size: int, queues: Callable[[], dict[str, int]]) -> None:
        super().__init__(Labels("prefill", replica, "controller"))
        self.live_queues(QUEUES_CONTROLLER, queues)
        for rank in ["controller", *map(str, range(pp_size))]:  # failures land on the rank
            self.init_failures(pp_rank=rank)
        self.child(stage_failures)
        for outcome in ("ok", *REASONS):
            self.child(prefill_requests, outcome=outcome)
        self._step = self.child(prefill_step_seconds)
        self._phases = {p: self.child(request_phase_seconds, phase=p) for p in PREFILL_PHASES}
        self.healthy(False)

    def request_ended(self, ended: Any) -> None:
        """One count per request, on the rank that first reported its failure."""
        outcome = "ok" if ended.ok else reason_label(ended.reason)
        self.child(prefill_requests, outcome=outcome).inc()
        if ended.ok:
            for phase, seconds in ended.phases.items():
                self._phases[phase].observe(seconds)
            return
        if ended.phase is None:
            return
        counter = transfer_failures if ended.phase == "inflight" else bootstrap_failures
        rank = "controller" if ended.failed_rank is None else str(ended.failed_rank)
        self.child(counter, pp_rank=rank, reason=outcome).inc()

    def observe_step(self, seconds: float) -> None:
        self._step.observe(seconds)

    def stage_failure(self) -> None:
        self.child(stage_failures).inc()


class DecodeMetrics(Owner):
    """The series a decode replica owns: its queues, pages, and the latencies users feel."""

    def __init__(
        self,
        replica: str,
        num_pages: int,
        queues: Callable[[], dict[str, int]],
        pages_in_use: Callable[[], int],
    ) -> None:
        super().__init__(Labels("decode", replica))
        self.live_queues(QUEUES_DECODE, queues)
        self.child(kv_pages_total).set(num_pages)
        self.child(kv_pages_in_use).set_function(_live(pages_in_use))
        self.init_failures()
        self.ttft = self.child(time_to_first_token)
        self.itl = self.child(inter_token_latency)
        self.e2e = self.child(e2e_request_latency)
        self.prompt = self.child(prompt_tokens)
        self.generated = self.child(generation_tokens)
        self._phases = {p: self.child(request_phase_seconds, phase=p) for p in DECODE_PHASES}
        self.healthy(True)

    def phase(self, name: str, seconds: float) -> None:
        self._phases[name].observe(seconds)

    def request(self, num_prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, num_prompt_tokens)

    def failed(self, reason: str, before_transfer: bool) -> None:
        counter = bootstrap_failures if before_transfer else transfer_failures
        self.child(counter, reason=reason_label(reason)).inc()


class RequestTimer:
    """TTFT, inter-token and end-to-end latency of one request, as its tokens stream out."""

    def __init__(self, metrics: DecodeMetrics, num_prompt_tokens: int) -> None:
        self._m = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._start = self._last = time.perf_counter()
        self._first = True

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self._first:
            self._m.ttft.observe(now - self._start)
            self._m.prompt.inc(self._num_prompt_tokens)
            self._first = False
            n_gaps = n - 1
        else:
            n_gaps = n
        for _ in range(n_gaps):  # tokens that arrive together share the gap
            self._m.itl.observe((now - self._last) / max(n, 1))
        self._last = now
        self._m.generated.inc(n)

    def finished(self) -> None:
        self._m.e2e.observe(time.perf_counter() - self._start)


class IngressMetrics(Owner):
    """The series an API replica owns: requests by route and status, failures, in flight."""

    def __init__(self, replica: str) -> None:
        super().__init__(Labels("ingress", replica))
        self.in_flight = self.child(requests_in_flight)
        for reason in REASONS:
            self.child(request_failures, reason=reason)
            self.child(request_retries, reason=reason)
        for deployment in ("decode", "prefill"):
            self.child(requests_unavailable, deployment=deployment)
        for route in ("/completions", "/chat/completions"):  # error rates exist before errors
            for status in ("200", "400", "500", "503"):
                self.child(http_requests, route=route, status=status)
        self.healthy(True)

    def response(self, route: str, status: int) -> None:
        self.child(http_requests, route=route, status=str(status)).inc()

    def failure(self, reason: str) -> None:
        self.child(request_failures, reason=reason_label(reason)).inc()

    def unavailable(self, deployment: str) -> None:
        self.child(requests_unavailable, deployment=deployment).inc()

    def retried(self, reason: str) -> None:
        self.child(request_retries, reason=reason_label(reason)).inc()
