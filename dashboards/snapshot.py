"""`make dashboards-snapshot`: the Grafana dashboards as PNG plots, without a Grafana.

Starts the main job on this machine (a local Ray cluster with simulated GPU nodes, the
generated model, PD with PP=2), a real Prometheus that scrapes it, runs a short mixed load with
aborts, then queries every panel of `dashboards/grafana/*.json` over the run and draws one
PNG per dashboard with matplotlib (one subplot per panel, one line per series, legends as in
Grafana).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")

from dashboards.generate import concrete
from dashboards.prometheus_server import RULES, PrometheusServer, scrape_config
from dashboards.traffic import mixed_load

log = logging.getLogger("pdserve.snapshot")
GRAFANA = Path(__file__).parent / "grafana"
SCRAPE_INTERVAL_S = 1
# What Grafana would pick for $__rate_interval at a 1 s scrape interval on a short run.
RATE_INTERVAL = "10s"
MAX_LEGEND = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.extend(panels(panel) if "panels" in panel else [panel])
    return [p for p in out if p.get("targets")]


def plot_dashboard(
    prometheus: PrometheusServer, dashboard: dict[str, Any], start: float, end: float, out: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(dashboard)
    cols = 3
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False, layout="constrained"
    )
    step = max(1.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, chosen, strict=False):
        zeros = []
        for target in panel["targets"]:
            query = concrete(target["expr"], __rate_interval=RATE_INTERVAL)
            for result in prometheus.query_range(query, start, end, step):
                xs = [float(t) - start for t, _ in result["values"]]
                ys = [float(v) for _, v in result["values"]]
                label = legend(target.get("legendFormat", ""), result["metric"])
                if all(y == 0 for y in ys):
                    zeros.append((xs, ys))  # pre-initialised series: one line stands for all
                else:
                    ax.plot(xs, ys, label=label)
        if zeros:
            xs, ys = zeros[0]
            ax.plot(xs, ys, color="grey", linestyle="--", label=f"{len(zeros)} series at 0")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles[:MAX_LEGEND], labels[:MAX_LEGEND], fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.suptitle(dashboard["title"])
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dashboards/snapshots")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--pp-size", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="pdserve: %(message)s")

    import ray
    from ray import serve

    from deployments.app import AppConfig, build_app
    from deployments.serve_cli import start_local_cluster
    from engine.testmodel import make_test_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pdserve-snapshot-"))
    model = make_test_model(work / "model")
    cluster = start_local_cluster(gpu_nodes=2, gpus_per_node=2)
    prometheus = None
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = AppConfig(model=str(model), pp_size=args.pp_size, dtype="float32", device="cpu")
        serve.run(build_app(config), name="pdserve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        prometheus = PrometheusServer(
            scrape_config(base, SCRAPE_INTERVAL_S, [RULES]), work / "prometheus"
        )
        time.sleep(5)  # discovery and the first scrapes
        start = time.time()
        log.info("running a %.0fs mixed load with aborts", args.seconds)
        counts = asyncio.run(
            mixed_load(f"{base}/v1", "none", config.ingress().served_model_name, args.seconds)
        )
        log.info("load done: %s", counts)
        time.sleep(10)  # the queues drain on the plots
        end = time.time()
        for path in sorted(GRAFANA.glob("*.json")):
            dashboard = json.loads(path.read_text())
            png = plot_dashboard(prometheus, dashboard, start - 5, end, out / f"{path.stem}.png")
            log.info("wrote %s", png)
    finally:
        if prometheus is not None:
            prometheus.stop()
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
