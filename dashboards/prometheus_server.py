"""A real Prometheus (Debian's `prometheus` package) on a free local port, for the tests and
`make dashboards-snapshot`: it scrapes a running pdserve through the API's service discovery
and evaluates the alert rules in `dashboards/prometheus/alerts.yml`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

RULES = Path(__file__).parent / "prometheus" / "alerts.yml"
SCRAPE = Path(__file__).parent / "prometheus" / "scrape.yml"


def find_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"`{name}` is not installed: run `make test` (it installs Debian's prometheus "
            "package) or `apt-get install prometheus`"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(api_url: str, interval_s: float, rule_files: list[Path]) -> dict[str, Any]:
    """The shipped `scrape.yml` (HTTP discovery through `api_url/metrics/targets`), pointed at
    `api_url`, with a faster scrape and evaluation interval and the given rule files."""
    config = yaml.safe_load(SCRAPE.read_text().replace("http://API_HOST:8000", api_url))
    interval = f"{interval_s:g}s"
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    config["rule_files"] = [str(p) for p in rule_files]
    for job in config["scrape_configs"]:
        for sd in job.get("http_sd_configs", []):
            sd["refresh_interval"] = interval
    return config


def rules_with_for(overrides: dict[str, str], out: Path) -> Path:
    """A copy of the alert rules with some `for:` durations changed (tests cannot wait 2m)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in overrides:
                rule["for"] = overrides[rule["alert"]]
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class PrometheusServer:
    """`prometheus` running with a config we write, and the HTTP API calls we need."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [
                find_binary("prometheus"),
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]

    def _get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._get("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self._get("targets")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        return self._get("alerts")["alerts"]

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
