"""mngr enforce and mngr limit against the real local provider (tmux), and a
synthetic provider found through its entry point for what the local host
cannot show (dry-run purity, an unreachable provider)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, wait_for

SYNTHETIC = str(REPO / "tests" / "synthetic")
# prints every 0.3 s until the flag file exists, then falls silent
CHATTY = 'while [ ! -e quiet ]; do echo tick; sleep 0.3; done; sleep 600'


def agents(cli) -> dict:
    return {a["name"]: a for a in json.loads(cli.ok("list", "--json").out)}


def audit(cli) -> list:
    path = cli.home / ".mngr" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def enforce(cli, *args, **kwargs):
    return cli("enforce", "--json", *args, **kwargs)


def synthetic_settings(cli, **conf) -> dict:
    config = cli.home / ".config" / "mngr"
    config.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in conf.items())
    (config / "settings.toml").write_text(f'[providers.syn]\nbackend = "synthetic"\n{body}')
    return {"PYTHONPATH": SYNTHETIC}


def test_idle_agent_is_stopped_after_it_falls_silent_and_not_before(mngr_cli):
    mngr_cli.ok("create", "chatty", "--agent-cmd", CHATTY, "--idle-mode", "agent",
                "--idle-timeout", "2s")
    end = time.monotonic() + 3
    while time.monotonic() < end:  # printing: never idle
        rows = json.loads(enforce(mngr_cli).out)
        assert [r["action"] for r in rows] == ["none"], rows
        time.sleep(0.4)
    assert agents(mngr_cli)["chatty"]["state"] == "running"
    (mngr_cli.work / "quiet").touch()
    silent_at = time.time()
    stopped = wait_for(lambda: json.loads(enforce(mngr_cli).out)[0]["action"] == "stop", timeout=15)
    assert stopped and time.time() - silent_at >= 1.5
    assert agents(mngr_cli)["chatty"]["state"] == "stopped"
    done = [e for e in audit(mngr_cli) if e["result"] == "done"]
    assert len(done) == 1 and done[0]["cause"] == "idle" and done[0]["action"] == "stop"
    # re-observed after acting: nothing more to do
    assert json.loads(enforce(mngr_cli).out)[0]["action"] == "none"


def test_dry_run_changes_nothing(mngr_cli):
    mngr_cli.ok("create", "idle", "--agent-cmd", "sleep 600", "--idle-mode", "create",
                "--idle-timeout", "1s")
    time.sleep(1.2)
    rows = json.loads(enforce(mngr_cli, "--dry-run").out)
    assert rows[0]["action"] == "stop" and rows[0]["result"] == "dry-run"
    assert agents(mngr_cli)["idle"]["state"] == "running"
    assert [e["result"] for e in audit(mngr_cli)] == ["dry-run"]
    check = enforce(mngr_cli, "--no-check-idle")
    assert json.loads(check.out)[0]["action"] == "none"
    assert agents(mngr_cli)["idle"]["state"] == "running"


def test_dry_run_never_calls_a_mutating_provider_method(mngr_cli, tmp_path):
    calls = tmp_path / "calls.jsonl"
    env = synthetic_settings(mngr_cli, hosts=20, calls=str(calls))
    rows = json.loads(enforce(mngr_cli, "--dry-run", "--provider", "syn", env=env).out)
    assert sum(r["action"] == "stop" for r in rows) == 10
    assert not calls.exists()
    rows = json.loads(enforce(mngr_cli, "--provider", "syn", env=env).out)
    assert len(calls.read_text().splitlines()) == 10  # the same decisions, acted on this time


def test_two_enforcers_started_together_stop_once(mngr_cli):
    mngr_cli.ok("create", "twice", "--agent-cmd", "sleep 600", "--idle-mode", "create",
                "--idle-timeout", "1s")
    time.sleep(1.2)
    procs = [subprocess.Popen([sys.executable, str(REPO / "mngr.py"), "enforce"],
                              cwd=mngr_cli.work, env=mngr_cli.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=30) + (p.returncode,) for p in procs]
    assert [code for _, _, code in results] == [0, 0]
    assert [e["result"] for e in audit(mngr_cli) if e["action"] == "stop"] == ["acting", "done"]   # once, recorded before and after
    assert agents(mngr_cli)["twice"]["state"] == "stopped"


def test_hand_edited_host_record_is_tampering_and_stops_agents(mngr_cli):
    mngr_cli.ok("create", "victim", "--agent-cmd", "sleep 600")  # local: idle checks disabled
    data = mngr_cli.host_dir / "data.json"
    doc = json.loads(data.read_text())
    doc["payload"]["policy"]["idle_timeout"] = 10 ** 9
    data.write_text(json.dumps(doc))
    rows = json.loads(enforce(mngr_cli).out)
    assert rows[0]["action"] == "stop" and "tampered: host record: bad signature" in rows[0]["reason"]
    assert mngr_cli.tmux("has-session", "-t", "=mngr-victim").returncode != 0


def test_replayed_older_record_is_tampering_but_a_lost_cache_is_not(mngr_cli):
    mngr_cli.ok("create", "replay", "--agent-cmd", "sleep 600")
    data = mngr_cli.host_dir / "data.json"
    old = data.read_text()
    mngr_cli.ok("limit", "replay", "--idle-timeout", "2h")  # re-signed with version + 1
    (mngr_cli.host_dir / "versions.json").unlink()  # a lost cache: first sight is trusted
    assert json.loads(enforce(mngr_cli).out)[0]["action"] == "none"
    data.write_text(old)  # put the older, validly signed file back
    rows = json.loads(enforce(mngr_cli).out)
    assert rows[0]["action"] == "stop" and "older version than seen" in rows[0]["reason"]


def test_unreachable_provider_exits_75_and_others_are_still_checked(mngr_cli):
    mngr_cli.ok("create", "alive", "--agent-cmd", "sleep 600")
    env = synthetic_settings(mngr_cli, fail=True)
    result = enforce(mngr_cli, env=env)
    assert result.code == 75
    rows = json.loads(result.out)
    assert {r["provider"]: r["result"] for r in rows} == {"local": "ok", "syn": "error"}
    assert any(e["provider"] == "syn" and "down" in e["error"] for e in audit(mngr_cli))


def test_limit_sets_the_policy_and_rejects_bad_values(mngr_cli):
    mngr_cli.ok("create", "lim", "--agent-cmd", "sleep 600")
    rows = json.loads(mngr_cli.ok("limit", "lim", "--idle-mode", "user", "--idle-timeout", "5m",
                                  "--max-lifetime", "2d", "--json").out)
    policy = rows[0]["policy"]
    assert policy["idle_mode"] == "user" and policy["idle_timeout"] == 300
    assert policy["max_lifetime"] == 2 * 86400
    rows = json.loads(mngr_cli.ok("lim", "--host", "local", "--add-activity-source", "process",
                                  "--json").out)
    assert rows[0]["policy"]["idle_mode"] == "custom"
    rows = json.loads(mngr_cli.ok("lim", "lim", "--remove-activity-source", "process",
                                  "--max-lifetime", "none", "--dry-run", "--json").out)
    assert rows[0]["policy"]["idle_mode"] == "user" and rows[0]["policy"]["max_lifetime"] is None
    assert agents(mngr_cli)["lim"]["idle_mode"] == "custom"  # the dry run changed nothing
    mngr_cli.ok("lim", "lim", "--start-on-boot")
    assert agents(mngr_cli)["lim"]["start_on_boot"] is True
    for args, text in ((("--idle-timeout", "5 minutes"), "bad duration '5 minutes'"),
                       (("--idle-mode", "sometimes"), "invalid choice: 'sometimes'"),
                       (("--add-activity-source", "vibes"), "unknown activity source vibes")):
        result = mngr_cli("limit", "lim", *args)
        assert result.code == 2 and text in result.err and result.err.count("\n") == 1


def test_list_shows_the_decision(mngr_cli):
    mngr_cli.ok("create", "shown", "--agent-cmd", "sleep 600", "--idle-mode", "run",
                "--idle-timeout", "1h")
    row = agents(mngr_cli)["shown"]
    assert row["host_state"] == "running" and row["idle_mode"] == "run"
    assert row["decision"]["action"] == "none" and row["idle_seconds"] == 0
    assert row["deadline"] is not None  # process alive: the deadline moves with now
    assert "STOPS IN" in mngr_cli.ok("list").out


def test_second_enforce_waits_for_nobody(mngr_cli):
    lock = Path(mngr_cli.home / ".mngr" / "enforce.lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = mngr_cli("enforce")
        assert result.code == 0 and "another mngr enforce is running" in result.err
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()


def test_a_host_that_vanishes_before_acting_is_left_alone(mngr_cli, tmp_path):
    calls = tmp_path / "calls.jsonl"
    env = synthetic_settings(mngr_cli, hosts=4, calls=str(calls), vanish=True)
    result = enforce(mngr_cli, "--provider", "syn", env=env)
    assert result.code == 0
    assert sorted(r["result"] for r in json.loads(result.out)) == ["ok", "ok", "vanished", "vanished"]
    assert not calls.exists()


def test_watch_keeps_enforcing(mngr_cli):
    mngr_cli.ok("create", "first", "--agent-cmd", "sleep 600", "--idle-mode", "create",
                "--idle-timeout", "1s")
    watcher = subprocess.Popen([sys.executable, str(REPO / "mngr.py"), "enforce", "--watch", "1"],
                               cwd=mngr_cli.work, env=mngr_cli.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: agents(mngr_cli)["first"]["state"] == "stopped", timeout=15)
        mngr_cli.ok("start", "first")  # started again: stopped again on a later round
        assert wait_for(lambda: agents(mngr_cli)["first"]["state"] == "stopped", timeout=15)
        assert len([e for e in audit(mngr_cli) if e["result"] == "done"]) == 2
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
