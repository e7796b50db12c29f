"""Fast checks of the dashboards, alerts and scrape example (no Ray; promtool required).

A dashboard query that names a series pdserve does not export, or that promtool cannot parse,
shows an empty panel and never fails anything else, so it is caught here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.metrics import REGISTRY
from dashboards import generate

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "dashboards" / "prometheus"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
SELECTOR = re.compile(r"\b(pdserve_\w+)(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"')
BY = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run make test, which installs Debian's prometheus")
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    result = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


def series_labels() -> dict[str, set[str]]:
    """Every series name `cluster.metrics.REGISTRY` exports -> its label names.

    prometheus-client keeps a collector's label names private (`_labelnames`); a rename there
    fails this test loudly rather than silently passing.
    """
    out: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):
        labels = set(collector._labelnames)
        for family in collector.describe():
            for suffix in SUFFIXES[family.type]:
                out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def all_targets() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (board["title"], panel, target)
        for board in generate.dashboards().values()
        for panel in board["panels"]
        for target in panel["targets"]
    ]


# -- dashboards -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text"),
    sorted(generate.generated_files().items()),
    ids=lambda v: str(v.relative_to(generate.CHART.parents[1])) if isinstance(v, Path) else "",
)
def test_generated_files_are_current(path: Path, text: str) -> None:
    """The dashboards JSON and the Helm chart's copies (dashboards, alert rules)."""
    assert path.exists(), f"{path} missing: run python -m dashboards.generate"
    assert path.read_text() == text, (
        f"{path} differs from dashboards/generate.py: edit the generator (or alerts.yml) and "
        "run python -m dashboards.generate, never the copies"
    )


def test_uids_are_stable() -> None:
    assert {b["uid"] for b in generate.dashboards().values()} == {
        "pdserve-overview",
        "pdserve-disagg",
    }


@pytest.mark.parametrize("name", sorted(generate.dashboards()))
def test_variables_and_datasource(name: str) -> None:
    board = generate.dashboards()[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "replica", "pp_rank"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    queries = {
        "replica": "label_values(pdserve_replica_healthy, replica)",
        "pp_rank": 'label_values(pdserve_queue_size{role="prefill"}, pp_rank)',
    }
    for var, query in queries.items():
        v = variables[var]
        assert (v["query"], v["multi"], v["includeAll"], v["allValue"]) == (query, True, True, ".*")
        assert v["datasource"] == generate.DATASOURCE
    assert board["panels"], "a dashboard without panels"
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "stat"}
        assert panel["datasource"] == generate.DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == generate.DATASOURCE, panel["title"]


def test_selectors_filter_by_variables() -> None:
    for title, panel, target in all_targets():
        where, expr = f"{title}/{panel['title']}: {target['expr']}", target["expr"]
        for name, braces in SELECTOR.findall(expr):
            assert braces, f"{name} without a selector in {where}"
            assert 'replica=~"$replica"' in braces, where
            if 'role="prefill"' in braces:
                assert 'pp_rank=~"$pp_rank"' in braces or 'pp_rank="controller"' in braces, where
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in {"$__rate_interval", "$__range"}, f"fixed window in {where}"


def test_expressions_name_exported_series_and_labels() -> None:
    """Series and labels exist in cluster.metrics; legends only use labels the query keeps."""
    known = series_labels()
    checked = [(f"{t}/{p['title']}", tg["expr"], tg["legendFormat"]) for t, p, tg in all_targets()]
    checked += [(rule["alert"], rule["expr"], "") for rule in alert_rules()]
    for where, expr, legend in checked:
        names = [name for name, _ in SELECTOR.findall(expr)]
        assert names, f"{where} reads no pdserve series"
        for name, braces in SELECTOR.findall(expr):
            assert name in known, (
                f"{where}: {name} is not exported by cluster.metrics "
                "(histograms need _bucket/_sum/_count, counters _total)"
            )
            unknown = set(MATCHER.findall(braces)) - known[name]
            assert not unknown, f"{where}: {name} has no label {unknown}"
        labels = set().union(*(known[n] for n in names))
        grouped = {label.strip() for group in BY.findall(expr) for label in group.split(",")}
        assert grouped - {""} <= labels, f"{where}: grouping by unknown labels"
        if legend and BY.search(expr):
            assert set(LEGEND.findall(legend)) <= grouped, f"{where}: legend uses dropped labels"


def test_panel_expressions_parse(promtool: str, tmp_path: Path) -> None:
    expressions = generate.panel_expressions()
    assert len(expressions) == len(all_targets())
    rules = []
    for number, (title, expr) in enumerate(expressions):
        plain = generate.concrete(expr)
        assert "$" not in plain, f"{title}: variable left in {plain}"
        rules.append({"record": f"pdserve:panel_{number}", "expr": plain})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", path)


def test_concrete_substitutes_grafana_variables() -> None:
    expr = 'rate(x{replica=~"$replica", pp_rank=~"${pp_rank}"}[$__rate_interval]) + $__interval'
    assert generate.concrete(expr + " + $__range") == (
        'rate(x{replica=~".*", pp_rank=~".*"}[1m]) + 15s + 5m'
    )


# -- alerts and scrape configuration ----------------------------------------------------------


def test_alerts_check(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", PROMETHEUS / "alerts.yml")
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {
        "PdserveQueueNotDraining",
        "PdserveBootstrapFailures",
        "PdserveTransferFailures",
        "PdserveNoHealthyPrefill",
        "PdserveNoHealthyDecode",
        "PdserveRequestsUnavailable",
    }
    for rule in alert_rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_alerts_unit_tests(promtool: str) -> None:
    tested = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    covered = {t["alertname"] for case in tested for t in case["alert_rule_test"]}
    assert covered == {rule["alert"] for rule in alert_rules()}
    run_promtool(promtool, "test", "rules", PROMETHEUS / "alerts_test.yml")


def scrape_config(choice: str | None) -> str:
    """scrape.yml with placeholders filled and rule_files absolute; `choice` "a" or "b" keeps
    only that alternative (uncommenting it), None keeps the file as shipped."""
    text = (PROMETHEUS / "scrape.yml").read_text()
    text = text.replace("API_HOST:8000", "127.0.0.1:8000")
    text = text.replace("- alerts.yml", f"- {PROMETHEUS / 'alerts.yml'}")
    if choice is None:
        return text
    lines, block = [], None
    for line in text.splitlines():
        marker = re.match(r"\s*# (>>>|<<<) \((\w)\)", line)
        if marker:
            block = marker[2] if marker[1] == ">>>" else None
        elif block == choice and line.startswith("  # "):
            line = "  " + line[4:]
        elif block not in (None, choice):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("choice", [None, "a", "b"])
def test_scrape_config(promtool: str, tmp_path: Path, choice: str | None) -> None:
    text = scrape_config(choice)
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    run_promtool(promtool, "check", "config", path)
    config = yaml.safe_load(text)
    (job,) = config["scrape_configs"]  # one alternative only, or every series counts twice
    assert config["rule_files"] == [str(PROMETHEUS / "alerts.yml")]
    assert job["metrics_path"] == "/metrics"
    if choice == "b":
        assert job["honor_labels"] is True
        assert job["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]
    else:
        (sd,) = job["http_sd_configs"]
        assert sd["url"] == "http://127.0.0.1:8000/metrics/targets"
