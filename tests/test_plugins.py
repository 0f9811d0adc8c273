"""Plugins found through real entry points: the recorder distribution (pip-installed
into the test venv by make test) and a dist-info on PYTHONPATH for a duplicate."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, need


@pytest.fixture
def rec(mngr_cli, tmp_path):
    probe = mngr_cli("plugin", "list", "--json")
    need(probe.code == 0 and any(p["name"] == "recorder" for p in json.loads(probe.out)),
         "the test plugin mngr-test-recorder (make test pip-installs tests/plugins/recorder)")
    log = tmp_path / "hooks.jsonl"
    mngr_cli.env["MNGR_RECORDER_LOG"] = str(log)
    mngr_cli.log = log
    return mngr_cli


def calls(cli, clear=True):
    lines = cli.log.read_text().splitlines() if cli.log.exists() else []
    if clear and cli.log.exists():
        cli.log.unlink()
    return [json.loads(line) for line in lines]


def hooks(cli):
    return [c["hook"] for c in calls(cli)]


PROGRAM_START = ["on_startup", "on_load_config", "on_before_command"]
PROGRAM_END = ["on_after_command", "on_shutdown"]


def test_hooks_in_order_for_create_list_stop_start_destroy(rec):
    rec.ok("create", "first", "--agent-cmd", "sleep 600")
    assert hooks(rec) == PROGRAM_START + [
        "on_validate_permissions", "on_before_host_create", "on_host_state_change",
        "on_after_host_create", "on_before_agent_create", "on_after_agent_create"] + PROGRAM_END
    rec.ok("create", "second", "--agent-cmd", "sleep 600")
    assert hooks(rec) == PROGRAM_START + ["on_validate_permissions", "on_before_agent_create",
                                          "on_after_agent_create"] + PROGRAM_END
    rec.ok("list")
    assert hooks(rec) == PROGRAM_START + ["on_host_collected", "on_agent_collected",
                                          "on_agent_collected"] + PROGRAM_END
    rec.ok("stop", "first")
    assert hooks(rec) == PROGRAM_START + ["on_host_collected", "on_agent_collected",
                                          "on_agent_collected"] + PROGRAM_END
    rec.ok("start", "first")
    calls(rec)
    rec.ok("destroy", "-f", "first")
    recorded = calls(rec)
    assert [c["hook"] for c in recorded] == PROGRAM_START + [
        "on_host_collected", "on_agent_collected", "on_agent_collected",
        "on_before_agent_destroy", "on_after_agent_destroy"] + PROGRAM_END
    destroyed = recorded[-3]["args"][0]
    assert destroyed["name"] == "first" and destroyed["host"]["name"] == "local"
    assert recorded[-1]["args"][0] == {"command": "destroy", "exit_code": 0, "error": ""}


def test_enforce_calls_collection_and_state_change_hooks(rec):
    rec.ok("create", "idle", "--agent-cmd", "sleep 600", "--idle-mode", "create",
           "--idle-timeout", "1s")
    calls(rec)
    import time
    time.sleep(1.2)
    rec.ok("enforce")
    recorded = calls(rec)
    assert [c["hook"] for c in recorded] == PROGRAM_START + [
        "on_host_collected", "on_agent_collected", "on_host_state_change"] + PROGRAM_END
    change = recorded[-3]["args"][0]
    assert (change["old"], change["new"]) == ("running", "stopped")


def test_before_command_can_refuse(rec):
    result = rec("list", env={"MNGR_RECORDER_REFUSE": "list"})
    assert result.code == 1 and "the recorder plugin refuses list" in result.err
    assert hooks(rec)[-2:] == ["on_error", "on_shutdown"]


def test_field_hooks_give_columns_and_filters(rec):
    rec.ok("create", "fields", "--agent-cmd", "sleep 600")
    row = json.loads(rec.ok("list", "--json").out)[0]
    assert row["plugin.recorder.name_length"] == 6 and row["plugin.recorder.seen"] == "local"
    assert json.loads(rec.ok("list", "--include", "plugin.recorder.name_length=6", "--json").out)
    assert json.loads(rec.ok("list", "--include", "plugin.recorder.name_length=7", "--json").out) == []


def test_a_plugin_agent_type(rec):
    row = json.loads(rec.ok("create", "typed", "recorded", "--json").out)
    assert row["type"] == "recorded" and row["command"] == "sleep 600"
    assert rec.ok("exec", "typed", "--", "echo $RECORDED").out.strip() == "1"


def test_a_plugin_that_raises_is_named_and_can_be_disabled(rec):
    result = rec("create", "boom", "--agent-cmd", "sleep 600",
                 env={"MNGR_RECORDER_FAIL": "on_after_agent_create"})
    assert result.code == 1
    assert "plugin recorder failed in on_after_agent_create: RuntimeError: told to fail" in result.err
    assert "--disable-plugin recorder" in result.err and "Traceback" not in result.err
    verbose = rec("list", "-v", env={"MNGR_RECORDER_FAIL": "on_host_collected"})
    assert verbose.code == 1 and "Traceback" in verbose.err  # -v shows the detail
    row = json.loads(rec.ok("list", "--json").out)[0]
    assert row["name"] == "boom" and row["state"] == "running"  # created, and shown truthfully
    calls(rec)
    quiet = rec("list", "--disable-plugin", "recorder", env={"MNGR_RECORDER_FAIL": "on_startup"})
    assert quiet.code == 0 and not rec.log.exists()


def test_a_plugin_whose_import_fails(rec):
    broken = {"MNGR_BROKEN_PLUGIN": "1"}
    result = rec("list", env=broken)
    assert result.code == 1 and "plugin broken failed to load" in result.err
    assert "--disable-plugin broken" in result.err
    assert rec("list", "--disable-plugin", "broken", env=broken).code == 0
    assert rec("list", env={**broken, "MNGR_DISABLE_PLUGINS": "broken"}).code == 0
    listed = json.loads(rec.ok("plugin", "list", "--json", env=broken).out)
    assert {p["name"]: p["error"] for p in listed}["broken"].startswith("plugin broken failed to load")
    config = rec.home / ".config" / "mngr"
    config.mkdir(parents=True, exist_ok=True)
    (config / "settings.toml").write_text("[plugins.broken]\nenabled = false\n")
    assert rec("list", env=broken).code == 0
    assert rec("list", "--enable-plugin", "broken", env=broken).code == 1


def test_a_duplicate_plugin_name_names_both_packages(rec):
    result = rec("list", env={"PYTHONPATH": str(REPO / "tests" / "plugins" / "duplicate")})
    assert result.code == 1
    assert "two plugins are named 'recorder'" in result.err
    assert "mngr-test-recorder" in result.err and "mngr-dup" in result.err


def test_plugin_list_json(rec):
    listed = {p["name"]: p for p in json.loads(rec.ok("plugin", "list", "--json").out)}
    recorder = listed["recorder"]
    assert recorder["distribution"] == "mngr-test-recorder" and recorder["version"] == "0.1.0"
    assert recorder["enabled"] and recorder["agent_types"] == ["recorded"]
    assert recorder["permissions"] == ["rec"] and "on_host_state_change" in recorder["hooks"]
    assert listed["claude"]["agent_types"] == ["claude"] and listed["local"]["kind"] == "provider"
    off = {p["name"]: p for p in json.loads(rec.ok("plugin", "list", "--json",
                                                   "--disable-plugin", "codex").out)}
    assert off["codex"]["enabled"] is False


def test_disabling_a_provider_is_a_clear_error_when_its_host_is_touched(rec):
    result = rec("create", "x", "--in", "docker", "--agent-cmd", "sleep 1",
                 "--disable-plugin", "docker")
    assert result.code == 1 and "provider docker is disabled" in result.err
    assert "--enable-plugin docker" in result.err
