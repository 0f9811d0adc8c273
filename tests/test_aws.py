"""The AWS provider through the real aws CLI against a local EC2 emulator.

The emulator's instances are not machines and their addresses are made up:
every ssh goes through address_override to this test's own sshd on a
loopback port, which accepts the key pairs mngr made (as EC2 would put them
into an instance). Nothing here connects to an address the emulator returns.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import need, wait_for
from sshd import Sshd, free_port, have_sshd, wait_port

PROVIDER = "cloud"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def have_emulator() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import moto.server, flask"], capture_output=True)
    return probe.returncode == 0 and shutil.which("aws") is not None


class Emulator:
    """moto_server on a free loopback port, stopped by pid."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "moto.log"
        self.proc = None

    def start(self) -> "Emulator":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        assert wait_port("127.0.0.1", self.port, timeout=30), self.log.read_text()[-500:]
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)

    def ec2(self, *args):
        result = subprocess.run(["aws", "--output", "json", "--endpoint-url", self.url, "ec2", *args],
                                capture_output=True, text=True, timeout=60, env={**os.environ, **CREDENTIALS})
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if result.stdout.strip() else {}

    def instances(self, *filters) -> list:
        data = self.ec2("describe-instances", *(["--filters", *filters] if filters else []))
        return [i for r in data["Reservations"] for i in r["Instances"]]


