"""`pdserve serve`: start (or join) a Ray cluster, deploy the app, print how to call it.

`--local-cluster` starts a multi-node Ray cluster on this machine whose worker nodes carry
simulated GPUs (Ray resources; the stages run on the CPU), so the placement is the one a real
cluster gets. Without it, `pdserve serve` joins the cluster in `RAY_ADDRESS` (or starts a
plain local Ray).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("pdserve.serve")
# How soon (and how often) Serve says that a replica waits for resources: 30 s each by default.
SERVE_STARTUP_WARNING_ENV = (
    "RAY_SERVE_SLOW_STARTUP_WARNING_S",
    "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S",
)


def _progress(message: str) -> None:
    sys.stderr.write(f"pdserve: {message}\n")
    sys.stderr.flush()


def load_config(args: argparse.Namespace) -> Any:
    from deployments.app import AppConfig

    data: dict[str, Any] = {}
    if args.config:
        text = Path(args.config).read_text()
        if args.config.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    overrides = {
        "model": args.model,
        "pp_size": args.pp_size,
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "model" not in data:
        raise ValueError("no model: pass --model DIR or set `model` in the config file")
    from deployments.model_store import KNOWN_MODELS, resolve_model

    if data["model"] in KNOWN_MODELS:
        data.setdefault("served_model_name", data["model"])
    data["model"] = resolve_model(data["model"])
    return AppConfig.model_validate(data)


def start_local_cluster(gpu_nodes: int, gpus_per_node: int) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    _progress(
        f"starting a local Ray cluster: a head and {gpu_nodes} node(s) of "
        f"{gpus_per_node} simulated GPU(s)"
    )
    # Ray runs its workers at nice 15 so that a driver stays responsive; here the workers are
    # the service and the driver only waits, so they run at the priority of what shares the
    # machine with them (a load generator, vLLM in `make bench-peer`).
    system = {"worker_niceness": 0}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 4, "_system_config": system}
    )
    for i in range(gpu_nodes):
        cluster.add_node(num_cpus=4, num_gpus=gpus_per_node, resources={f"gpu_node_{i}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def usage_text(config: Any, mode: str = "pd") -> str:
    base = f"http://{config.host}:{config.port}"
    name = config.ingress().served_model_name
    auth = f' -H "Authorization: Bearer {config.api_key}"' if config.api_key else ""
    key = config.api_key or "none"
    shape = f"prefill PP={config.pp_size}, decode" if mode == "pd" else "colocated"
    return f"""
pdserve is serving `{name}` ({shape}) at {base}/v1

  curl {base}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  print(client.chat.completions.create(model="{name}",
        messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32).choices[0].message.content)

Health: {base}/health   Metrics (every replica and PP stage): {base}/metrics   Stop: Ctrl-C
"""


def set_ray_environment(auth_mode: str) -> None:
    """Ray's auth mode for the cluster this process starts and every client it runs (Ray 2.60
    turns token auth on by itself when ~/.ray/auth_token exists and the mode is unset), and
    how soon Serve says a replica waits for resources (pdserve's 503s quote it)."""
    os.environ["RAY_AUTH_MODE"] = auth_mode
    for name in SERVE_STARTUP_WARNING_ENV:
        os.environ.setdefault(name, "10")


def serve_main(args: argparse.Namespace) -> int:
    config = load_config(args)
    set_ray_environment(args.ray_auth_mode)
    import ray
    from ray import serve

    from deployments.app import build_service

    cluster = None
    if args.local_cluster:
        cores = len(os.sched_getaffinity(0))
        config = config.sharing_cores(cores, args.mode)
        _progress(
            f"{cores} cores: "
            + (
                f"colocated engine {config.decode_num_cpus:g}"
                if args.mode == "colocated"
                else f"decode {config.decode_num_cpus:g}, "
                f"{config.pp_size} prefill stages {config.num_cpus_per_stage:g} each"
            )
            + " CPUs (compute threads: the floor, at least 1)"
        )
        cluster = start_local_cluster(args.gpu_nodes, args.gpus_per_node)
    else:
        _progress("connecting to Ray")
        ray.init(log_to_driver=False)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        parts = (
            f"ingress, decode, prefill with {config.pp_size} stage(s)"
            if args.mode == "pd"
            else "ingress, one colocated engine"
        )
        _progress(f"deploying {parts} (loading the model; this takes a little while)")
        started = time.monotonic()
        done = threading.Event()

        def ticker() -> None:
            while not done.wait(5):
                _progress(f"still deploying ({time.monotonic() - started:.0f}s)")

        threading.Thread(target=ticker, daemon=True).start()
        try:
            serve.run(build_service(config, args.mode), name="pdserve", route_prefix="/")
        finally:
            done.set()
        _progress(f"ready after {time.monotonic() - started:.0f}s")
        sys.stdout.write(usage_text(config, args.mode))
        sys.stdout.flush()
        stop = threading.Event()
        # Both stop it, also where SIGINT came in ignored (a background job of a script, which
        # is how benchmarks start it): Python raises KeyboardInterrupt only for a SIGINT it
        # found handled at start.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1):
            pass
        _progress("shutting down")
        serve.shutdown()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="deploy pdserve and serve the OpenAI API")
    p.add_argument("--config", help="AppConfig as YAML or JSON (flags below override it)")
    p.add_argument("--model", help="local HF model directory")
    p.add_argument("--pp-size", type=int)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require this bearer token (or set PDSERVE_API_KEY)")
    p.add_argument(
        "--mode",
        choices=("pd", "colocated"),
        default="pd",
        help="pd: prefill/decode disaggregation (default); colocated: one engine does both, "
        "behind the same API, to compare the two on your hardware",
    )
    p.add_argument(
        "--local-cluster",
        action="store_true",
        help="start a multi-node Ray cluster on this machine with simulated GPUs",
    )
    p.add_argument(
        "--ray-auth-mode",
        choices=("disabled", "token"),
        default=os.environ.get("RAY_AUTH_MODE", "disabled"),
        help="Ray's token authentication for the cluster and its clients (default: "
        "$RAY_AUTH_MODE, else disabled); token: Ray reads or creates ~/.ray/auth_token",
    )
    p.add_argument("--gpu-nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=2)
    p.set_defaults(func=serve_main)
