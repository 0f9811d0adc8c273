"""Hostile hosts: untrusted containers that attack the rules meant to stop them.

Each attack runs inside a real container; `mngr enforce` must stop that host and
say why, and leave a healthy neighbour alone (no false positives).
"""
from __future__ import annotations

import json
import time

import pytest

from test_docker import container, docker, dk, engine, status  # noqa: F401  (fixtures)

VICTIM_POLICY = ["--idle-mode", "create", "--idle-timeout", "4s"]


def create(cli, name, *extra, cmd="sleep 600"):
    cli.ok("create", name, "--in", cli.provider, "--agent-cmd", cmd, "--no-connect", *extra)
    return container(cli, name)


def sh(cid, script, input=None):
    return docker("exec", "-i", cid, "sh", "-c", script, input=input, check=False)


def enforce(cli):
    result = cli("enforce", "--json", "--provider", cli.provider, timeout=120)
    assert "Traceback" not in result.err, result.err
    return {r["host"]: r for r in json.loads(result.out)}, result.code


ATTACKS = {
    # name: (extra create flags, script run inside, the reason enforce must give)
    "deletes data.json": ([], "rm /mngr/data.json", "host record: missing"),
    "truncates data.json": ([], ": > /mngr/data.json", "host record: malformed"),
    "rewrites its state": ([], "sed -i 's/\"state\": \"running\"/\"state\": \"stopped\"/' /mngr/data.json",
                           "host record: bad signature"),
    "rewrites its policy": ([], "sed -i 's/\"idle_timeout\": 3600/\"idle_timeout\": 99999999/' "
                                "/mngr/data.json", "host record: bad signature"),
    "rewrites an agent's command": ([], "sed -i 's/sleep 600/sleep 601/' /mngr/agents/*/data.json",
                                    "bad signature"),
    "fakes activity in the future": (VICTIM_POLICY,
                                     "touch -d '+1 year' /mngr/activity/agent /mngr/activity/user "
                                     "/mngr/activity/ssh", "idle for"),
    "fills its host dir with junk": (VICTIM_POLICY,
                                     "mkdir -p /mngr/activity/junk /mngr/agents/junk && cd /mngr && "
                                     "for i in $(seq 1 2000); do echo x > junk$i; done", "idle for"),
    "holds a deploy lock forever": (VICTIM_POLICY,
                                    "touch -d '+1 year' /mngr/deploy_lock/forever", "idle for"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_attacked_record_or_policy_still_gets_the_host_stopped(dk, attack):
    extra, script, reason = ATTACKS[attack]
    neighbour = create(dk, "neighbour", "--idle-timeout", "1h")
    victim = create(dk, "victim", "--idle-timeout", "1h", *extra)
    assert sh(victim, script).returncode == 0
    if extra:
        time.sleep(4.5)
    rows, code = enforce(dk)
    assert code == 0
    if rows["victim"]["action"] == "none":  # its own watcher was quicker: stopped all the same
        assert rows["victim"]["reason"] == "host is stopped" and extra, rows["victim"]
    else:
        assert rows["victim"]["action"] == "stop" and reason in rows["victim"]["reason"], rows["victim"]
    assert status(victim) == "exited"
    assert rows["neighbour"]["action"] == "none" and status(neighbour) == "running"


def test_a_signed_record_from_another_host_or_an_older_one_is_tampering(dk):
    first = create(dk, "first", "--idle-timeout", "1h")
    second = create(dk, "second", "--idle-timeout", "1h")
    old = sh(first, "cat /mngr/data.json").stdout
    dk.ok("limit", "first", "--idle-timeout", "2h")  # signed again, version + 1
    sh(first, "cat > /mngr/data.json", input=old)
    foreign = sh(second, "cat /mngr/data.json").stdout
    neighbour = create(dk, "neighbour", "--idle-timeout", "1h")
    third = create(dk, "third", "--idle-timeout", "1h")
    sh(third, "cat > /mngr/data.json", input=foreign)
    rows, _ = enforce(dk)
    assert "older version than seen" in rows["first"]["reason"] and status(first) == "exited"
    assert "wrong record" in rows["third"]["reason"] and status(third) == "exited"
    assert rows["neighbour"]["action"] == "none" and status(neighbour) == "running"
    assert rows["second"]["action"] == "none" and status(second) == "running"


def test_a_host_flooding_its_output_is_still_stopped_and_listed(dk):
    flood = create(dk, "flood", "--max-lifetime", "6s", cmd="yes mngr-flood-line-of-some-length")
    time.sleep(3)
    listed = dk("list", "--json", timeout=60)
    assert listed.code == 0 and json.loads(listed.out)[0]["state"] == "running"
    assert len(dk.ok("logs", "flood", "-n", "5").out.splitlines()) <= 6
    time.sleep(3.5)
    rows, _ = enforce(dk)
    stopped_by_enforce = rows["flood"]["action"] == "stop" and rows["flood"]["cause"] == "lifetime"
    stopped_by_its_watcher = rows["flood"]["reason"] == "host is stopped"
    assert stopped_by_enforce or stopped_by_its_watcher, rows["flood"]
    assert status(flood) == "exited"


def test_ten_enforcers_at_once_act_on_each_host_once(dk):
    import subprocess
    import sys

    from conftest import REPO

    victims = [create(dk, f"v{i}", "--idle-timeout", "1h") for i in range(3)]
    for cid in victims:  # tampered: only enforce, outside, can tell (the watcher has no key)
        sh(cid, "sed -i 's/\"idle_timeout\": 3600/\"idle_timeout\": 7200/' /mngr/data.json")
    procs = [subprocess.Popen([sys.executable, str(REPO / "mngr.py"), "enforce", "--provider",
                               dk.provider], cwd=dk.work, env=dk.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(10)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 10
    audit = [json.loads(line) for line in (dk.home / ".mngr" / "audit.jsonl").read_text().splitlines()]
    done = sorted(e["host"] for e in audit if e["result"] == "done")
    assert done == ["v0", "v1", "v2"]  # each host acted on exactly once
    assert all(status(cid) == "exited" for cid in victims)


def test_rewriting_each_signed_field_in_turn_is_tampering(dk):
    """Every field of the host's signed record, changed inside the host, one at a time:
    each is caught (dry run, then the good copy put back), and the neighbour never is."""
    victim = create(dk, "victim", "--idle-timeout", "1h")
    neighbour = create(dk, "neighbour", "--idle-timeout", "1h")
    good = sh(victim, "cat /mngr/data.json").stdout
    payload = json.loads(good)["payload"]

    def changed(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 1
        if isinstance(value, str):
            return value + "x"
        if isinstance(value, list):
            return value + ["net:egress"]
        if isinstance(value, dict):
            return {**value, "idle_timeout": 10 ** 9}
        return "x"
    caught = []
    for field in sorted(payload):
        document = json.loads(good)
        document["payload"][field] = changed(payload[field])
        assert sh(victim, "cat > /mngr/data.json", input=json.dumps(document)).returncode == 0
        result = dk("enforce", "--dry-run", "--json", "--provider", dk.provider, timeout=120)
        rows = {r["host"]: r for r in json.loads(result.out)}
        assert rows["victim"]["action"] == "stop" and rows["victim"]["cause"] == "tampered", (field, rows)
        assert rows["neighbour"]["action"] == "none", (field, rows["neighbour"])
        caught.append(field)
    assert sh(victim, "cat > /mngr/data.json", input=good).returncode == 0
    rows = {r["host"]: r for r in json.loads(dk.ok("enforce", "--json", "--provider", dk.provider).out)}
    assert rows["victim"]["action"] == "none" and status(victim) == "running"
    assert status(neighbour) == "running"
    assert len(caught) >= 10 and {"state", "policy", "created_at", "permissions", "agents"} <= set(caught)
