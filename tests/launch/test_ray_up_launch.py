"""`ray up` for real: the shipped local config, over SSH to 127.0.0.1, as a new user runs it.

`make test-deploy` runs this (`.ci/run` too); it takes minutes. It starts its own `sshd` on
127.0.0.1:22 with a generated host key, authorizes a throwaway client key for the current user
(root on CI), and launches `cluster/ray_up/pdserve-local.yaml` changed only in the key it
names. The "remote" host is this machine, so the launch writes what a node keeps:
`~/pdserve`, `~/venv`, `~/.pdserve/env` and a line at the top of `~/.bashrc`, and the
packaged model under /opt/pdserve. The host's `PIP_*` environment (where this machine's pip
finds its wheels) is passed to the SSH sessions, as a host's pip configuration would be.

Then: the app gets to RUNNING, a chat request through the openai client answers, the Serve CLI
works on a host that has `~/.ray/auth_token` (Ray would switch `ray start` to token auth behind
the CLI's back), and `ray down` leaves no Ray or Serve process running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).parents[2]
LOCAL = REPO / "cluster" / "ray_up" / "pdserve-local.yaml"
RAY = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "ray"
API = "http://127.0.0.1:8000"
LEFTOVERS = ("raylet", "gcs_server", "ray::", "dashboard/dashboard.py", "default_worker.py")


def run(*cmd: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        line.strip()
        for line in out.splitlines()[1:]
        if any(name in line for name in LEFTOVERS) and "pytest" not in line
    ]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An SSH server on 127.0.0.1:22 that takes a fresh key for the current user; yields the
    client key."""
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync"):
        assert shutil.which(tool), f"{tool} is missing: `make test-deploy` installs it"
    assert not port_open(22), "something listens on 127.0.0.1:22 already; stop it first"
    assert not ray_processes(), f"Ray is running on this machine already: {ray_processes()}"
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name), timeout=30)
    ssh_dir = Path.home() / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    before = authorized.read_text() if authorized.exists() else None
    client_pub = (home / "client_key.pub").read_text()
    authorized.write_text((before or "") + client_pub)
    authorized.chmod(0o600)
    pip_env = [f"SetEnv {k}={v}" for k, v in os.environ.items() if k.startswith("PIP_")]
    (home / "sshd_config").write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                "Port 22",
                f"HostKey {home / 'host_key'}",
                f"PidFile {home / 'sshd.pid'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                f"AuthorizedKeysFile {authorized}",
                "MaxSessions 64",
                "MaxStartups 64",
                *pip_env,
            ]
        )
        + "\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    run("/usr/sbin/sshd", "-f", str(home / "sshd_config"), "-E", str(home / "sshd.log"), timeout=30)
    try:
        deadline = time.monotonic() + 10
        while not port_open(22):
            assert time.monotonic() < deadline, (home / "sshd.log").read_text()
            time.sleep(0.1)
        yield home / "client_key"
    finally:
        pid = int((home / "sshd.pid").read_text())
        os.kill(pid, 15)
        if before is None:
            authorized.unlink()
        else:
            authorized.write_text(before)


@pytest.fixture(scope="module")
def leftover_auth_token() -> Iterator[None]:
    """A host that ran `ray.init()` once has ~/.ray/auth_token; make sure this one does."""
    token = Path.home() / ".ray" / "auth_token"
    created = not token.exists()
    if created:
        token.parent.mkdir(exist_ok=True)
        token.write_text(os.urandom(16).hex())
    yield
    if created:
        token.unlink()


@pytest.fixture(scope="module")
def cluster_config(sshd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped local config, changed only in the SSH key it names."""
    config = yaml.safe_load(LOCAL.read_text())
    config["auth"]["ssh_private_key"] = str(sshd)
    path = tmp_path_factory.mktemp("ray_up") / "pdserve-local.yaml"
    path.write_text(yaml.safe_dump(config))
    shipped = yaml.safe_load(LOCAL.read_text())
    assert {k: v for k, v in config.items() if k != "auth"} == {
        k: v for k, v in shipped.items() if k != "auth"
    }
    return path


def wait_ready(timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{API}/ready", timeout=10)
            if response.status_code == 200:
                return response.json()
            last = response.text[:2000]  # not found until the ingress runs, then why not
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(3)
    raise AssertionError(f"the app was not ready after {timeout_s:.0f}s: {last}")


def test_ray_up_serves_a_chat_request_and_ray_down_leaves_nothing_running(
    cluster_config: Path, leftover_auth_token: None
) -> None:
    from openai import OpenAI

    started = time.monotonic()
    try:
        run(str(RAY), "up", "-y", "--no-config-cache", str(cluster_config), timeout=1500)
        up_s = time.monotonic() - started
        ready = wait_ready(600)
        assert ready["parts"]["serve"]["deployments"] == {
            "ingress": "HEALTHY",
            "decode": "HEALTHY",
            "prefill": "HEALTHY",
        }
        # The Serve CLI on the head, through the mode node.sh set for every shell there.
        status = run(str(RAY), "exec", str(cluster_config), "serve status", timeout=120)
        assert "status: RUNNING" in status.stdout, status.stdout[-3000:]

        client = OpenAI(base_url=f"{API}/v1", api_key="none", timeout=120)
        models = client.models.list()
        assert [m.id for m in models.data] == ["smollm2-135m-instruct"]
        answer = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
        print(f"ray up took {up_s:.0f}s, ready after {time.monotonic() - started:.0f}s")
    finally:
        run(str(RAY), "down", "-y", str(cluster_config), timeout=300, check=False)
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not ray_processes(), f"left running after ray down: {ray_processes()}"
    assert not port_open(8000)
