"""Permissions: the grammar, validation before anything is made, the union law, grants."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mngr
from conftest import Mngr, need

FAMILIES = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
DETAILS = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20)


@given(FAMILIES, DETAILS)
@example("fs", "mount:/data:ro")
def test_parse_and_format_round_trip(family, detail):
    """family:detail parses back to the same family and detail."""
    assert mngr.parse_permission(mngr.format_permission(family, detail)) == (family, detail)


@given(st.text(max_size=30))
@example("")
@example("env")
@example("Env:X")
@example(":x")
@example("env:")
@example("env:a b")
@example("9x:y")
def test_malformed_permissions_are_usage_errors(text):
    """Anything that is not lowercase-family:detail-without-spaces is refused, naming it."""
    valid = mngr.re.fullmatch(r"[a-z][a-z0-9]*:\S+", text, mngr.re.ASCII)
    if valid:
        assert mngr.parse_permission(text)[0] == text.split(":")[0]
    else:
        with pytest.raises(mngr.UsageError) as caught:
            mngr.parse_permission(text)
        assert repr(text) in caught.value.message


def agents(cli):
    return {a["name"]: a for a in json.loads(cli.ok("list", "--json").out)}


@pytest.mark.parametrize("grant, text", [
    ("bogus:thing", "unknown permission family in 'bogus:thing'"),
    ("env-x", "bad permission 'env-x'"),
    ("env:not-a-name", "env:NAME takes a variable name"),
    ("net:sideways", "bad permission 'net:sideways'"),
    ("fs:mount:relative", "bad permission 'fs:mount:relative'"),
])
def test_bad_grants_are_refused_before_anything_is_made(mngr_cli, grant, text):
    result = mngr_cli("create", "x", "--agent-cmd", "sleep 600", "--grant", grant)
    assert result.code in (1, 2) and text in result.err and result.err.count("\n") == 1
    if "unknown" in text:
        assert "known families: env, fs, net" in result.err
    assert not (mngr_cli.host_dir / "data.json").exists()


def test_widening_needs_allow_widen_and_revoke_must_match(mngr_cli):
    mngr_cli.ok("create", "a", "--agent-cmd", "sleep 600", "--grant", "env:A")
    refused = mngr_cli("create", "b", "--agent-cmd", "sleep 600", "--grant", "net:egress")
    assert refused.code == 1 and "widen host local's permissions by net:egress" in refused.err
    assert "--allow-widen" in refused.err and set(agents(mngr_cli)) == {"a"}
    mngr_cli.ok("create", "b", "--agent-cmd", "sleep 600", "--grant", "net:egress", "--allow-widen")
    assert agents(mngr_cli)["a"]["host_permissions"] == ["env:A", "net:egress"]
    refused = mngr_cli("limit", "a", "--grant", "env:B")
    assert refused.code == 1 and "by env:B" in refused.err
    wrong = mngr_cli("limit", "a", "--revoke", "env:*")
    assert wrong.code == 2 and "never granted env:*" in wrong.err
    assert agents(mngr_cli)["a"]["permissions"] == ["env:A"]


def test_limit_grant_restarts_the_agent_and_revoke_narrows_the_host(mngr_cli):
    mngr_cli.ok("create", "g", "--agent-cmd", "sleep 600")
    pid = lambda: json.loads((mngr_cli.host_dir / "agents" / agents(mngr_cli)["g"]["id"]
                              / "status").read_text())["pane_pid"]
    before = pid()
    mngr_cli.ok("limit", "g", "--grant", "env:TOKEN")
    row = agents(mngr_cli)["g"]
    assert row["permissions"] == ["env:TOKEN"] and row["host_permissions"] == ["env:TOKEN"]
    assert row["state"] == "running" and pid() != before  # restarted for the change to take
    deferred = mngr_cli("limit", "g", "--revoke", "env:TOKEN", "--no-restart")
    assert deferred.code == 0 and "until its next start" in deferred.err
    assert agents(mngr_cli)["g"]["host_permissions"] == []


def test_enforce_treats_a_host_set_that_is_not_the_union_as_tampered(mngr_cli):
    mngr_cli.ok("create", "u", "--agent-cmd", "sleep 600", "--grant", "env:A")
    keys = json.loads((mngr_cli.home / ".config" / "mngr" / "keys.json").read_text())["keys"]
    keyring = mngr.Keyring(tuple(mngr.SigningKey(k["id"], bytes.fromhex(k["secret"]), 0.0)
                                 for k in keys))
    data = mngr_cli.host_dir / "data.json"
    payload = json.loads(data.read_text())["payload"]
    payload.update(permissions=["env:A", "net:egress"], version=payload["version"] + 1)
    data.write_text(json.dumps(mngr.sign_payload(keyring, payload)))  # validly signed, yet wrong
    row = json.loads(mngr_cli.ok("enforce", "--json").out)[0]
    assert row["action"] == "stop" and "not the union of its agents'" in row["reason"]


PERMISSIONS = ["env:A", "env:B", "net:egress", "fs:mount:/tmp"]


class UnionLaw(RuleBasedStateMachine):
    """Any sequence of create, grant, revoke and destroy through the real CLI keeps the
    host's signed set equal to the union of its agents' signed sets."""

    def __init__(self):
        super().__init__()
        need(shutil.which("tmux") is not None, "tmux")
        self.root = Path(tempfile.mkdtemp(prefix="mngr-union-"))
        tmux_dir = Path(tempfile.mkdtemp(prefix="mu", dir="/tmp"))
        (self.root / "home").mkdir()
        self.cli = Mngr(self.root / "home", tmux_dir, f"mngr-union-{tmux_dir.name}")
        self.tmux_dir = tmux_dir
        self.model = {}
        self.count = 0

    def teardown(self):
        self.cli.tmux("kill-server")
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.tmux_dir, ignore_errors=True)

    @precondition(lambda self: len(self.model) < 3)
    @rule(perms=st.sets(st.sampled_from(PERMISSIONS)))
    def create(self, perms):
        self.count += 1
        name = f"a{self.count}"
        grants = [arg for p in sorted(perms) for arg in ("--grant", p)]
        self.cli.ok("create", name, "--agent-cmd", "sleep 600", "--allow-widen", *grants)
        self.model[name] = set(perms)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), perm=st.sampled_from(PERMISSIONS))
    def grant(self, data, perm):
        name = data.draw(st.sampled_from(sorted(self.model)))
        self.cli.ok("limit", name, "--grant", perm, "--allow-widen", "--no-restart")
        self.model[name].add(perm)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def revoke(self, data):
        name = data.draw(st.sampled_from(sorted(n for n, p in self.model.items() if p)))
        perm = data.draw(st.sampled_from(sorted(self.model[name])))
        self.cli.ok("limit", name, "--revoke", perm, "--no-restart")
        self.model[name].discard(perm)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def destroy(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)))
        self.cli.ok("destroy", "-f", name)
        del self.model[name]

    @invariant()
    def host_set_is_the_union(self):
        rows = agents(self.cli)
        assert {n: set(r["permissions"]) for n, r in rows.items()} == self.model
        union = sorted(set().union(*self.model.values())) if self.model else []
        for row in rows.values():
            assert row["host_permissions"] == union
        if self.model:
            payload = json.loads((self.cli.host_dir / "data.json").read_text())["payload"]
            assert payload["permissions"] == union


TestUnionLaw = UnionLaw.TestCase
TestUnionLaw.settings = settings(max_examples=4, stateful_step_count=6, deadline=None)


def test_a_custom_agent_type_carries_permissions(mngr_cli):
    config = mngr_cli.home / ".config" / "mngr"
    config.mkdir(parents=True)
    (config / "settings.toml").write_text(
        '[agent_types.deployer]\ncommand = "sleep 600"\npermissions = ["env:DEPLOY_KEY"]\n')
    mngr_cli.ok("create", "d", "deployer", "--grant", "net:egress")
    assert agents(mngr_cli)["d"]["permissions"] == ["env:DEPLOY_KEY", "net:egress"]
    (config / "settings.toml").write_text(
        '[agent_types.bad]\ncommand = "sleep 600"\npermissions = ["nosuch:thing"]\n')
    refused = mngr_cli("create", "b", "bad")
    assert refused.code == 2 and "unknown permission family in 'nosuch:thing'" in refused.err
