"""How every process's `pdserve_*` series reach Prometheus and the API's `/metrics`.

Each process that owns series (stage actors, prefill controllers, decode and API replicas)
serves `cluster.metrics.REGISTRY` over HTTP on a port the OS picks, so the many actors of one
node never collide, and keeps its `host:port` registered with one directory actor per Ray
cluster. Prometheus finds the processes through the API's `/metrics/targets` (HTTP service
discovery); the API's `/metrics` scrapes them all and merges them into one page, as vLLM and
SGLang users expect. A process that dies stops answering and drops out of both.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import ray
from prometheus_client import generate_latest, start_http_server

from cluster.metrics import REGISTRY

log = logging.getLogger(__name__)

DIRECTORY_NAME = "pdserve-metrics-directory"
NAMESPACE = "pdserve"
REFRESH_S = 10.0  # how often a process re-registers (a restarted directory learns it again)
EXPIRE_S = 6 * REFRESH_S  # a target not refreshed this long is forgotten
SCRAPE_TIMEOUT_S = 3.0


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsDirectory:
    """Where every exporting process says `host:port`, with its app and roles."""

    def __init__(self) -> None:
        self._targets: dict[str, tuple[dict[str, str], float]] = {}

    def register(self, address: str, meta: dict[str, str]) -> None:
        self._targets[address] = (meta, time.monotonic())

    def unregister(self, address: str) -> None:
        self._targets.pop(address, None)

    def targets(self, app: str | None = None) -> list[dict[str, Any]]:
        """Live targets (of `app` if given) as Prometheus HTTP service discovery groups."""
        now = time.monotonic()
        for address, (_, seen) in list(self._targets.items()):
            if now - seen > EXPIRE_S:
                del self._targets[address]
        return [
            {"targets": [address], "labels": {f"__meta_pdserve_{k}": v for k, v in meta.items()}}
            for address, (meta, _) in sorted(self._targets.items())
            if app is None or meta.get("app") == app
        ]


def directory() -> Any:
    """The cluster's directory actor, created by whoever asks first.

    Never inside the asker's placement group: a Serve replica captures the actors it creates
    in its own group, and when that replica went away the group took the directory with it
    and its restart could never be placed (`/metrics` failed for good).
    """
    return MetricsDirectory.options(
        name=DIRECTORY_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy="DEFAULT",
    ).remote()


class _ProcessExporter:
    """This process's metrics server and its registration (one per process)."""

    def __init__(self, app: str) -> None:
        server, _ = start_http_server(0, addr="0.0.0.0", registry=REGISTRY)
        self.address = f"{ray.util.get_node_ip_address()}:{server.server_port}"
        self.meta = {"app": app, "pid": str(os.getpid()), "roles": ""}
        self._roles: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(
            target=self._keep_registered, name="metrics-registration", daemon=True
        ).start()
        atexit.register(self._unregister)

    def add_role(self, role: str) -> None:
        with self._lock:
            if role not in self._roles:
                self._roles.append(role)
                self.meta = {**self.meta, "roles": ",".join(self._roles)}
        self._wake.set()

    def _keep_registered(self) -> None:
        while True:
            try:
                ray.get(directory().register.remote(self.address, self.meta), timeout=30)
            except Exception as exc:  # the directory restarts; keep trying
                log.warning("metrics registration failed: %s", exc)
            self._wake.wait(REFRESH_S)
            self._wake.clear()

    def _unregister(self) -> None:
        with contextlib.suppress(Exception):
            directory().unregister.remote(self.address)


_exporter: _ProcessExporter | None = None
_exporter_lock = threading.Lock()


def serve_replica_identity() -> tuple[str, str]:
    """(application name, replica label) of the Serve replica this runs in; ("", random)
    outside Serve."""
    from ray import serve

    from cluster.metrics import replica_label

    try:
        context = serve.get_replica_context()
    except Exception:  # not inside a Serve replica (local testing mode)
        return "", replica_label(None)
    return context.app_name, replica_label(context.replica_tag)


def export_process_metrics(app: str, role: str) -> str | None:
    """Serve this process's series and keep them discoverable; returns its `host:port`.

    Outside a Ray worker or driver (pure unit tests) nothing is served and None is returned.
    """
    global _exporter
    if not ray.is_initialized():
        return None
    with _exporter_lock:
        if _exporter is None:
            _exporter = _ProcessExporter(app)
            log.info("serving metrics", extra={"address": _exporter.address, "app": app})
    _exporter.add_role(role)
    return _exporter.address


async def scrape_app(app: str, own_address: str | None) -> str:
    """Every `pdserve_*` series of `app`: this process's own plus every registered process's."""
    import aiohttp

    try:
        groups = await asyncio.wait_for(directory().targets.remote(app), SCRAPE_TIMEOUT_S)
    except Exception as exc:  # restarting: this process's own series are still worth serving
        log.warning("metrics directory unavailable; serving this process's series only: %s", exc)
        groups = []
    addresses = [a for g in groups for a in g["targets"] if a != own_address]
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def fetch(address: str) -> str | None:
            try:
                async with session.get(f"http://{address}/metrics") as response:
                    response.raise_for_status()
                    return await response.text()
            except Exception as exc:  # a process that just died; it drops out of discovery
                log.debug("metrics scrape of %s failed: %s", address, exc)
                return None

        texts = await asyncio.gather(*(fetch(a) for a in addresses))
    own = generate_latest(REGISTRY).decode()
    return merge_expositions([own, *(t for t in texts if t)])


def merge_expositions(texts: Iterable[str]) -> str:
    """One Prometheus text page from several: each family once, its samples from all pages.

    Every page comes from prometheus-client, so a family is a `# HELP` and a `# TYPE` line
    followed by its samples; pages from different processes differ in their label values.
    """
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                kinds = headers.setdefault(family, [])
                if not any(h[:6] == line[:6] for h in kinds):
                    kinds.append(line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#") and family is not None:
                samples[family].append(line)
    out: list[str] = []
    for family, lines in headers.items():
        out.extend(lines)
        out.extend(dict.fromkeys(samples[family]))  # a target listed twice counts once
    return "\n".join(out) + "\n"
