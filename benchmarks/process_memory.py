"""Resident memory of every process of a running deployment, by role.

Read from /proc (VmRSS), so it sees what `ps` sees: the Serve replicas (`ray::ServeReplica:APP:
DEPLOYMENT`), the PP stage actors (`ray::StageActor`), Serve's controller and proxies, and
Ray's own daemons. Shared pages count once per process, as RSS does.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "runtime_env", "monitor.py", "log_monitor")


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    role: str
    rss_mb: float


def role_of(cmdline: str) -> str | None:
    """What a process is, from its command line; None for processes not of Ray."""
    if cmdline.startswith("ray::ServeReplica:"):
        return "serve:" + cmdline.split()[0].split(":")[-1].split(".")[0]
    if cmdline.startswith("ray::"):
        name = cmdline.split()[0].removeprefix("ray::").split(".")[0]
        return "idle worker" if name == "IDLE" else name
    if any(daemon in cmdline for daemon in _RAY_DAEMONS) and "ray" in cmdline:
        return "ray daemons"
    return None


def _rss_mb(pid: str) -> float:
    status = (Path("/proc") / pid / "status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else 0.0


def ray_processes() -> list[ProcessMemory]:
    """Every process on this machine that belongs to Ray, with its role and RSS."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            role = role_of(cmdline)
            if role is not None:
                out.append(ProcessMemory(int(entry.name), role, _rss_mb(entry.name)))
        except (OSError, UnicodeDecodeError):
            continue  # ended while we looked
    return sorted(out, key=lambda p: -p.rss_mb)


def by_role(processes: list[ProcessMemory]) -> dict[str, dict[str, float]]:
    """Per role: how many processes, the largest one's RSS and their sum (MB)."""
    count: Counter[str] = Counter(p.role for p in processes)
    table: dict[str, dict[str, float]] = {}
    for p in processes:
        row = table.setdefault(p.role, {"processes": count[p.role], "max_mb": 0.0, "sum_mb": 0.0})
        row["max_mb"] = max(row["max_mb"], p.rss_mb)
        row["sum_mb"] += p.rss_mb
    return table
