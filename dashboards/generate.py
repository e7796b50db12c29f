"""pdserve's Grafana dashboards, built in Python so every query is written once and tested.

`python -m dashboards.generate` rewrites `dashboards/grafana/*.json` and the Helm chart's copies
of them and of the alert rules (`--check` only says whether they are stale). Tests compare the files with what this module builds, check that every
expression names a series of `cluster.metrics`, and let promtool parse each one.

Every selector filters `replica=~"$replica"`; prefill series of a pipeline rank (or of the
controller, which the `pp_rank` variable also lists) filter `pp_rank=~"$pp_rank"`, and series
only the controller owns pin `pp_rank="controller"` so picking a rank never hides them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
OUT_DIR = Path(__file__).parent / "grafana"
ALERTS = Path(__file__).parent / "prometheus" / "alerts.yml"
# The chart ships copies: Helm reads files only from inside the chart.
CHART = Path(__file__).parents[1] / "helm" / "pdserve"
RANKS = "$pp_rank"  # `sel(pp_rank=RANKS)`: filter by the dashboard's rank variable
CONTROLLER = "controller"
QUANTILES = (0.5, 0.9, 0.99)

Json = dict[str, Any]


# -- expressions ------------------------------------------------------------------------------


def sel(metric: str, role: str | None = None, pp_rank: str | None = None, **regex: str) -> str:
    """`metric{...}` filtered by the replica variable, the rank variable or a fixed rank, and
    `label=~"regex"` for each keyword."""
    matchers = [f'role="{role}"'] if role else []
    matchers.append('replica=~"$replica"')
    if pp_rank == RANKS:
        matchers.append('pp_rank=~"$pp_rank"')
    elif pp_rank is not None:
        matchers.append(f'pp_rank="{pp_rank}"')
    matchers += [f'{label}=~"{value}"' for label, value in regex.items()]
    return f"{metric}{{{', '.join(matchers)}}}"


def rate(selector: str, by: str = "") -> str:
    """Per-second rate over Grafana's rate window, summed `by` the given labels."""
    return f"sum{f' by ({by})' if by else ''} (rate({selector}[$__rate_interval]))"


def quantile(q: float, histogram: str, by: str = "", **where: Any) -> str:
    """The q-quantile of a histogram's `_bucket` series, aggregated over everything but `by`."""
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, {rate(sel(histogram + '_bucket', **where), labels)})"


# -- panels -----------------------------------------------------------------------------------


def target(expr: str, legend: str) -> Json:
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
    }


def quantile_targets(
    histogram: str, quantiles: tuple[float, ...] = QUANTILES, by: str = "", **where: Any
) -> list[Json]:
    """One target per quantile; the legend names the quantile and each `by` label."""
    suffix = "".join(f" {{{{{label.strip()}}}}}" for label in by.split(",") if label.strip())
    return [
        target(quantile(q, histogram, by, **where), f"p{round(q * 100)}{suffix}") for q in quantiles
    ]


