"""The SSH provider against a real sshd on a loopback port.

Each test gets its own sshd (keys, config, pid file), its own provider
instance and machines whose host dirs, work roots and tmux sockets are its
own; teardown stops what it started, by pid and by socket.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need, wait_for
from sshd import Sshd, have_sshd

PROVIDER = "lab"


def machine_toml(name: str, sshd: Sshd, root: Path, socket: str, **extra) -> str:
    lines = [f"[providers.{PROVIDER}.machines.{name}]", f'address = "{sshd.address}"',
             f"port = {sshd.port}", 'user = "root"', f'identity = "{sshd.identity}"',
             f'host_dir = "{root / name / "host"}"', f'work_root = "{root / name / "work"}"',
             f'tmux_socket = "{socket}-{name}"']
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class Lab:
    """The CLI, an sshd, and the machines of provider `lab` on it."""

    def __init__(self, cli, sshd: Sshd, root: Path):
        self.cli = cli
        self.sshd = sshd
        self.root = root
        self.machines = {}
        self.base = f"watch_interval = 1\n[providers.{PROVIDER}]\nbackend = \"ssh\"\n" \
                    "connect_timeout = 3\ntimeout = 20\n"

    def add(self, name: str, sshd: Sshd = None, **extra) -> None:
        self.machines[name] = machine_toml(name, sshd or self.sshd, self.root, self.cli.socket, **extra)
        self.write()

    def write(self) -> None:
        config = self.cli.home / ".config" / "mngr"
        config.mkdir(parents=True, exist_ok=True)
        (config / "settings.toml").write_text(self.base + "".join(self.machines.values()))

    def trust_key(self, sshd: Sshd = None) -> None:
        known = self.cli.home / ".mngr" / "known_hosts"
        known.parent.mkdir(parents=True, exist_ok=True)
        with open(known, "a") as handle:
            handle.write((sshd or self.sshd).known_hosts_line())

    def tmux(self, machine: str, *args):
        """tmux on the machine's socket, as the machine's sshd sessions see it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        return subprocess.run(["tmux", "-L", f"{self.cli.socket}-{machine}", *args],
                              capture_output=True, text=True, env=env, timeout=10)

    def agents(self) -> dict:
        return {row["name"]: row for row in json.loads(self.cli.ok("list", "--json").out)}

    def host_dir(self, machine: str) -> Path:
        return self.root / machine / "host"


@pytest.fixture
def lab(mngr_cli, tmp_path):
    need(have_sshd(), "sshd (openssh-server) and root, to run it on a loopback port")
    sshd = Sshd(tmp_path / "sshd").start()
    lab = Lab(mngr_cli, sshd, tmp_path / "machines")
    lab.started = [sshd]
    lab.add("m1")
    lab.trust_key()
    yield lab
    for name in lab.machines:
        lab.tmux(name, "kill-server")
        pid_file = lab.host_dir(name) / "watcher.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass
    for server in lab.started:
        server.stop()


def test_agent_lifecycle_on_a_machine(lab):
    cli = lab.cli
    (cli.work / "README").write_text("hello\n")
    (cli.work / "big.log").write_text("x" * 1000)
    created = cli.ok("create", "a1", "--host", "m1", "--agent-cmd", "cat", "--exclude", "*.log",
                     "--no-connect", "--json")
    row = json.loads(created.out)
    assert row["provider"] == PROVIDER and row["host"] == "m1" and row["state"] == "running"
    work = Path(row["work_dir"])
    assert (work / "README").read_text() == "hello\n" and not (work / "big.log").exists()
    assert lab.tmux("m1", "has-session", "-t", "=mngr-a1").returncode == 0

    agents = lab.agents()
    assert agents["a1"]["state"] == "running" and agents["a1"]["host_state"] == "running"
    assert agents["a1"]["verified"] is True

    cli.ok("message", "a1", "-m", "ping over ssh")
    assert wait_for(lambda: "ping over ssh" in cli.ok("logs", "a1").out, timeout=10)
    out = cli.ok("exec", "a1", "pwd; echo $MNGR_AGENT_NAME").out.split()
    assert out == [str(work), "a1"]

    cli.ok("create", "a2", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect")
    agents = lab.agents()
    assert agents["a2"]["host_id"] == agents["a1"]["host_id"]

    cli.ok("stop", "a2")
    assert lab.agents()["a2"]["state"] == "stopped"
    assert lab.agents()["a1"]["state"] == "running"
    cli.ok("stop", "a1")
    agents = lab.agents()
    assert agents["a1"]["state"] == "stopped" and agents["a1"]["host_state"] == "stopped"

    cli.ok("start", "a1")
    agents = lab.agents()
    assert agents["a1"]["state"] == "running" and agents["a1"]["host_state"] == "running"

    cli.ok("destroy", "-f", "a2")
    assert "a2" not in lab.agents()
    cli.ok("destroy", "-f", "a1")
    assert lab.agents() == {}
    assert not lab.host_dir("m1").exists() and not work.exists()
    assert lab.tmux("m1", "has-session", "-t", "=mngr-a1").returncode != 0
