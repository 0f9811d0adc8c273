"""The Docker provider against a real Docker engine and an image built offline.

Each test gets its own provider instance name; its containers carry that
name in their labels, and the fixture removes exactly those, by id.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import need, wait_for

IMAGE = os.environ.get("MNGR_TEST_IMAGE", "mngr-test-base:bookworm")
INTERVAL = 1


def docker(*args, check=True, input=None):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check,
                          input=input, timeout=120)


@pytest.fixture(scope="session")
def engine():
    ok = subprocess.run(["docker", "info"], capture_output=True).returncode == 0 \
        if subprocess.run(["sh", "-c", "command -v docker"], capture_output=True).returncode == 0 else False
    need(ok, "a running Docker engine (make test starts one)")
    need(docker("image", "inspect", IMAGE, check=False).returncode == 0,
         f"the test image {IMAGE} (make test builds it offline)")


@pytest.fixture
def dk(mngr_cli, engine):
    """The CLI with a docker provider instance of its own. Its "egress" network is an
    internal one this fixture makes: a network, with no route anywhere."""
    name = f"dk{os.getpid()}{mngr_cli.socket[-6:]}".replace("-", "")
    network = docker("network", "create", "--internal", "--label", "com.imbue.mngr.test=1",
                     f"{name}-internal").stdout.strip()
    config = mngr_cli.home / ".config" / "mngr"
    config.mkdir(parents=True)
    (config / "settings.toml").write_text(
        f"watch_interval = {INTERVAL}\n[providers.{name}]\nbackend = \"docker\"\nimage = \"{IMAGE}\"\n"
        f"egress_network = \"{name}-internal\"\n"
        f"labels = {{ \"com.imbue.mngr.test\" = \"1\" }}\n")
    mngr_cli.provider = name
    yield mngr_cli
    ids = docker("ps", "-aq", "--filter", f"label=com.imbue.mngr.provider={name}").stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    images = docker("images", "-q", "--filter",
                    f"label=com.imbue.mngr.snapshot-provider={name}").stdout.split()
    images += docker("images", "-q", "--filter",
                     f"label=com.imbue.mngr.build-provider={name}").stdout.split()
    if images:
        docker("rmi", "-f", *set(images), check=False)
    docker("network", "rm", network, check=False)


def rows(cli):
    return {r["name"]: r for r in json.loads(cli.ok("list", "--json").out)}


def container(cli, host):
    ids = docker("ps", "-aq", "--filter", f"label=com.imbue.mngr.host-name={host}",
                 "--filter", f"label=com.imbue.mngr.provider={cli.provider}").stdout.split()
    return ids[0] if ids else None


def status(cid):
    return docker("inspect", "-f", "{{.State.Status}}", cid).stdout.strip()


ECHO = 'while read -r l; do echo "heard: $l"; done'


def test_full_lifecycle(dk):
    src = dk.work / "src"
    (src / "skip").mkdir(parents=True)
    (src / "keep.txt").write_text("kept")
    (src / "skip" / "big.bin").write_text("excluded")
    row = json.loads(dk.ok("create", "box", "--in", dk.provider, "--source", str(src), "--exclude",
                           "skip", "--agent-cmd", ECHO, "--no-connect", "--json").out)
    assert row["state"] == "running" and row["host_state"] == "running"
    assert row["work_dir"] == "/work/box"
    cid = container(dk, "box")
    inspect = json.loads(docker("inspect", cid).stdout)[0]
    assert inspect["HostConfig"]["NetworkMode"] == "none"
    labels = inspect["Config"]["Labels"]
    assert labels["com.imbue.mngr.host-id"] == row["host_id"] and labels["com.imbue.mngr.test"] == "1"

    out = dk("exec", "box", "--", "pwd; ls; echo $MNGR_AGENT_NAME; exit 3")
    assert out.code == 3 and out.out.split() == ["/work/box", "keep.txt", "box"]
    dk.ok("message", "box", "-m", "hello box")
    assert wait_for(lambda: "heard: hello box" in dk.ok("logs", "box").out)
    assert rows(dk)["box"]["idle_mode"] == "io"  # docker hosts: io, untrusted

    dk.ok("stop", "box")
    assert status(cid) == "exited"
    assert rows(dk)["box"]["host_state"] == "stopped" and rows(dk)["box"]["state"] == "stopped"
    dk.ok("start", "box")
    assert status(cid) == "running" and rows(dk)["box"]["state"] == "running"
    dk.ok("msg", "box", "-m", "again")
    assert wait_for(lambda: "heard: again" in dk.ok("logs", "box").out)

    dk.ok("create", "second", "--host", "box", "--agent-cmd", "sleep 600", "--no-connect")
    assert rows(dk)["second"]["host"] == "box" and rows(dk)["second"]["state"] == "running"
    dk.ok("destroy", "-f", "second")
    assert container(dk, "box") == cid  # the host keeps its other agent
    dk.ok("destroy", "-f", "box")
    assert container(dk, "box") is None and rows(dk) == {}


def test_the_watcher_inside_stops_an_idle_host(dk):
    dk.ok("create", "sleepy", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--idle-mode", "create", "--idle-timeout", "3s")
    cid = container(dk, "sleepy")
    assert wait_for(lambda: status(cid) == "exited", timeout=3 + INTERVAL + 8)
    assert rows(dk)["sleepy"]["host_state"] == "stopped"
    events = docker("cp", f"{cid}:/mngr/events/init.jsonl", "-").stdout
    assert "stopping" in events  # PID 1 ran its stop path: hooks, agents, exit


def test_enforce_stops_an_untrusted_host_that_fights_back(dk):
    hostile = ("while true; do pkill -f '[/]mngr/bin watch'; touch /mngr/activity/agent "
               "/mngr/activity/user; echo busy; sleep 0.3; done")
    dk.ok("create", "hostile", "--in", dk.provider, "--agent-cmd", hostile, "--no-connect",
          "--idle-mode", "io", "--idle-timeout", "4s")
    cid = container(dk, "hostile")
    time.sleep(5)
    assert status(cid) == "running"  # its watcher is dead and its activity looks fresh
    result = dk("enforce", "--json", "--provider", dk.provider)
    assert result.code == 0, result.err
    row = json.loads(result.out)[0]
    assert row["action"] == "stop" and row["result"] == "done" and row["cause"] == "idle"
    assert status(cid) == "exited"


def test_a_tampered_record_inside_the_container_is_caught(dk):
    dk.ok("create", "tamper", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--idle-timeout", "1h")
    cid = container(dk, "tamper")
    docker("exec", cid, "sed", "-i", 's/"idle_timeout": 3600/"idle_timeout": 999999/',
           "/mngr/data.json")
    row = json.loads(dk.ok("enforce", "--json", "--provider", dk.provider).out)[0]
    assert row["action"] == "stop" and "tampered: host record: bad signature" in row["reason"]
    assert status(cid) == "exited"


def test_a_container_removed_behind_our_back(dk):
    dk.ok("create", "ghost", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    docker("rm", "-f", container(dk, "ghost"))
    assert rows(dk)["ghost"]["host_state"] == "destroyed"
    result = dk("enforce", "--json", "--provider", dk.provider)
    assert result.code == 0 and json.loads(result.out)[0]["result"] == "gone"
    dk.ok("destroy", "-f", "ghost")
    assert rows(dk) == {}


def test_an_unreachable_engine_is_exit_75_with_a_clear_message(dk):
    settings = dk.home / ".config" / "mngr" / "settings.toml"
    settings.write_text(settings.read_text() + 'docker_host = "unix:///nonexistent/docker.sock"\n')
    dk.ok("create", "x", "--agent-cmd", "sleep 1", "--no-connect")  # a local agent still works
    result = dk("create", "y", "--in", dk.provider, "--agent-cmd", "sleep 1", "--no-connect")
    assert result.code == 75
    assert "cannot reach the Docker engine at unix:///nonexistent/docker.sock" in result.err
    assert result.err.count("\n") == 1


def test_an_image_without_python3_is_a_clear_create_error(dk, tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {IMAGE}\nRUN rm -f /usr/bin/python3*\n")
    result = dk("create", "nopy", "--in", dk.provider, "--dockerfile", str(dockerfile),
                "--agent-cmd", "sleep 1", "--no-connect")
    assert result.code == 1 and "the image has no python3" in result.err
    assert rows(dk)["nopy"]["host_state"] == "failed"  # visible, never half-made and hidden
    built = docker("images", "-q", "--filter", "label=com.imbue.mngr.built-for="
                   + rows(dk)["nopy"]["host_id"]).stdout.split()
    assert built
    dk.ok("destroy", "-f", "nopy")  # removes the container and the image built for it
    assert docker("images", "-q", "--filter", f"label=com.imbue.mngr.build-provider={dk.provider}"
                  ).stdout.split() == []


def test_without_an_image_the_default_one_is_built_offline(dk):
    # the embedded Dockerfile on a base that has python3 and tmux already: no apt, no network
    settings = dk.home / ".config" / "mngr" / "settings.toml"
    settings.write_text(settings.read_text().replace(f'image = "{IMAGE}"', f'base_image = "{IMAGE}"'))
    created = dk("create", "plain", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    assert created.code == 0, created.err
    built = docker("images", "--filter", f"label=com.imbue.mngr.build-provider={dk.provider}",
                   "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert len(built) == 1 and built[0].startswith("mngr-default:")
    assert rows(dk)["plain"]["state"] == "running"
    dk.ok("create", "plain2", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    assert docker("images", "-q", "--filter", f"label=com.imbue.mngr.build-provider={dk.provider}"
                  ).stdout.split() == docker("images", "-q", built[0]).stdout.split()   # reused


def test_snapshots_create_list_start_from_and_destroy(dk):
    dk.ok("create", "snap", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    dk.ok("exec", "snap", "--", "echo v1 > state")
    snapshot = json.loads(dk.ok("snapshot", "create", "snap", "--json").out)
    listed = json.loads(dk.ok("snapshot", "list", "--json").out)
    assert [s["id"] for s in listed] == [snapshot["id"]] and listed[0]["host"] == "snap"
    dk.ok("exec", "snap", "--", "echo v2 > state")
    old = container(dk, "snap")
    dk.ok("start", "snap", "--snapshot", snapshot["id"])
    assert container(dk, "snap") != old  # a new container from the snapshot, same host
    assert dk.ok("exec", "snap", "--", "cat state").out.strip() == "v1"
    assert rows(dk)["snap"]["state"] == "running"

    dk.ok("create", "clone", "--in", dk.provider, "--snapshot", snapshot["id"],
          "--agent-cmd", "sleep 600", "--no-connect")
    assert dk.ok("exec", "clone", "--", "cat /work/snap/state").out.strip() == "v1"
    dk.ok("stop", "clone", "--snapshot-mode", "always")
    assert len(json.loads(dk.ok("snapshot", "list", "--json").out)) == 2
    in_use = dk("snapshot", "destroy", snapshot["id"])
    assert in_use.code == 1 and "in use by a host" in in_use.err
    dk.ok("destroy", "-f", "snap", "clone")
    for row in json.loads(dk.ok("snapshot", "list", "--json").out):
        dk.ok("snapshot", "destroy", row["id"])
    assert json.loads(dk.ok("snapshot", "list", "--json").out) == []
    missing = dk("snapshot", "destroy", "nope")
    assert missing.code == 1 and "no snapshot nope" in missing.err


def test_rotating_keys_resigns_the_records_inside_running_hosts(dk):
    dk.ok("create", "rot", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--idle-timeout", "1h")
    dk.ok("keys", "rotate", "--retire-old")
    row = json.loads(dk.ok("enforce", "--json", "--provider", dk.provider).out)[0]
    assert row["action"] == "none", row  # the old key is gone, yet nothing reads as tampered
    assert rows(dk)["rot"]["verified"] is True


def test_plugin_hooks_on_docker_and_a_failing_after_host_create(dk, tmp_path):
    listed = json.loads(dk.ok("plugin", "list", "--json").out)
    need(any(p["name"] == "recorder" for p in listed), "the test plugin mngr-test-recorder")
    log = tmp_path / "hooks.jsonl"
    recording = {"MNGR_RECORDER_LOG": str(log)}

    def recorded():
        lines = log.read_text().splitlines()
        log.unlink()
        return [json.loads(line) for line in lines]

    dk.ok("create", "hooked", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          env=recording)
    seen = recorded()
    assert [c["hook"] for c in seen][3:-2] == [
        "on_validate_permissions", "on_before_host_create", "on_host_state_change",
        "on_before_agent_create", "on_after_host_create", "on_host_state_change",
        "on_after_agent_create"]
    changes = [(c["args"][0]["old"], c["args"][0]["new"]) for c in seen
               if c["hook"] == "on_host_state_change"]
    assert changes == [("", "starting"), ("starting", "running")]
    dk.ok("stop", "hooked", env=recording)
    changes = [(c["args"][0]["old"], c["args"][0]["new"]) for c in recorded()
               if c["hook"] == "on_host_state_change"]
    assert changes == [("running", "stopping"), ("stopping", "stopped")]
    dk.ok("destroy", "-f", "hooked", env=recording)
    assert [c["hook"] for c in recorded()][-7:-2] == [
        "on_before_agent_destroy", "on_before_host_destroy", "on_after_agent_destroy",
        "on_host_state_change", "on_after_host_destroy"]

    failing = {**recording, "MNGR_RECORDER_FAIL": "on_after_host_create"}
    result = dk("create", "doomed", "--in", dk.provider, "--agent-cmd", "sleep 600",
                "--no-connect", env=failing)
    assert result.code == 1 and "plugin recorder failed in on_after_host_create" in result.err
    assert rows(dk)["doomed"]["host_state"] == "failed"  # the host exists: shown, never hidden
    dk.ok("destroy", "-f", "doomed")
    assert container(dk, "doomed") is None


def test_network_only_with_net_egress(dk):
    dk.ok("create", "closed", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    cid = container(dk, "closed")
    assert docker("exec", cid, "ls", "/sys/class/net").stdout.split() == ["lo"]
    assert json.loads(docker("inspect", cid).stdout)[0]["HostConfig"]["NetworkMode"] == "none"
    dk.ok("create", "open", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--grant", "net:egress")
    cid = container(dk, "open")
    assert json.loads(docker("inspect", cid).stdout)[0]["HostConfig"]["NetworkMode"] != "none"
    assert "eth0" in docker("exec", cid, "ls", "/sys/class/net").stdout.split()
    row = rows(dk)["open"]
    assert row["permissions"] == ["net:egress"] and row["host_permissions"] == ["net:egress"]


def test_env_reaches_a_container_only_with_its_grant(dk, tmp_path):
    result = dk("create", "secret", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
                "--env", "TOKEN=abc")
    assert result.code == 1 and "env TOKEN needs a grant" in result.err
    assert "--grant env:TOKEN" in result.err and container(dk, "secret") is None
    dk.ok("create", "secret", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--env", "TOKEN=abc", "--grant", "env:TOKEN")
    assert dk.ok("exec", "secret", "--", "tmux -L mngr show-environment -t =mngr-secret TOKEN"
                 ).out.strip() == "TOKEN=abc"
    # exec passes it too, by name: the value is never on a command line for ps to show
    real = subprocess.run(["sh", "-c", "command -v docker"], capture_output=True, text=True).stdout.strip()
    shim = tmp_path / "bin" / "docker"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/argv\nexec {real} \"$@\"\n")
    shim.chmod(0o755)
    out = dk.ok("exec", "secret", "--", "echo $TOKEN", env={"PATH": f"{shim.parent}:{os.environ['PATH']}"})
    assert out.out.strip() == "abc"
    assert "exec" in (tmp_path / "argv").read_text() and "abc" not in (tmp_path / "argv").read_text()


def test_bind_mounts_only_with_an_fs_grant(dk, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.txt").write_text("from the host")
    refused = dk("create", "m", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
                 "--mount", f"{shared}:/data:ro")
    assert refused.code == 1 and f"--grant fs:mount:{shared}:ro" in refused.err
    assert container(dk, "m") is None
    dk.ok("create", "m", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--mount", f"{shared}:/data:ro", "--grant", f"fs:mount:{shared}:ro")
    assert dk.ok("exec", "m", "--", "cat /data/data.txt").out == "from the host"
    snap = dk("snapshot", "create", "m")
    assert snap.code == 0 and "not in a snapshot: /data" in snap.err


@pytest.mark.parametrize("sabotage", [
    "print(5)",                                                  # not a report at all
    "print('{\"panes\": {\"x\": \"y\"}, \"agents\": []}')",     # a report of the wrong shape
    "import sys; sys.stderr.write('Cannot connect to the Docker daemon\\n'); sys.exit(1)",
    "import time; time.sleep(3600)",                             # never answers
])
def test_a_host_that_breaks_its_own_report_is_stopped_not_excused(dk, sabotage):
    dk.ok("create", "liar", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--idle-timeout", "1h")
    cid = container(dk, "liar")
    docker("exec", "-i", cid, "sh", "-c", "cat > /mngr/bin/mngr.py", input=sabotage + "\n")
    result = dk("enforce", "--json", "--provider", dk.provider, timeout=120)
    assert "Traceback" not in result.err and result.code == 0, result.err
    row = json.loads(result.out)[0]
    assert row["action"] == "stop" and "host report" in row["reason"], row
    assert status(cid) == "exited"


def test_a_deploy_into_a_host_being_stopped_is_refused(dk):
    dk.ok("create", "locked", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--idle-timeout", "1h")
    cid = container(dk, "locked")
    docker("exec", cid, "rmdir", "/mngr/deploy_lock")  # what the watcher does as it stops a host
    result = dk("limit", "locked", "--idle-timeout", "2h")
    assert result.code == 1 and "watcher is stopping it" in result.err
    assert rows(dk)["locked"]["verified"]  # nothing half-changed: host and controller agree
    assert json.loads(dk.ok("enforce", "--json", "--provider", dk.provider).out)[0]["action"] == "none"


def test_two_controllers_on_one_engine_never_touch_each_others_hosts(dk, tmp_path):
    from conftest import Mngr

    dk.ok("create", "mine", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    other_home = tmp_path / "other"
    other_home.mkdir()
    other = Mngr(other_home, dk.home, dk.socket + "-other")
    (other_home / ".config" / "mngr").mkdir(parents=True)
    (other_home / ".config" / "mngr" / "settings.toml").write_text(
        (dk.home / ".config" / "mngr" / "settings.toml").read_text())   # the same provider name
    assert json.loads(other.ok("list", "--json").out) == []
    result = json.loads(other.ok("enforce", "--json").out)
    assert result == []                                  # not even a container "without a record"
    assert rows(dk)["mine"]["state"] == "running"


def test_a_container_stopped_outside_mngr_can_be_started_again(dk):
    dk.ok("create", "outside", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    docker("stop", "-t", "1", "mngr-outside")      # its watcher, or someone, stopped it
    assert rows(dk)["outside"]["host_state"] == "stopped"
    dk.ok("start", "outside")
    assert rows(dk)["outside"]["state"] == "running"
    dk.ok("stop", "outside")
    docker("start", "mngr-outside")                # and started again outside mngr
    assert rows(dk)["outside"]["host_state"] == "running"
    result = dk("enforce", "--json", "--provider", dk.provider, "--at=+30d")
    row = json.loads(result.out)[0]                # its record says stopped already: still fine
    assert result.code == 0 and row["action"] == "stop" and row["result"] == "done", row
    assert status(container(dk, "outside")) == "exited"
    assert rows(dk)["outside"]["host_state"] == "stopped"


def test_a_failed_build_lists_as_failed_and_a_missing_base_is_never_pulled(dk, tmp_path):
    broken = tmp_path / "broken" / "Dockerfile"
    broken.parent.mkdir()
    broken.write_text(f"FROM {IMAGE}\nRUN exit 3\n")
    result = dk("create", "badbuild", "--in", dk.provider, "--dockerfile", str(broken),
                "--agent-cmd", "sleep 1", "--no-connect")
    assert result.code == 1 and "building the image failed" in result.err, result.err
    assert rows(dk)["badbuild"]["host_state"] == "failed"  # shown, never half-made and hidden
    dk.ok("destroy", "-f", "badbuild")
    assert rows(dk) == {}

    elsewhere = tmp_path / "elsewhere" / "Dockerfile"
    elsewhere.parent.mkdir()
    elsewhere.write_text("ARG BASE=mngr-nowhere:1\nFROM ${BASE} AS first\nFROM first\n")
    result = dk("create", "nobase", "--in", dk.provider, "--dockerfile", str(elsewhere),
                "--agent-cmd", "sleep 1", "--no-connect")
    assert result.code == 1 and "base image mngr-nowhere:1 is not available locally" in result.err
    assert "--pull" in result.err and result.err.count("\n") == 1
    assert rows(dk)["nobase"]["host_state"] == "failed"


def test_boot_hooks_run_once_a_boot(dk):
    dk.ok("create", "hooks", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect",
          "--start-on-boot")
    cid = container(dk, "hooks")
    docker("exec", "-i", cid, "sh", "-c", "cat > /mngr/hooks/boot/10-count; chmod +x /mngr/hooks/boot/10-count",
           input="#!/bin/sh\necho boot >> /work/boots\n")
    dk.ok("stop", "hooks")
    dk.ok("start", "hooks")
    docker("exec", cid, "pkill", "-f", "[/]mngr/bin watch")   # PID 1 starts its watcher again
    assert wait_for(lambda: "watcher_restarted" in docker("exec", cid, "cat", "/mngr/events/init.jsonl").stdout,
                    timeout=20)
    assert docker("exec", cid, "cat", "/work/boots").stdout.split() == ["boot"]
    dk.ok("stop", "hooks")
    dk.ok("start", "hooks")
    assert docker("exec", cid, "cat", "/work/boots").stdout.split() == ["boot", "boot"]


def test_a_snapshot_keeps_the_container_options_and_outlives_its_built_image(dk, tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {IMAGE}\nRUN echo built > /built\n")
    dk.ok("create", "opts", "--in", dk.provider, "--dockerfile", str(dockerfile), "--memory", "256m",
          "--agent-cmd", "sleep 600", "--no-connect")
    snapshot = json.loads(dk.ok("snapshot", "create", "opts", "--json").out)
    old = container(dk, "opts")
    dk.ok("start", "opts", "--snapshot", snapshot["id"])
    new = container(dk, "opts")
    assert new != old and docker("ps", "-aq", "--filter", f"id={old}").stdout.strip() == ""
    assert json.loads(docker("inspect", new).stdout)[0]["HostConfig"]["Memory"] == 256 * 2**20
    dk.ok("destroy", "-f", "opts")          # removes the image built for it, not the snapshot
    assert [s["id"] for s in json.loads(dk.ok("snapshot", "list", "--json").out)] == [snapshot["id"]]
    dk.ok("create", "heir", "--in", dk.provider, "--snapshot", snapshot["id"],
          "--agent-cmd", "sleep 600", "--no-connect")
    assert dk.ok("exec", "heir", "--", "cat /built").out.strip() == "built"


def test_a_snapshot_that_cannot_start_puts_the_old_container_back(dk):
    dk.ok("create", "keep", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    dk.ok("exec", "keep", "--", "echo mine > state")
    snapshot = json.loads(dk.ok("snapshot", "create", "keep", "--json").out)
    old = container(dk, "keep")
    # the snapshot loses python3: a container made from it cannot run its host
    docker("exec", old, "sh", "-c", "rm -f /usr/bin/python3*")
    broken = json.loads(dk.ok("snapshot", "create", "keep", "--json").out)
    dk.ok("stop", "keep")
    result = dk("start", "keep", "--snapshot", broken["id"])
    assert result.code == 1 and "no python3" in result.err, result.err
    assert container(dk, "keep") == old and status(old) == "exited"
    assert json.loads(docker("inspect", old).stdout)[0]["Name"] == "/mngr-keep"
    dk.ok("start", "keep", "--snapshot", snapshot["id"])
    assert dk.ok("exec", "keep", "--", "cat state").out.strip() == "mine"


def test_a_container_removed_while_listing_is_shown_as_gone(dk, tmp_path):
    dk.ok("create", "stays", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    dk.ok("create", "goes", "--in", dk.provider, "--agent-cmd", "sleep 600", "--no-connect")
    real = subprocess.run(["sh", "-c", "command -v docker"], capture_output=True, text=True).stdout.strip()
    shim = tmp_path / "bin" / "docker"
    shim.parent.mkdir()
    # between `docker ps` and `docker inspect`, someone removes a container
    shim.write_text(f"#!/bin/sh\nif [ \"$1\" = inspect ] && [ ! -e {tmp_path}/done ]; then\n"
                    f"  touch {tmp_path}/done; {real} rm -f {container(dk, 'goes')} >/dev/null\nfi\n"
                    f"exec {real} \"$@\"\n")
    shim.chmod(0o755)
    listed = dk("list", "--json", env={"PATH": f"{shim.parent}:{os.environ['PATH']}"})
    assert listed.code == 0, listed.err
    states = {r["name"]: r["host_state"] for r in json.loads(listed.out)}
    assert states == {"stays": "running", "goes": "destroyed"}


def test_dockerfile_bases_are_what_a_build_would_pull():
    from providers.docker import dockerfile_bases

    text = ("# syntax=docker/dockerfile:1\nARG BASE=debian:bookworm\nARG TAG\n"
            "FROM --platform=linux/amd64 ${BASE} AS build\nRUN make\n"
            "FROM build AS test\nFROM scratch\nFROM alpine:$TAG\nFROM busybox:1 \\\n  AS last\n"
            "COPY --from=build /a /b\n")
    assert dockerfile_bases(text, {}) == ["debian:bookworm", "busybox:1"]
    assert dockerfile_bases(text, {"BASE": "mine:2", "TAG": "3"}) == ["mine:2", "alpine:3", "busybox:1"]
