"""The in-host idle watcher on the local host: real tmux, real processes, real hooks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, need, wait_for
from test_packaging import python39

INTERVAL = 1


@pytest.fixture
def cli(mngr_cli):
    config = mngr_cli.home / ".config" / "mngr"
    config.mkdir(parents=True)
    (config / "settings.toml").write_text(f"watch_interval = {INTERVAL}\n")
    return mngr_cli


def state(cli, name):
    rows = {a["name"]: a for a in json.loads(cli.ok("list", "--json").out)}
    return rows[name]["state"]


def events(cli, name="watcher.jsonl"):
    path = cli.host_dir / "events" / name
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def watcher_pid(cli):
    path = cli.host_dir / "watcher.pid"
    return int(path.read_text()) if path.exists() else None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


def script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_printing_agent_lives_and_quiet_agent_is_stopped_in_time(cli):
    cli.ok("create", "busy", "--agent-cmd",
           'while [ ! -e quiet ]; do echo tick; sleep 1; done; sleep 600',
           "--idle-mode", "agent", "--idle-timeout", "3s")
    time.sleep(6)  # twice the timeout, printing all along
    assert state(cli, "busy") == "running"
    (cli.work / "quiet").touch()
    quiet_at = time.monotonic()
    assert wait_for(lambda: state(cli, "busy") == "stopped", timeout=3 + INTERVAL + 2 + 1)
    assert time.monotonic() - quiet_at <= 3 + INTERVAL + 2 + 1
    stops = [e for e in events(cli) if e["event"] == "decision"]
    assert stops and stops[-1]["cause"] == "idle"
    assert wait_for(lambda: watcher_pid(cli) is None)  # on the local host it then exits


def test_a_person_typing_in_an_attached_client_keeps_a_user_mode_agent(cli):
    cli.ok("create", "typed", "--agent-cmd", "cat > /dev/null", "--idle-mode", "user",
           "--idle-timeout", "3s")
    outer = f"{cli.socket}-outer"
    attach = f"tmux -L {cli.socket} attach-session -t =mngr-typed"
    subprocess.run(["tmux", "-L", outer, "new-session", "-d", "-x", "80", "-y", "24", attach],
                   env=cli.env, check=True)
    try:
        end = time.monotonic() + 7
        while time.monotonic() < end:
            subprocess.run(["tmux", "-L", outer, "send-keys", "-t", "=0:", "x"], env=cli.env)
            time.sleep(0.5)
        assert state(cli, "typed") == "running"
        assert wait_for(lambda: state(cli, "typed") == "stopped", timeout=3 + INTERVAL + 3)
    finally:
        subprocess.run(["tmux", "-L", outer, "kill-server"], env=cli.env)


def test_deploy_lock_defers_the_stop_and_a_stale_one_does_not(cli):
    lock = cli.host_dir / "deploy_lock"
    lock.mkdir(parents=True)
    deploy = lock / "other-controller"
    deploy.touch()
    cli.ok("create", "deferred", "--agent-cmd", "sleep 600", "--idle-mode", "create",
           "--idle-timeout", "1s", "--deploy-timeout", "30s")
    time.sleep(1 + INTERVAL + 2)
    assert state(cli, "deferred") == "running"
    old = time.time() - 60  # the deploy crashed a minute ago: past the 30 s deploy timeout
    os.utime(deploy, (old, old))
    assert wait_for(lambda: state(cli, "deferred") == "stopped", timeout=INTERVAL + 3)
    assert any(e["event"] == "crashed_deploy_ignored" for e in events(cli))
    assert lock.is_dir() and not any(lock.iterdir())  # released, empty, for the next deploy


def test_a_command_fails_clearly_while_the_watcher_is_stopping_the_host(cli):
    cli.ok("create", "held", "--agent-cmd", "sleep 600")
    # "started" is logged once the watcher has made its deploy lock dir (pid file comes first)
    assert wait_for(lambda: any(e["event"] == "started" for e in events(cli)))
    (cli.host_dir / "deploy_lock").rmdir()  # what the watcher does when it stops the host
    result = cli("limit", "held", "--idle-timeout", "2h")
    assert result.code == 1 and "watcher is stopping it" in result.err


def test_killed_watcher_is_restarted_by_the_next_start(cli):
    cli.ok("create", "first", "--agent-cmd", "sleep 600")
    pid = wait_for(lambda: watcher_pid(cli))
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid))
    cli.ok("stop", "first")
    cli.ok("start", "first")
    new = wait_for(lambda: watcher_pid(cli) if watcher_pid(cli) != pid else None)
    assert new and alive(new)
    cli.ok("create", "second", "--agent-cmd", "sleep 600")  # one watcher per host, still
    time.sleep(0.5)
    assert watcher_pid(cli) == new and alive(new)


def test_sigterm_ends_the_watcher_cleanly_and_python39_runs_one_round(cli):
    python = python39()
    need(python is not None, "a Python 3.9 interpreter (pyenv versions/3.9*)")
    cli.ok("create", "old", "--agent-cmd", "sleep 600", "--idle-mode", "create",
           "--idle-timeout", "30s")
    pid = wait_for(lambda: watcher_pid(cli))
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not alive(pid), timeout=5)
    assert events(cli)[-1] == {**events(cli)[-1], "event": "exited", "reason": "SIGTERM"}
    # the copied-in file, under 3.9, isolated: one round against this host dir
    cli.ok("limit", "old", "--idle-timeout", "1s")
    time.sleep(1.1)
    env = {**cli.env, "MNGR_HOST_DIR": str(cli.host_dir)}
    watch = [python, "-I", "-S", str(cli.host_dir / "bin" / "mngr.py"), "watch", "--once",
             "--tmux-socket", cli.socket]
    fresh = subprocess.run(watch, env=env, capture_output=True, text=True, timeout=30)
    assert fresh.returncode == 0, fresh.stderr
    assert state(cli, "old") == "running"  # a host that has just booted gets its idle_timeout
    booted = subprocess.run(watch + ["--boot-time", str(time.time() - 60)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert booted.returncode == 0, booted.stderr
    assert state(cli, "old") == "stopped"
    assert [e["event"] for e in events(cli)][-3:] == ["decision", "stopped_agents", "exited"]


def test_boot_and_stop_hooks_run_in_order_and_are_logged(cli):
    trail = cli.home / "trail"
    hooks = cli.host_dir / "hooks"
    script(hooks / "boot" / "10-first", f"echo boot-1 >> {trail}")
    script(hooks / "boot" / "20-fails", f"echo boot-2 >> {trail}; exit 4")
    script(hooks / "boot" / "30-last", f"echo boot-3 >> {trail}")
    script(hooks / "stop" / "10-save", f"echo stop-1 >> {trail}")
    cli.ok("create", "hooked", "--agent-cmd", "sleep 600", "--idle-mode", "create",
           "--idle-timeout", "2s")
    assert wait_for(lambda: state(cli, "hooked") == "stopped", timeout=20)
    assert trail.read_text().split() == ["boot-1", "boot-2", "boot-3", "stop-1"]
    logged = [(e["moment"], e["hook"], e["exit_code"]) for e in events(cli, "hooks.jsonl")]
    assert logged == [("boot", "10-first", 0), ("boot", "20-fails", 4), ("boot", "30-last", 0),
                      ("stop", "10-save", 0)]


def test_agent_start_hooks_run_after_a_start(cli):
    cli.ok("create", "starter", "--agent-cmd", "sleep 600")
    row = json.loads(cli.ok("list", "--json").out)[0]
    marker = cli.home / "started"
    script(cli.host_dir / "agents" / row["id"] / "hooks" / "start" / "10-mark",
           f'echo "$MNGR_AGENT_NAME" > {marker}')
    cli.ok("stop", "starter")
    cli.ok("start", "starter")
    assert wait_for(lambda: marker.exists() and marker.read_text().strip() == "starter")


def test_malformed_data_json_does_not_crash_the_watcher(cli):
    cli.ok("create", "sturdy", "--agent-cmd", "sleep 600", "--idle-mode", "create",
           "--idle-timeout", "1h")
    pid = wait_for(lambda: watcher_pid(cli))
    data = cli.host_dir / "data.json"
    good = data.read_bytes()
    data.write_text("{ not json")
    assert wait_for(lambda: any(e["event"] == "error" for e in events(cli)), timeout=INTERVAL + 3)
    assert alive(pid)
    data.write_bytes(good)
    cli.ok("limit", "sturdy", "--idle-timeout", "1s")  # re-signed: the watcher wakes and stops it
    assert wait_for(lambda: state(cli, "sturdy") == "stopped", timeout=INTERVAL + 4)


def test_a_host_without_python3_cannot_be_created(cli, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("tmux", "git", "sh", "sleep"):
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                              text=True).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    cli.host_dir.mkdir()
    (cli.host_dir / "env").write_text(f"PATH={bin_dir}\n")
    result = cli("create", "nopy", "--agent-cmd", "sleep 600")
    assert result.code == 1 and "no python3 on the host's PATH" in result.err
    assert "3.9 or newer" in result.err
    assert json.loads(cli.ok("list", "--json").out) == []
    assert cli.tmux("has-session", "-t", "=mngr-nopy").returncode != 0


def test_an_open_ssh_session_counts_as_ssh_activity(cli):
    """The watcher reads SSH sessions from the process table: an sshd serving a pts.
    (A process named as sshd names a session; the real sshd arrives with the SSH provider.)"""
    cli.ok("create", "remote", "--agent-cmd", "sleep 600", "--idle-mode", "ssh",
           "--idle-timeout", "3s")
    session = subprocess.Popen(["bash", "-c", "exec -a 'sshd: dev@pts/7' sleep 30"])
    try:
        time.sleep(3 + INTERVAL + 2)
        assert state(cli, "remote") == "running"  # the session keeps it alive
        assert (cli.host_dir / "activity" / "ssh").exists()
    finally:
        session.kill()
        session.wait()
    assert wait_for(lambda: state(cli, "remote") == "stopped", timeout=3 + INTERVAL + 4)
