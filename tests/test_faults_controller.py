"""Faults around the controller: an unwritable audit log or mngr dir, a clock that
jumps, mngr killed (SIGKILL) at each step of create and in the middle of a stop,
a full disk under a host's records, and gc of what is left.

Kills happen where a real crash would: at a plugin hook of the test recorder
plugin (MNGR_RECORDER_KILL), which marks each step of the lifecycle.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need, wait_for
from test_docker import dk, docker, engine  # noqa: F401  (fixtures)


def recorder_installed(cli) -> bool:
    probe = cli("plugin", "list", "--json")
    return probe.code == 0 and any(p["name"] == "recorder" for p in json.loads(probe.out))


def agents(cli) -> dict:
    return {row["name"]: row for row in json.loads(cli.ok("list", "--json").out)}


# The audit log and the mngr dir -------------------------------------------------


def test_enforce_does_not_act_when_it_cannot_write_its_audit_log(mngr_cli):
    mngr_cli.ok("create", "busy", "--in-place", "--agent-cmd", "sleep 600", "--no-connect",
                "--max-lifetime", "1s")
    audit = mngr_cli.home / ".mngr" / "audit.jsonl"
    audit.mkdir()   # nothing can be appended to it now, not even by root
    time.sleep(1.2)
    result = mngr_cli("enforce")
    assert result.code == 1
    assert f"cannot write the audit log {audit}" in result.err and "Traceback" not in result.err
    assert agents(mngr_cli)["busy"]["state"] == "running"     # nothing done without a record
    audit.rmdir()
    mngr_cli.ok("enforce")
    assert agents(mngr_cli)["busy"]["state"] == "stopped"
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["result"] for r in rows if r["host"] == "local"] == ["acting", "done"]


def test_a_read_only_mngr_dir_is_a_clear_error_and_nothing_is_done(mngr_cli):
    mngr_cli.ok("create", "busy", "--in-place", "--agent-cmd", "sleep 600", "--no-connect",
                "--max-lifetime", "1s")
    user_dir = mngr_cli.home / ".mngr"
    mounted = subprocess.run(["mount", "--bind", str(user_dir), str(user_dir)], capture_output=True)
    need(mounted.returncode == 0, "bind mounts (root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(user_dir)], check=True)
        time.sleep(1.2)
        result = mngr_cli("enforce")
        assert result.code == 1 and "Read-only file system" in result.err, result.err
        assert "Traceback" not in result.err
        assert mngr_cli.tmux("has-session", "-t", "=mngr-busy").returncode == 0
    finally:
        subprocess.run(["umount", str(user_dir)], check=True)
    assert agents(mngr_cli)["busy"]["state"] == "running"


# A clock that jumps ------------------------------------------------------------------


def test_a_clock_jump_back_stops_nothing_and_forward_applies_the_policy(mngr_cli):
    mngr_cli.ok("create", "w", "--in-place", "--agent-cmd", "sleep 600", "--no-connect",
                "--idle-mode", "create", "--idle-timeout", "1h")
    for at in ("-30d", "-1h", "0", "+59m"):
        result = mngr_cli("enforce", "--dry-run", "--json", f"--at={at}")
        assert result.code == 0, result.err
        (row,) = json.loads(result.out)
        assert row["action"] == "none", (at, row)
        assert row.get("idle_seconds") is None or row["idle_seconds"] >= 0
    ahead = json.loads(mngr_cli.ok("enforce", "--dry-run", "--json", "--at", "+2h").out)[0]
    assert ahead["action"] == "stop" and ahead["result"] == "dry-run"
    assert agents(mngr_cli)["w"]["state"] == "running"
    mngr_cli.ok("enforce", "--at", "+2h")             # the clock really jumped: the policy holds
    assert agents(mngr_cli)["w"]["state"] == "stopped"
    bad = mngr_cli("enforce", "--at", "yesterday")
    assert bad.code == 2 and "bad time 'yesterday'" in bad.err


# mngr killed in the middle ----------------------------------------------------------

CREATE_STEPS = ("on_before_host_create", "on_host_state_change:starting", "on_before_agent_create",
                "on_after_host_create", "on_host_state_change:running", "on_after_agent_create")
COMPLETE = ("on_host_state_change:running", "on_after_agent_create")   # the records say running


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_create_killed_at_each_step_leaves_nothing_running_unlisted(dk, step):
    need(recorder_installed(dk), "the test plugin mngr-test-recorder (make test installs it)")
    env = {"MNGR_RECORDER_LOG": str(dk.home / "hooks.jsonl"), "MNGR_RECORDER_KILL": step}
    label = f"label=com.imbue.mngr.provider={dk.provider}"
    result = dk("create", "crash", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
                "--starting-timeout", "1s", env=env)
    assert result.code == -9, (step, result.code, result.err)
    listed = {row["host_id"] for row in json.loads(dk.ok("list", "--json").out)}
    running = docker("ps", "-q", "--filter", label).stdout.split()
    for container in running:   # nothing runs that list does not show
        host_id = docker("inspect", "-f", '{{index .Config.Labels "com.imbue.mngr.host-id"}}',
                         container).stdout.strip()
        assert host_id in listed, (step, host_id, listed)
    if step in COMPLETE:
        assert [row["state"] for row in json.loads(dk.ok("list", "--json").out)] == ["running"]
        return
    time.sleep(1.2)     # past its starting timeout
    dk("enforce")       # stuck starting: marked failed, its container stopped
    assert docker("ps", "-q", "--filter", label).stdout == ""
    assert all(row["host_state"] == "failed" for row in json.loads(dk.ok("list", "--json").out))
    dk.ok("gc", "--older-than", "0s")   # and what is left goes
    assert json.loads(dk.ok("list", "--json").out) == []
    assert not list((dk.home / ".mngr" / "hosts").glob("*/data.json"))
    assert docker("ps", "-aq", "--filter", label).stdout == ""


def test_a_stop_killed_midway_is_finished_by_the_next_stop_or_enforce(dk):
    need(recorder_installed(dk), "the test plugin mngr-test-recorder (make test installs it)")
    env = {"MNGR_RECORDER_LOG": str(dk.home / "hooks.jsonl"),
           "MNGR_RECORDER_KILL": "on_host_state_change:stopping"}
    for name in ("again", "forced"):
        dk.ok("create", name, "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
              "--stopping-timeout", "2s")
        assert dk("stop", name, env=env).code == -9
        row = agents(dk)[name]
        assert row["host_state"] == "stopping"
        assert docker("inspect", "-f", "{{.State.Running}}", f"mngr-{name}").stdout.strip() == "true"
    dk.ok("stop", "again")
    assert agents(dk)["again"]["host_state"] == "stopped"
    time.sleep(2.2)
    result = json.loads(dk.ok("enforce", "--json").out)
    forced = [r for r in result if r["host"] == "forced"][0]
    assert forced["action"] == "force_stop" and forced["result"] == "done"
    assert docker("inspect", "-f", "{{.State.Running}}", "mngr-forced").stdout.strip() == "false"
    assert agents(dk)["forced"]["host_state"] == "stopped"


# A full disk under a host's records --------------------------------------------------


def test_a_full_disk_during_a_state_write_keeps_the_old_record(dk):
    dk.ok("create", "full", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    host_id = agents(dk)["full"]["host_id"]
    records = dk.home / ".mngr" / "hosts" / host_id
    saved = dk.home / "saved-records"
    subprocess.run(["cp", "-a", str(records), str(saved)], check=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(records)],
                             capture_output=True)
    need(mounted.returncode == 0, "mounting a tmpfs (root)")
    try:
        subprocess.run(f"cp -a {saved}/. {records}/", shell=True, check=True)
        before = (records / "data.json").read_bytes()
        filler = records / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1k", "count=1000"], capture_output=True)
        result = dk("limit", "full", "--idle-timeout", "5m")
        assert result.code == 1 and "No space left on device" in result.err, result.err
        assert "Traceback" not in result.err
        assert (records / "data.json").read_bytes() == before      # the old file, whole
        row = agents(dk)["full"]
        assert row["verified"] is True and row["host_state"] == "running"
        filler.unlink()
        dk.ok("limit", "full", "--idle-timeout", "5m")
        assert agents(dk)["full"]["verified"] is True
        saved_now = dk.home / "saved-now"
        subprocess.run(["cp", "-a", str(records), str(saved_now)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(records)], capture_output=True)
    subprocess.run(f"cp -a {saved_now}/. {records}/", shell=True, check=True)
    assert agents(dk)["full"]["verified"] is True


# gc -------------------------------------------------------------------------------------


def test_gc_removes_old_failed_hosts_orphaned_worktrees_and_snapshots_of_gone_hosts(dk):
    cli = dk
    # a failed docker host
    settings = cli.home / ".config" / "mngr" / "settings.toml"
    result = cli("create", "broken", "--in", dk.provider, "--image", "no-such-image:here",
                 "--agent-cmd", "sleep 1", "--no-connect")
    assert result.code == 1
    # a snapshot whose host is then destroyed
    cli.ok("create", "snapped", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    snap = json.loads(cli.ok("snapshot", "create", "snapped", "--json").out)
    snap = snap[0] if isinstance(snap, list) else snap
    cli.ok("destroy", "-f", "snapped")
    # a worktree left behind on the local host (destroyed without removing its work)
    repo = cli.work / "repo"
    repo.mkdir()
    for argv in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=cli.env)
    cli.ok("create", "wt", "--worktree", "--agent-cmd", "sleep 600", "--no-connect", cwd=repo)
    worktree = agents(cli)["wt"]["work_dir"]
    cli.ok("destroy", "-f", "wt")
    assert os.path.isdir(worktree)

    young = json.loads(cli.ok("gc", "--json").out)   # all younger than the default 7 days
    assert young == []
    dry = json.loads(cli.ok("gc", "--older-than", "0s", "--dry-run", "--json").out)
    kinds = sorted((r["kind"], r["result"]) for r in dry)
    assert kinds == [("host", "would remove"), ("snapshot", "would remove"), ("worktree", "would remove")]
    assert os.path.isdir(worktree) and "broken" in agents(cli)
    done = json.loads(cli.ok("gc", "--older-than", "0s", "--json").out)
    assert sorted(r["result"] for r in done) == ["removed"] * 3
    assert "broken" not in agents(cli) and not os.path.isdir(worktree)
    assert subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "mngr/wt"],
                          capture_output=True).returncode == 0     # its branch (its commits) stays
    assert json.loads(cli.ok("snapshot", "list", "--json").out) == []
    assert json.loads(cli.ok("gc", "--older-than", "0s", "--json").out) == []
    assert settings.exists()


# A Docker engine that stops in the middle of an enforce run ---------------------------


@pytest.fixture
def second_engine(engine, tmp_path):
    """A dockerd of the test's own (its data, exec root, socket and pid file), with the
    test image loaded from the first; stopped by pid at the end."""
    import shutil
    import tempfile

    from test_docker import IMAGE

    need(shutil.which("dockerd") is not None, "dockerd")
    root = Path(tempfile.mkdtemp(prefix="mngr-de-", dir="/tmp"))
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "wb")
    proc = subprocess.Popen(["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                             "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{sock}",
                             "--iptables=false", "--ip-masq=false", "--bridge=none",
                             "--exec-opt", "native.cgroupdriver=cgroupfs"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "info"], env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (root / "dockerd.log").read_text()[-800:]
            time.sleep(0.2)
        saved = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
        subprocess.run(["docker", "load", "-q"], stdin=saved.stdout, env=env, check=True, capture_output=True)
        saved.wait()
        yield {"host": f"unix://{sock}", "pid": proc.pid, "env": env}
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        ids = subprocess.run(["docker", "ps", "-aq"], env=env, capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], env=env, capture_output=True)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)], capture_output=True)


def test_an_engine_stopped_mid_run_is_exit_75_and_nothing_is_marked_stopped(dk, second_engine):
    need(recorder_installed(dk), "the test plugin mngr-test-recorder (make test installs it)")
    from test_docker import IMAGE

    settings = dk.home / ".config" / "mngr" / "settings.toml"
    settings.write_text(settings.read_text() + f'[providers.far]\nbackend = "docker"\nimage = "{IMAGE}"\n'
                        f'docker_host = "{second_engine["host"]}"\ntimeout = 3\n')
    # their watchers are killed (as hostile code would): enforce outside is what acts
    quiet = "pkill -f '[/]mngr/bin watch'; sleep 600"
    dk.ok("create", "near", "--in", dk.provider, "--agent-cmd", quiet, "--no-connect",
          "--max-lifetime", "2s")
    dk.ok("create", "away", "--in", "far", "--agent-cmd", quiet, "--no-connect", "--max-lifetime", "2s")
    time.sleep(2.5)
    # listed, decided, then its engine stops before mngr acts on it
    env = {"MNGR_RECORDER_LOG": str(dk.home / "hooks.jsonl"),
           "MNGR_RECORDER_RUN": f"on_host_collected:far:kill -STOP {second_engine['pid']}"}
    started = time.monotonic()
    result = dk("enforce", "--json", env=env, timeout=120)
    took = time.monotonic() - started
    try:
        assert result.code == 75, result.err
        assert took < 30, took
        rows = {r["host"]: r for r in json.loads(result.out)}
        assert rows["away"]["result"] == "error" and rows["away"]["unreachable"] is True
        assert "did not answer" in rows["away"]["error"]
        assert rows["near"]["action"] == "stop" and rows["near"]["result"] == "done"   # still handled
        # what mngr signed while it could not know the outcome: never "stopped"
        records = [json.loads(p.read_text())["payload"]
                   for p in (dk.home / ".mngr" / "hosts").glob("*/data.json")]
        away = [r for r in records if r["provider"] == "far"]
        assert len(away) == 1 and away[0]["state"] in ("running", "stopping"), away
    finally:
        os.kill(second_engine["pid"], signal.SIGCONT)
    # the engine carries out the stop it had queued, or the next run does: either way the
    # host ends stopped, and list tells the truth from the engine
    again = {r["host"]: r for r in json.loads(dk.ok("enforce", "--json").out)}
    assert again["away"]["result"] in ("done", "ok"), again
    assert wait_for(lambda: agents(dk)["away"]["host_state"] == "stopped", 30)
