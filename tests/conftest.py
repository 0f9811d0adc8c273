"""Fixtures that start real components and clean up only what they started."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def need(ok: bool, what: str) -> None:
    """Skip for a missing real component; in CI (MNGR_REQUIRE_REAL=1) fail instead."""
    if ok:
        return
    if os.environ.get("MNGR_REQUIRE_REAL") == "1":
        pytest.fail(f"{what} is required here (MNGR_REQUIRE_REAL=1) but missing")
    pytest.skip(f"{what} missing")


@dataclass
class Result:
    code: int
    out: str
    err: str


class Mngr:
    """Runs the real CLI (python3 mngr.py) in an isolated home with its own tmux socket."""

    def __init__(self, home: Path, tmux_dir: Path, socket: str):
        self.home = home
        self.work = home / "work"
        self.work.mkdir()
        self.socket = socket
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MNGR_", "TMUX", "XDG_"))}
        self.env.update(HOME=str(home), TMUX_TMPDIR=str(tmux_dir), MNGR_TMUX_SOCKET=socket,
                        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
                        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")

    def __call__(self, *args, input=None, cwd=None, env=None, timeout=60) -> Result:
        proc = subprocess.run([sys.executable, str(REPO / "mngr.py"), *args],
                              input=input if input is not None else "",
                              capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or self.work, env={**self.env, **(env or {})})
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args, **kwargs) -> Result:
        result = self(*args, **kwargs)
        assert result.code == 0, f"mngr {' '.join(args)} -> {result.code}\n{result.err}"
        return result

    def tmux(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, env=self.env, timeout=10)

    @property
    def host_dir(self) -> Path:
        return self.home / ".mngr"


@pytest.fixture
def mngr_cli(tmp_path):
    need(shutil.which("tmux") is not None, "tmux")
    need(shutil.which("git") is not None, "git")
    tmux_dir = Path(tempfile.mkdtemp(prefix="mt", dir="/tmp"))  # short: socket paths are limited
    home = tmp_path / "home"
    home.mkdir()
    cli = Mngr(home, tmux_dir, f"mngr-test-{os.getpid()}-{tmux_dir.name}")
    yield cli
    cli.tmux("kill-server")
    shutil.rmtree(tmux_dir, ignore_errors=True)


def wait_for(predicate, timeout=10.0, interval=0.05):
    """Poll until predicate() is truthy; returns its last value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