class Cloud:
    def __init__(self, cli, emulator: Emulator, sshd: Sshd, root: Path, ami: str):
        self.cli, self.emulator, self.sshd, self.root, self.ami = cli, emulator, sshd, root, ami
        self.extra = {}

    def write(self, **extra) -> None:
        self.extra.update(extra)
        conf = {"backend": "aws", "region": "us-east-1", "endpoint_url": self.emulator.url,
                "ami": self.ami, "ssh_user": "root", "connect_timeout": 3, "timeout": 30,
                "ready_timeout": 20, "address_override": f"{self.sshd.address}:{self.sshd.port}",
                "host_dir": str(self.root / "hosts" / "{host}" / "host"),
                "work_root": str(self.root / "hosts" / "{host}" / "work"),
                "tmux_socket": f"{self.cli.socket}-{{host}}",
                "shutdown_command": f"touch {self.root}/powered-off-{{host}}", **self.extra}
        config = self.cli.home / ".config" / "mngr"
        config.mkdir(parents=True, exist_ok=True)
        (config / "settings.toml").write_text(f"watch_interval = 1\n[providers.{PROVIDER}]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in conf.items()))

    def tmux(self, host: str, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        return subprocess.run(["tmux", "-L", f"{self.cli.socket}-{host}", *args], capture_output=True,
                              text=True, env=env, timeout=10)

    def agents(self) -> dict:
        return {r["name"]: r for r in json.loads(self.cli.ok("list", "--json").out)}

    def instance_of(self, host_id: str) -> dict:
        found = self.emulator.instances(f"Name=tag:mngr:host-id,Values={host_id}")
        return max(found, key=lambda i: i["LaunchTime"])


@pytest.fixture
def cloud(mngr_cli, tmp_path):
    need(have_sshd(), "sshd (openssh-server) and root")
    need(have_emulator(), "the aws CLI and moto[server] (make test installs them into .venv)")
    emulator = Emulator(tmp_path).start()
    # the "instances": this sshd, which takes the key pairs mngr makes, as EC2 would
    keys = mngr_cli.home / ".ssh" / "mngr"
    # sshd runs it only from a path no one else can write: not under /tmp
    safe = Path(tempfile.mkdtemp(prefix="mngr-test-keys-", dir="/run"))
    safe.chmod(0o755)
    command = safe / "keys-command"
    command.write_text(f"#!/bin/sh\ncat {keys}/*.pub 2>/dev/null; exit 0\n")
    command.chmod(0o755)
    sshd = Sshd(tmp_path / "sshd", extra=f"AuthorizedKeysCommand {command}\n"
                                         "AuthorizedKeysCommandUser root\n").start()
    mngr_cli.env.update(CREDENTIALS)
    ami = emulator.ec2("describe-images", "--owners", "amazon")["Images"][0]["ImageId"]
    cloud = Cloud(mngr_cli, emulator, sshd, tmp_path / "cloud", ami)
    cloud.keys_command = command
    cloud.write()
    yield cloud
    for host in (tmp_path / "cloud" / "hosts").glob("*") if (tmp_path / "cloud" / "hosts").exists() else []:
        cloud.tmux(host.name, "kill-server")
        pid = host / "host" / "watcher.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    sshd.stop()
    emulator.stop()
    shutil.rmtree(safe, ignore_errors=True)
    if shutil.which("crontab"):  # the @reboot lines this test's hosts added, and no others
        lines = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout.splitlines(True)
        kept = [line for line in lines if str(tmp_path) not in line]
        if kept != lines:
            subprocess.run(["crontab", "-"], input="".join(kept), text=True)


def test_create_tags_the_instance_and_runs_the_agent(cloud):
    row = json.loads(cloud.cli.ok("create", "web", "--in", PROVIDER, "--agent-cmd", "cat",
                                  "--no-connect", "--json").out)
    assert row["provider"] == PROVIDER and row["state"] == "running"
    inst = cloud.instance_of(row["host_id"])
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["mngr:host-id"] == row["host_id"] and tags["mngr:host-name"] == "web"
    assert tags["mngr:provider"] == PROVIDER and "@" in tags["mngr:created-by"]
    assert tags["mngr:controller"] == (cloud.cli.home / ".mngr" / "controller-id").read_text().strip()
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    behaviour = cloud.emulator.ec2("describe-instance-attribute", "--instance-id", inst["InstanceId"],
                                   "--attribute", "instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    key = cloud.cli.home / ".ssh" / "mngr" / row["host_id"]
    assert key.exists() and key.stat().st_mode & 0o777 == 0o600
    assert inst["KeyName"] == f"mngr-{row['host_id']}"
    assert cloud.tmux("web", "has-session", "-t", "=mngr-web").returncode == 0
    cloud.cli.ok("message", "web", "-m", "hello instance")
    assert wait_for(lambda: "hello instance" in cloud.cli.ok("logs", "web").out, timeout=10)


def counting_aws(cloud):
    bin_dir = cloud.root / "count-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = cloud.root / "aws-calls"
    (bin_dir / "aws").write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in *-*-*|*-*) ;; esac; done\n'
                                 f'echo "$*" >> {log}\nexec {shutil.which("aws")} "$@"\n')
    (bin_dir / "aws").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_list_is_one_describe_instances_call(cloud):
    for name in ("a", "b", "c"):
        cloud.cli.ok("create", name, "--in", PROVIDER, "--agent-cmd", "sleep 600", "--no-connect")
    env, log = counting_aws(cloud)
    rows = json.loads(cloud.cli.ok("list", "--json", env=env).out)
    assert sorted(r["name"] for r in rows) == ["a", "b", "c"]
    assert all(r["state"] == "running" and r["host_state"] == "running" for r in rows)
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and " ec2 describe-instances " in f" {calls[0]} "


def test_stop_and_start_map_instance_states(cloud):
    row = json.loads(cloud.cli.ok("create", "s", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    cloud.cli.ok("stop", "s")
    assert cloud.instance_of(row["host_id"])["State"]["Name"] == "stopped"
    agents = cloud.agents()
    assert agents["s"]["host_state"] == "stopped" and agents["s"]["state"] == "stopped"
    cloud.cli.ok("start", "s")
    assert cloud.instance_of(row["host_id"])["State"]["Name"] == "running"
    agents = cloud.agents()
    assert agents["s"]["host_state"] == "running" and agents["s"]["state"] == "running"
    assert agents["s"]["verified"] is True
    # stopped outside mngr (the console, or its watcher powering it off): shown, and startable
    cloud.emulator.ec2("stop-instances", "--instance-ids", cloud.instance_of(row["host_id"])["InstanceId"])
    assert cloud.agents()["s"]["host_state"] == "stopped"
    cloud.cli.ok("start", "s")
    assert cloud.agents()["s"]["state"] == "running"


def test_snapshots_create_list_start_from_and_destroy(cloud):
    row = json.loads(cloud.cli.ok("create", "snap", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    first = cloud.instance_of(row["host_id"])["InstanceId"]
    made = json.loads(cloud.cli.ok("snapshot", "create", "snap", "--json").out)
    made = made[0] if isinstance(made, list) else made
    listed = json.loads(cloud.cli.ok("snapshot", "list", "--json").out)
    assert [s["id"] for s in listed] == [made["id"]] and listed[0]["host"] == "snap"
    image = cloud.emulator.ec2("describe-images", "--image-ids", made["image"])["Images"][0]
    assert {t["Key"]: t["Value"] for t in image["Tags"]}["mngr:host-id"] == row["host_id"]
    cloud.cli.ok("stop", "snap")
    cloud.cli.ok("start", "snap", "--snapshot", made["id"])
    second = cloud.instance_of(row["host_id"])
    assert second["InstanceId"] != first and second["ImageId"] == made["image"]
    assert cloud.agents()["snap"]["state"] == "running"
    old = cloud.emulator.ec2("describe-instances", "--instance-ids", first)["Reservations"][0]["Instances"][0]
    assert old["State"]["Name"] == "terminated"
    clone = json.loads(cloud.cli.ok("create", "clone", "--in", PROVIDER, "--snapshot", made["id"],
                                    "--agent-cmd", "sleep 600", "--no-connect", "--json").out)
    assert cloud.instance_of(clone["host_id"])["ImageId"] == made["image"]
    assert clone["host_id"] != row["host_id"] and cloud.agents()["clone"]["state"] == "running"
    behind = [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings") or [] if "Ebs" in m]
    cloud.cli.ok("snapshot", "destroy", made["id"])
    assert json.loads(cloud.cli.ok("snapshot", "list", "--json").out) == []
    left = {s["SnapshotId"] for s in cloud.emulator.ec2("describe-snapshots", "--owner-ids", "self")["Snapshots"]}
    assert behind and not left & set(behind)     # the EBS snapshots behind the image went too


def test_destroy_terminates_and_removes_the_key_pair(cloud):
    row = json.loads(cloud.cli.ok("create", "gone", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    instance = cloud.instance_of(row["host_id"])["InstanceId"]
    # the watcher starts at every boot: this "instance" has cron, not systemd
    boot = cloud.root / "hosts" / "gone" / "host" / "bin" / "boot.sh"
    assert "watch --on-stop shutdown" in boot.read_text()
    assert f"@reboot /bin/sh {boot} # mngr-watcher-{row['host_id']}" in crontab()
    cloud.cli.ok("destroy", "-f", "gone")
    assert f"mngr-watcher-{row['host_id']}" not in crontab()
    state = cloud.emulator.ec2("describe-instances", "--instance-ids", instance)
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"
    pairs = cloud.emulator.ec2("describe-key-pairs")["KeyPairs"]
    assert f"mngr-{row['host_id']}" not in [p["KeyName"] for p in pairs]
    assert not (cloud.cli.home / ".ssh" / "mngr" / row["host_id"]).exists()
    assert cloud.agents() == {}


def crontab() -> str:
    need(shutil.which("crontab") is not None, "cron (make test installs it)")
    return subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout


def test_enforce_stops_past_max_lifetime_and_leaves_a_young_one(cloud):
    old = json.loads(cloud.cli.ok("create", "old", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--max-lifetime", "2s", "--no-connect", "--json").out)
    young = json.loads(cloud.cli.ok("create", "young", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                    "--max-lifetime", "1h", "--no-connect", "--json").out)
    time.sleep(2.5)
    result = cloud.cli("enforce", "--json")
    rows = {r["host"]: r for r in json.loads(result.out)}
    assert result.code == 0, result.err
    assert rows["old"]["action"] == "stop" and rows["old"]["result"] == "done"
    assert "max lifetime" in rows["old"]["reason"]
    assert rows["young"]["action"] == "none"
    assert cloud.instance_of(old["host_id"])["State"]["Name"] == "stopped"
    assert cloud.instance_of(young["host_id"])["State"]["Name"] == "running"


def test_a_stuck_stopping_record_is_force_stopped(cloud):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import mngr

    row = json.loads(cloud.cli.ok("create", "stuck", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    # a `mngr stop` that died after signing "stopping", ten minutes ago
    env = {**cloud.cli.env}
    store = mngr.Store(mngr.HostDir(cloud.cli.home / ".mngr" / "hosts" / row["host_id"]),
                       mngr.load_keyring(env), mngr.VersionCache(cloud.cli.home / ".mngr" / "versions.json"))
    record, _ = store.read_host()
    stuck = mngr.transition(record.lifecycle, "stopping", time.time() - 600)
    store.write_host(mngr.dataclasses.replace(record, lifecycle=stuck,
                                              version=store.next_version(record.id, record.version)))
    store.versions.save()
    result = cloud.cli("enforce", "--json")
    found = {r["host"]: r for r in json.loads(result.out)}["stuck"]
    assert found["action"] == "force_stop" and found["result"] == "done", result.out + result.err
    assert cloud.instance_of(row["host_id"])["State"]["Name"] == "stopped"


def test_emulator_down_is_exit_75_and_destroys_nothing(cloud):
    row = json.loads(cloud.cli.ok("create", "kept", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    cloud.emulator.stop()
    result = cloud.cli("enforce", "--json")
    assert result.code == 75, result.err
    rows = json.loads(result.out)
    assert rows[0]["result"] == "error" and "cannot reach AWS EC2" in rows[0]["error"]
    listed = cloud.cli("list")
    assert listed.code == 75 and "cannot reach AWS EC2" in listed.err and "Traceback" not in listed.err
    assert (cloud.cli.home / ".mngr" / "hosts" / row["host_id"] / "data.json").exists()
    assert cloud.tmux("kept", "has-session", "-t", "=mngr-kept").returncode == 0


def test_a_create_that_fails_after_run_instances_leaves_no_instance_running(cloud):
    cloud.write(address_override=f"127.0.0.1:{free_port()}", ready_timeout=3)   # ssh never answers
    result = cloud.cli("create", "doomed", "--in", PROVIDER, "--agent-cmd", "sleep 600", "--no-connect")
    assert result.code != 0 and "Traceback" not in result.err
    instances = cloud.emulator.instances()
    assert instances, "run-instances was reached"
    for inst in instances:
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
        assert tags.get("mngr:host-id")                      # never untagged
        assert inst["State"]["Name"] == "terminated"         # and never left running
    assert cloud.emulator.ec2("describe-key-pairs")["KeyPairs"] == []
    assert cloud.agents() == {}


def test_missing_credentials_name_the_profile(cloud):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        cloud.cli.env.pop(key)
    result = cloud.cli("list")
    assert result.code == 1 and "no AWS credentials for profile default" in result.err, result.err
    cloud.write(profile="nosuch")
    result = cloud.cli("create", "x", "--in", PROVIDER, "--agent-cmd", "sleep 600", "--no-connect")
    assert result.code == 1 and "profile nosuch" in result.err and "Traceback" not in result.err
    assert cloud.emulator.instances() == []


def test_an_image_without_python3_is_said_so_and_terminated(cloud):
    from sshd import TEST_USER, have_test_user, sshd_without_python

    need(have_test_user(), f"the test user {TEST_USER} (make test adds it)")
    nopy = sshd_without_python(f"AuthorizedKeysCommand {cloud.keys_command}\n"
                               "AuthorizedKeysCommandUser root\n").start()
    try:
        cloud.write(address_override=f"{nopy.address}:{nopy.port}", ssh_user=TEST_USER,
                    host_dir="~/.mngr-host-{host}", work_root="~/w-{host}")
        result = cloud.cli("create", "bare", "--in", PROVIDER, "--agent-cmd", "sleep 600", "--no-connect")
        assert result.code == 1 and "python3 is not installed there" in result.err, result.err
        assert [i["State"]["Name"] for i in cloud.emulator.instances()] == ["terminated"]
        assert cloud.agents() == {}
    finally:
        nopy.stop()
        shutil.rmtree(nopy.root.parent, ignore_errors=True)


def test_an_agent_of_a_stopped_instance_can_be_destroyed(cloud):
    row = json.loads(cloud.cli.ok("create", "one", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    cloud.cli.ok("create", "two", "--host", "one", "--agent-cmd", "sleep 600", "--no-connect")
    cloud.emulator.ec2("stop-instances", "--instance-ids", cloud.instance_of(row["host_id"])["InstanceId"])
    result = cloud.cli("destroy", "-f", "two")
    assert result.code == 0 and "stays on its disk" in result.err, result.err
    assert sorted(cloud.agents()) == ["one"]
    cloud.cli.ok("start", "one")
    assert cloud.agents()["one"]["state"] == "running" and cloud.agents()["one"]["verified"] is True


# Doctored EC2 answers ##########################################################
# The emulator runs every instance at once and never refuses a stop. What real EC2
# also does (pending, stopping, refusing to stop a pending instance, an empty answer,
# a refused key pair delete) is made by an `aws` first on PATH that runs the real one
# and rewrites its answer by the rules in a JSON file the test writes.

DOCTOR = r'''
import json, subprocess, sys
argv = sys.argv[1:]
rules = json.load(open(RULES)) if __import__("os").path.exists(RULES) else {}
op = next((a for a in argv if a in OPS), "")
ids = argv[argv.index("--instance-ids") + 1:] if "--instance-ids" in argv else []
target = rules.get("instance", "")
if op == "describe-instances" and ids and rules.get("flip_after_describe"):
    rules["status"] = rules.pop("flip_after_describe")
    json.dump(rules, open(RULES, "w"))
if op == "stop-instances" and target in ids and rules.get("status") == "pending":
    sys.stderr.write("An error occurred (IncorrectInstanceState) when calling the StopInstances operation: "
                     f"The instance '{target}' is not in a state from which it can be stopped.\n")
    sys.exit(254)
if op == "delete-key-pair" and rules.get("refuse_key_pair_delete"):
    sys.stderr.write("An error occurred (UnauthorizedOperation) when calling the DeleteKeyPair operation: "
                     "You are not authorized to perform this operation.\n")
    sys.exit(254)
if op == "describe-instances" and ids and rules.get("describe_by_id_empty"):
    print(json.dumps({"Reservations": []}))
    sys.exit(0)
proc = subprocess.run([REAL, *argv], capture_output=True, text=True)
out = proc.stdout
if proc.returncode == 0 and op == "describe-instances" and target and rules.get("status"):
    data = json.loads(out)
    for reservation in data.get("Reservations") or []:
        for inst in reservation.get("Instances") or []:
            if inst["InstanceId"] == target:
                inst["State"]["Name"] = rules["status"]
                if rules.get("launch_time"):
                    inst["LaunchTime"] = rules["launch_time"]
    out = json.dumps(data)
sys.stdout.write(out)
sys.stderr.write(proc.stderr)
sys.exit(proc.returncode)
'''


def doctored_aws(cloud):
    """(env putting the doctored aws first on PATH, function to set its rules)."""
    bin_dir = cloud.root / "doctor-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    rules = cloud.root / "doctor-rules.json"
    ops = ["describe-instances", "stop-instances", "delete-key-pair"]
    (bin_dir / "aws").write_text(f"#!{sys.executable}\nRULES = {str(rules)!r}\nREAL = {shutil.which('aws')!r}\n"
                                 f"OPS = {ops!r}\n" + DOCTOR)
    (bin_dir / "aws").chmod(0o755)

    def set_rules(**values):
        rules.write_text(json.dumps(values))
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, set_rules


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


def rewrite_record(cloud, host_id: str, state: str, since: float):
    """The controller's signed host record, now saying `state` since `since` (as a mngr
    that died mid-way, or long ago, left it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import mngr

    store = mngr.Store(mngr.HostDir(cloud.cli.home / ".mngr" / "hosts" / host_id),
                       mngr.load_keyring(dict(cloud.cli.env)),
                       mngr.VersionCache(cloud.cli.home / ".mngr" / "versions.json"))
    record, _ = store.read_host()
    store.write_host(mngr.dataclasses.replace(record, lifecycle=mngr.Lifecycle(state, since),
                                              version=store.next_version(record.id, record.version)))
    store.versions.save()
    return store


def enforced(cloud, env, name: str):
    result = cloud.cli("enforce", "--json", env=env)
    assert "Traceback" not in result.err, result.err
    return result, {r["host"]: r for r in json.loads(result.out)}[name]


def test_ec2_transitional_states_are_dated_from_launch_or_first_sight(cloud):
    row = json.loads(cloud.cli.ok("create", "fresh", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    instance = cloud.instance_of(row["host_id"])["InstanceId"]
    env, set_rules = doctored_aws(cloud)
    long_ago = time.time() - 7200
    # stopped two hours ago, started from the console a moment ago: pending since its launch
    rewrite_record(cloud, row["host_id"], "stopped", long_ago)
    set_rules(instance=instance, status="pending", launch_time=iso(time.time()))
    _, found = enforced(cloud, env, "fresh")
    assert found["state"] == "starting" and found["action"] == "none", found
    # running for two hours, its watcher shut it down: stopping since mngr first saw it
    rewrite_record(cloud, row["host_id"], "running", long_ago)
    set_rules(instance=instance, status="stopping")
    _, found = enforced(cloud, env, "fresh")
    assert found["state"] == "stopping" and found["action"] == "none", found
    assert cloud.instance_of(row["host_id"])["State"]["Name"] == "running"   # nothing was forced


def test_transition_since_prefers_fresh_evidence_over_a_stale_record():
    from providers.aws import transition_since

    now = 10_000.0
    assert transition_since("pending", 9_990.0, 9_995.0, 100.0, now) == 9_990.0     # its launch
    assert transition_since("pending", 50.0, 9_995.0, 100.0, now) == 9_995.0        # stale LaunchTime
    assert transition_since("pending", None, None, 100.0, now) == now
    assert transition_since("stopping", 50.0, 9_000.0, 100.0, now) == 9_000.0       # first seen
    assert transition_since("stopping", None, None, None, now) == now
    assert transition_since("stopping", None, 20_000.0, None, now) == now           # never later than now


def make_stuck_pending(cloud, name: str):
    """A host whose mngr start died two hours ago, its instance still pending since."""
    row = json.loads(cloud.cli.ok("create", name, "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    instance = cloud.instance_of(row["host_id"])["InstanceId"]
    long_ago = time.time() - 7200
    rewrite_record(cloud, row["host_id"], "starting", long_ago)
    return row, instance, iso(long_ago + 1)


def test_a_stuck_pending_instance_is_stopped_once_it_runs(cloud):
    row, instance, launched = make_stuck_pending(cloud, "late")
    env, set_rules = doctored_aws(cloud)
    set_rules(instance=instance, status="pending", launch_time=launched, flip_after_describe="running")
    result, found = enforced(cloud, env, "late")
    assert found["action"] == "mark_failed" and found["result"] == "done", result.out + result.err
    assert cloud.instance_of(row["host_id"])["State"]["Name"] == "stopped"
    assert cloud.agents()["late"]["host_state"] == "failed"


def test_a_stuck_pending_instance_that_stays_pending_is_a_clear_error(cloud):
    cloud.write(ready_timeout=2)
    row, instance, launched = make_stuck_pending(cloud, "never")
    env, set_rules = doctored_aws(cloud)
    set_rules(instance=instance, status="pending", launch_time=launched)
    result, found = enforced(cloud, env, "never")
    assert result.code == 1 and found["action"] == "mark_failed" and found["result"] == "error", result.out
    assert f"instance {instance} is still pending" in found["error"], found
    assert "tries again on its next run" in found["error"]
    assert cloud.instance_of(row["host_id"])["State"]["Name"] == "running"   # never terminated
    # not marked failed while it may still run: the next enforce tries again
    assert cloud.agents()["never"]["host_state"] == "starting"


def test_a_changed_host_key_after_a_restart_is_refused(cloud):
    row = json.loads(cloud.cli.ok("create", "keyed", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    instance = cloud.instance_of(row["host_id"])["InstanceId"]
    known = cloud.cli.home / ".mngr" / "hosts" / row["host_id"] / "known_hosts"
    pinned = subprocess.run(["ssh-keygen", "-F", instance, "-f", str(known)], capture_output=True, text=True)
    lines = [line.split() for line in pinned.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert lines and len(lines) == len(known.read_text().splitlines())    # pinned under the instance id
    cloud.cli.ok("stop", "keyed")
    cloud.cli.ok("start", "keyed")              # the same key again: a restart is no new contact
    assert cloud.agents()["keyed"]["state"] == "running"
    cloud.cli.ok("stop", "keyed")
    other = cloud.root / "other-host-key"
    replaced = []
    for alias, kind, _ in lines:                # the instance now offers other keys
        other.unlink(missing_ok=True)
        Path(f"{other}.pub").unlink(missing_ok=True)
        key_type = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(kind, "ecdsa")
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(other)], check=True)
        new_kind, blob = Path(f"{other}.pub").read_text().split()[:2]
        replaced.append(f"{instance} {new_kind} {blob}\n")
    known.write_text("".join(replaced))
    result = cloud.cli("start", "keyed")
    assert result.code == 1 and "Traceback" not in result.err, result.err
    assert f"host key of keyed's instance {instance}" in result.err and "refusing" in result.err
    assert cloud.instance_of(row["host_id"])["State"]["Name"] == "stopped"   # not left running


def test_a_failed_start_from_snapshot_keeps_the_old_instance(cloud):
    row = json.loads(cloud.cli.ok("create", "keep", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    first = cloud.instance_of(row["host_id"])["InstanceId"]
    made = json.loads(cloud.cli.ok("snapshot", "create", "keep", "--json").out)
    made = made[0] if isinstance(made, list) else made
    cloud.cli.ok("stop", "keep")
    good = cloud.extra["address_override"] if "address_override" in cloud.extra else \
        f"{cloud.sshd.address}:{cloud.sshd.port}"
    cloud.write(address_override=f"127.0.0.1:{free_port()}", ready_timeout=3)   # the new one never answers
    result = cloud.cli("start", "keep", "--snapshot", made["id"])
    assert result.code != 0 and "Traceback" not in result.err, result.err
    assert f"keeps its old instance {first}" in result.err, result.err
    states = {i["InstanceId"]: i["State"]["Name"] for i in cloud.emulator.instances(
        f"Name=tag:mngr:host-id,Values={row['host_id']}")}
    assert states.pop(first) == "stopped"                  # the old one: kept
    assert list(states.values()) == ["terminated"]          # the new one: gone
    assert cloud.agents()["keep"]["host_state"] == "stopped"
    cloud.write(address_override=good, ready_timeout=20)
    cloud.cli.ok("start", "keep")
    assert cloud.emulator.instances(f"Name=instance-id,Values={first}")[0]["State"]["Name"] == "running"
    assert cloud.agents()["keep"]["state"] == "running"


@pytest.mark.parametrize("line, expected", [
    ('security_group_ids = "sg-1"', "security_group_ids must be a list of strings"),
    ('security_group_ids = ["sg-1", 2]', "security_group_ids must be a list of strings"),
    ('address_override = "127.0.0.1:notaport"', "bad address_override '127.0.0.1:notaport'"),
    ('address_override = "127.0.0.1:70000"', "bad address_override '127.0.0.1:70000'"),
    ('address_override = "127.0.0.1:"', "bad address_override '127.0.0.1:'"),
    ('ready_timeout = 0', "ready_timeout must be a positive number of seconds, not 0"),
    ('ready_timeout = -5', "ready_timeout must be a positive number of seconds, not -5"),
    ('ready_timeout = "soon"', "ready_timeout must be a positive number of seconds, not 'soon'"),
])
def test_bad_settings_are_one_clear_line(mngr_cli, line, expected):
    config = mngr_cli.home / ".config" / "mngr"
    config.mkdir(parents=True, exist_ok=True)
    (config / "settings.toml").write_text(f'[providers.{PROVIDER}]\nbackend = "aws"\nami = "ami-1"\n{line}\n')
    result = mngr_cli("list")
    lines = result.err.strip().splitlines()
    assert result.code == 1 and len(lines) == 1, result.err
    assert lines[0].startswith(f"mngr: error: settings [providers.{PROVIDER}]: {expected}"), result.err


def test_good_address_overrides_and_timeouts_are_taken():
    from providers.aws import parse_address_override, positive_seconds

    assert parse_address_override("10.0.0.5", "p") == ("10.0.0.5", 22)
    assert parse_address_override("host.example:2222", "p") == ("host.example", 2222)
    assert parse_address_override("[::1]:2200", "p") == ("::1", 2200)
    assert parse_address_override("fe80::1", "p") == ("fe80::1", 22)
    assert positive_seconds("5m", "ready_timeout", "p") == 300 and positive_seconds(2.5, "t", "p") == 2.5


def test_an_empty_describe_answer_while_waiting_is_a_clear_error(cloud):
    env, set_rules = doctored_aws(cloud)
    set_rules(describe_by_id_empty=True)
    cloud.write(ready_timeout=3)
    result = cloud.cli("create", "ghost", "--in", PROVIDER, "--agent-cmd", "sleep 600", "--no-connect", env=env)
    assert result.code == 1 and "Traceback" not in result.err and "internal error" not in result.err, result.err
    assert "is not in aws ec2 describe-instances" in result.err, result.err
    assert [i["State"]["Name"] for i in cloud.emulator.instances()] == ["terminated"]


def test_a_refused_key_pair_delete_keeps_the_private_key(cloud):
    row = json.loads(cloud.cli.ok("create", "pair", "--in", PROVIDER, "--agent-cmd", "sleep 600",
                                  "--no-connect", "--json").out)
    env, set_rules = doctored_aws(cloud)
    set_rules(refuse_key_pair_delete=True)
    result = cloud.cli("destroy", "-f", "pair", env=env)
    assert result.code == 0 and "could not delete key pair" in result.err, result.err
    key = cloud.cli.home / ".ssh" / "mngr" / row["host_id"]
    assert key.exists() and Path(f"{key}.pub").exists()    # the pair is still in AWS: so is its key
    assert f"mngr-{row['host_id']}" in [p["KeyName"] for p in cloud.emulator.ec2("describe-key-pairs")["KeyPairs"]]


def test_backoff_is_bounded_exponential_with_jitter():
    from providers.aws import BACKOFF_CAP, backoff_delay

    ceilings = [backoff_delay(attempt, lambda: 1.0) for attempt in range(1, 12)]
    assert ceilings[:4] == [1.0, 2.0, 4.0, 8.0] and max(ceilings) == BACKOFF_CAP
    assert all(backoff_delay(attempt, lambda: 0.0) == 0.0 for attempt in range(1, 12))
    import random

    draws = {backoff_delay(3, random.Random(seed).random) for seed in range(20)}
    assert len(draws) > 10 and all(0 <= d <= 4.0 for d in draws)


def test_throttling_is_retried_with_backoff_then_succeeds(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import mngr
    from providers import aws

    ctx = mngr.Context(None, env={"HOME": str(tmp_path)}, settings={})
    provider = aws.AwsProvider(PROVIDER, {"backend": "aws", "region": "us-east-1"}, ctx)
    answers = [subprocess.CompletedProcess([], 254, "", "An error occurred (RequestLimitExceeded) "
                                                        "when calling the DescribeInstances operation")] * 4
    answers.append(subprocess.CompletedProcess([], 0, '{"Reservations": []}', ""))
    slept = []
    monkeypatch.setattr(mngr, "run", lambda *a, **k: answers.pop(0))
    monkeypatch.setattr(aws.time, "sleep", slept.append)
    monkeypatch.setattr(aws.random, "random", lambda: 0.5)
    assert provider.aws("describe-instances") == {"Reservations": []}
    assert slept == [0.5, 1.0, 2.0, 4.0] and provider.calls == 5