def panel(
    title: str, targets: list[Json], unit: str, description: str, kind: str = "timeseries"
) -> Json:
    """A timeseries or stat panel; `gridPos` and ids are filled in by `dashboard`."""
    options: Json = {
        "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    if kind == "stat":
        options = {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        }
    for ref, t in enumerate(targets):
        t["refId"] = chr(ord("A") + ref)
    return {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": options,
        "targets": targets,
        "title": title,
        "type": kind,
    }


def query_variable(name: str, label: str, query: str) -> Json:
    return {
        "allValue": ".*",
        "current": {},
        "datasource": DATASOURCE,
        "definition": query,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": query,
        "refresh": 2,  # on time range change: replicas come and go
        "regex": "",
        "sort": 1,
        "type": "query",
    }


TEMPLATING = [
    {
        "current": {},
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    },
    query_variable("replica", "Replica", "label_values(pdserve_replica_healthy, replica)"),
    query_variable(
        "pp_rank", "PP rank", 'label_values(pdserve_queue_size{role="prefill"}, pp_rank)'
    ),
]


def dashboard(uid: str, title: str, description: str, panels: list[Json]) -> Json:
    """A dashboard whose panels flow left to right, wrapping at Grafana's 24 columns."""
    x = y = row_height = 0
    for number, p in enumerate(panels, start=1):
        width, height = (6, 4) if p["type"] == "stat" else (12, 8)
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        p["id"] = number
        p["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        x, row_height = x + width, max(row_height, height)
    return {
        "annotations": {"list": []},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["pdserve"],
        "templating": {"list": json.loads(json.dumps(TEMPLATING))},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
    }


# -- the dashboards ---------------------------------------------------------------------------


def overview() -> Json:
    """What users feel: request rates, latencies, tokens, errors, health."""
    ingress, http = {"role": "ingress"}, "pdserve_http_requests_total"
    return dashboard(
        "pdserve-overview",
        "pdserve overview",
        "Requests, latency, throughput and errors of pdserve (series of cluster/metrics.py).",
        [
            panel(
                "Healthy replicas by role",
                [target(f"sum by (role) ({sel('pdserve_replica_healthy')})", "{{role}}")],
                "short",
                "Replicas reporting pdserve_replica_healthy=1 (prefill: its controller).",
                "stat",
            ),
            panel(
                "Requests in flight",
                [target(f"sum ({sel('pdserve_requests_in_flight', **ingress)})", "in flight")],
                "short",
                "API requests being answered now, all replicas.",
                "stat",
            ),
            panel(
                "5xx ratio",
                [
                    target(
                        f"{rate(sel(http, **ingress, status='5..'))}"
                        f" / {rate(sel(http, **ingress))}",
                        "5xx",
                    )
                ],
                "percentunit",
                "Share of API responses with a 5xx status.",
                "stat",
            ),
            panel(
                "Request rate by route and status",
                [target(rate(sel(http, **ingress), "route, status"), "{{route}} {{status}}")],
                "reqps",
                "API responses per second.",
            ),
            panel(
                "Requests in flight by replica",
                [
                    target(
                        f"sum by (replica) ({sel('pdserve_requests_in_flight', **ingress)})",
                        "{{replica}}",
                    )
                ],
                "short",
                "API requests being answered now.",
            ),
            panel(
                "Time to first token",
                quantile_targets("pdserve_time_to_first_token_seconds", role="decode"),
                "s",
                "Request arrival at decode to its first token.",
            ),
            panel(
                "Time to first token by phase (p50)",
                quantile_targets("pdserve_request_phase_seconds", (0.5,), by="phase"),
                "s",
                "Where the time to first token goes: prefill bootstrap, queue wait, forward and "
                "KV transfer (the prefill controller's), decode prealloc, the whole prefill call "
                "and the decode join.",
            ),
            panel(
                "Inter-token latency",
                quantile_targets("pdserve_inter_token_latency_seconds", role="decode"),
                "s",
                "Time between two tokens of one request.",
            ),
            panel(
                "End-to-end request latency",
                quantile_targets("pdserve_e2e_request_latency_seconds", role="decode"),
                "s",
                "Request arrival at decode to its last token.",
            ),
            panel(
                "Tokens per second",
                [
                    target(rate(sel("pdserve_prompt_tokens_total", "decode")), "prompt"),
                    target(rate(sel("pdserve_generation_tokens_total", "decode")), "generation"),
                ],
                "short",
                "Prompt tokens prefilled and tokens generated, per second.",
            ),
            panel(
                "5xx responses by route and status",
                [
                    target(
                        rate(sel(http, **ingress, status="5.."), "route, status"),
                        "{{route}} {{status}}",
                    )
                ],
                "reqps",
                "API responses with a 5xx status, per second.",
            ),
            panel(
                "Request failures by reason",
                [
                    target(
                        rate(sel("pdserve_request_failures_total", **ingress), "reason"),
                        "{{reason}}",
                    ),
                    target(
                        rate(sel("pdserve_requests_unavailable_total", **ingress), "deployment"),
                        "no {{deployment}} replica (503)",
                    ),
                ],
                "reqps",
                "Requests that failed inside pdserve, and requests no replica of a deployment "
                "took within queue_timeout_s, per second.",
            ),
        ],
    )


def failures(kind: str) -> Json:
    """Bootstrap or transfer failures: prefill by the rank that failed, decode by reason."""
    metric = f"pdserve_{kind}_failures_total"
    return panel(
        f"{kind.capitalize()} failures by reason and rank",
        [
            target(
                rate(sel(metric, "prefill", RANKS), "pp_rank, reason"),
                "prefill {{pp_rank}} {{reason}}",
            ),
            target(rate(sel(metric, "decode"), "reason"), "decode {{reason}}"),
        ],
        "reqps",
        f"Requests that failed {'before' if kind == 'bootstrap' else 'during'} their KV transfer, "
        "per second; prefill counts each on the rank that reported it first (or controller).",
    )


def pages_used(role: str, pp_rank: str | None) -> str:
    used = sel("pdserve_kv_pages_in_use", role, pp_rank)
    total = sel("pdserve_kv_pages_total", role, pp_rank)
    return f"sum by (role, pp_rank) ({used}) / sum by (role, pp_rank) ({total})"


def disaggregation() -> Json:
    """How prefill ranks and decode hand requests over: queues, failures, KV transfer, pages."""
    queue = "pdserve_queue_size"
    controller = {"role": "prefill", "pp_rank": CONTROLLER}
    ranks = {"role": "prefill", "pp_rank": RANKS}
    return dashboard(
        "pdserve-disagg",
        "pdserve disaggregation",
        "Prefill pipeline ranks, decode and the KV hand-over between them.",
        [
            panel(
                "Queue sizes by rank",
                [
                    target(
                        f"sum by (role, pp_rank, queue) ({sel(queue, 'prefill', RANKS)})",
                        "{{role}} {{pp_rank}} {{queue}}",
                    ),
                    target(
                        f"sum by (role, pp_rank, queue) ({sel(queue, 'decode')})",
                        "{{role}} {{pp_rank}} {{queue}}",
                    ),
                ],
                "short",
                "Requests held per queue; a line above 0 on an idle system is an orphaned request.",
            ),
            panel(
                "KV pages in use / total",
                [
                    target(pages_used("prefill", RANKS), "{{role}} {{pp_rank}}"),
                    target(pages_used("decode", None), "{{role}}"),
                ],
                "percentunit",
                "Share of KV cache pages held by requests, by role and rank.",
            ),
            failures("bootstrap"),
            failures("transfer"),
            panel(
                "KV transfer throughput by rank",
                [
                    target(
                        rate(sel("pdserve_kv_transfer_bytes_total", **ranks), "pp_rank"),
                        "rank {{pp_rank}}",
                    )
                ],
                "Bps",
                "KV bytes written to decode per second, by the prefill rank that wrote them.",
            ),
            panel(
                "KV transfer latency by rank",
                quantile_targets("pdserve_kv_transfer_seconds", (0.5, 0.99), "pp_rank", **ranks),
                "s",
                "Duration of one request's KV write from one stage.",
            ),
            panel(
                "Consensus tick latency by rank",
                quantile_targets("pdserve_consensus_tick_seconds", (0.5, 0.99), "pp_rank", **ranks),
                "s",
                "Poll, all-reduce and apply of one consensus tick on one rank.",
            ),
            panel(
                "Prefill step latency",
                quantile_targets("pdserve_prefill_step_seconds", (0.5, 0.99), **controller),
                "s",
                "One prefill scheduler step across all stages (controller).",
            ),
            panel(
                "Prefill requests by outcome",
                [
                    target(
                        rate(sel("pdserve_prefill_requests_total", **controller), "outcome"),
                        "{{outcome}}",
                    )
                ],
                "reqps",
                "Prefill requests ended per second: ok or the failure reason.",
            ),
            panel(
                "Stage failures",
                [
                    target(
                        "sum (increase("
                        f"{sel('pdserve_stage_failures_total', **controller)}[$__range]))",
                        "stage groups rebuilt",
                    )
                ],
                "short",
                "Prefill stage groups lost and rebuilt in the selected time range.",
                "stat",
            ),
        ],
    )


def dashboards() -> dict[str, Json]:
    """File name -> dashboard."""
    return {"pdserve-overview.json": overview(), "pdserve-disaggregation.json": disaggregation()}


def render(board: Json) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def panel_expressions() -> list[tuple[str, str]]:
    """("<dashboard title>/<panel title>", expr) for every target of both dashboards."""
    return [
        (f"{board['title']}/{p['title']}", t["expr"])
        for board in dashboards().values()
        for p in board["panels"]
        for t in p["targets"]
    ]


_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "replica": ".*",
    "pp_rank": ".*",
}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def concrete(expr: str, **overrides: str) -> str:
    """`expr` as a plain Prometheus query: Grafana's variables replaced by fixed values."""
    variables = _VARIABLES | overrides

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return _VARIABLE.sub(value, expr)


def generated_files() -> dict[Path, str]:
    """Every file this module owns, with the text it must hold."""
    files = {}
    for name, board in dashboards().items():
        files[OUT_DIR / name] = files[CHART / "dashboards" / name] = render(board)
    files[CHART / "rules" / ALERTS.name] = ALERTS.read_text()
    return files


def main(argv: list[str]) -> int:
    stale = []
    for path, text in generated_files().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if "--check" not in argv:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if '--check' in argv else 'wrote'} {path}")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
