"""The SSH provider against a real sshd on a loopback port.

Each test gets its own sshd (keys, config, pid file), its own provider
instance and machines whose host dirs, work roots and tmux sockets are its
own; teardown stops what it started, by pid and by socket.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need, wait_for
from sshd import TEST_USER, Sshd, have_sshd, have_test_user, sshd_without_python

PROVIDER = "lab"


def machine_toml(name: str, sshd: Sshd, root: Path, socket: str, **extra) -> str:
    conf = {"address": sshd.address, "port": sshd.port, "user": "root", "identity": sshd.identity,
            "host_dir": str(root / name / "host"), "work_root": str(root / name / "work"),
            "tmux_socket": f"{socket}-{name}", **extra}
    return f"[providers.{PROVIDER}.machines.{name}]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in conf.items())


class Lab:
    """The CLI, an sshd, and the machines of provider `lab` on it."""

    def __init__(self, cli, sshd: Sshd, root: Path):
        self.cli = cli
        self.sshd = sshd
        self.root = root
        self.machines = {}
        self.extra = ""
        self.base = f"watch_interval = 1\n[providers.{PROVIDER}]\nbackend = \"ssh\"\n" \
                    "connect_timeout = 3\ntimeout = 20\n"

    def add(self, name: str, sshd: Sshd = None, **extra) -> None:
        self.machines[name] = machine_toml(name, sshd or self.sshd, self.root, self.cli.socket, **extra)
        self.write()

    def write(self) -> None:
        config = self.cli.home / ".config" / "mngr"
        config.mkdir(parents=True, exist_ok=True)
        (config / "settings.toml").write_text(self.base + "".join(self.machines.values()) + self.extra)

    def trust_key(self, sshd: Sshd = None) -> None:
        known = self.cli.home / ".mngr" / "known_hosts"
        known.parent.mkdir(parents=True, exist_ok=True)
        with open(known, "a") as handle:
            handle.write((sshd or self.sshd).known_hosts_line())

    def tmux(self, machine: str, *args):
        """tmux on the machine's socket, as the machine's sshd sessions see it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        return subprocess.run(["tmux", "-L", f"{self.cli.socket}-{machine}", *args],
                              capture_output=True, text=True, env=env, timeout=10)

    def agents(self) -> dict:
        return {row["name"]: row for row in json.loads(self.cli.ok("list", "--json").out)}

    def host_dir(self, machine: str) -> Path:
        return self.root / machine / "host"


@pytest.fixture
def lab(mngr_cli, tmp_path):
    need(have_sshd(), "sshd (openssh-server) and root, to run it on a loopback port")
    sshd = Sshd(tmp_path / "sshd").start()
    lab = Lab(mngr_cli, sshd, tmp_path / "machines")
    lab.started, lab.cleanup = [sshd], []
    lab.add("m1")
    lab.trust_key()
    yield lab
    for name in lab.machines:
        lab.tmux(name, "kill-server")
        pid_file = lab.host_dir(name) / "watcher.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass
    for server in lab.started:
        server.stop()
    for undo in lab.cleanup:
        undo()


def test_agent_lifecycle_on_a_machine(lab):
    cli = lab.cli
    (cli.work / "README").write_text("hello\n")
    (cli.work / "big.log").write_text("x" * 1000)
    created = cli.ok("create", "a1", "--host", "m1", "--agent-cmd", "cat", "--exclude", "*.log",
                     "--no-connect", "--json")
    row = json.loads(created.out)
    assert row["provider"] == PROVIDER and row["host"] == "m1" and row["state"] == "running"
    work = Path(row["work_dir"])
    assert (work / "README").read_text() == "hello\n" and not (work / "big.log").exists()
    assert lab.tmux("m1", "has-session", "-t", "=mngr-a1").returncode == 0

    agents = lab.agents()
    assert agents["a1"]["state"] == "running" and agents["a1"]["host_state"] == "running"
    assert agents["a1"]["verified"] is True

    cli.ok("message", "a1", "-m", "ping over ssh")
    assert wait_for(lambda: "ping over ssh" in cli.ok("logs", "a1").out, timeout=10)
    out = cli.ok("exec", "a1", "pwd; echo $MNGR_AGENT_NAME").out.split()
    assert out == [str(work), "a1"]

    cli.ok("create", "a2", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect")
    agents = lab.agents()
    assert agents["a2"]["host_id"] == agents["a1"]["host_id"]

    cli.ok("stop", "a2")
    assert lab.agents()["a2"]["state"] == "stopped"
    assert lab.agents()["a1"]["state"] == "running"
    cli.ok("stop", "a1")
    agents = lab.agents()
    assert agents["a1"]["state"] == "stopped" and agents["a1"]["host_state"] == "stopped"

    cli.ok("start", "a1")
    agents = lab.agents()
    assert agents["a1"]["state"] == "running" and agents["a1"]["host_state"] == "running"

    cli.ok("destroy", "-f", "a2")
    assert "a2" not in lab.agents()
    cli.ok("destroy", "-f", "a1")
    assert lab.agents() == {}
    assert not lab.host_dir("m1").exists() and not work.exists()
    assert lab.tmux("m1", "has-session", "-t", "=mngr-a1").returncode != 0


def running_as(user: str) -> list:
    """The processes of a user that run (zombies, killed and not yet reaped, do not)."""
    states = subprocess.run(["ps", "-u", user, "-o", "stat="], capture_output=True, text=True).stdout
    return [s for s in states.split() if not s.startswith("Z")]


def host_state(lab, machine: str) -> str:
    """The state in the controller's own signed record of the machine's host."""
    for path in (lab.cli.home / ".mngr" / "hosts").glob("*/data.json"):
        payload = json.loads(path.read_text())["payload"]
        if payload["name"] == machine:
            return payload["state"]
    return "none"


def counting_ssh(lab) -> Path:
    """An `ssh` first on PATH that logs each call, then runs the real one."""
    bin_dir = lab.root / "count-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = lab.root / "ssh-calls"
    real = subprocess.run(["sh", "-c", "command -v ssh"], capture_output=True, text=True).stdout.strip()
    (bin_dir / "ssh").write_text(f"#!/bin/sh\necho call >> {log}\nexec {real} \"$@\"\n")
    (bin_dir / "ssh").chmod(0o755)
    return bin_dir, log


def test_list_makes_one_ssh_call_per_machine(lab):
    lab.add("m2")
    for machine, names in (("m1", ("a", "b")), ("m2", ("c", "d"))):
        for name in names:
            lab.cli.ok("create", name, "--host", machine, "--agent-cmd", "sleep 600", "--no-connect")
    bin_dir, log = counting_ssh(lab)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    rows = json.loads(lab.cli.ok("list", "--json", env=env).out)
    assert sorted(r["name"] for r in rows) == ["a", "b", "c", "d"]
    assert all(r["state"] == "running" for r in rows)
    assert len(log.read_text().splitlines()) == 2   # two machines, four agents


def test_watcher_on_the_machine_stops_idle_agents_and_may_power_it_off(lab):
    marker = lab.root / "powered-off"
    lab.add("m1", allow_shutdown=True, shutdown_command=f"touch {marker}")
    lab.cli.ok("create", "quiet", "--host", "m1", "--agent-cmd", "sleep 600", "--idle-timeout", "3s",
               "--no-connect")
    assert lab.tmux("m1", "has-session", "-t", "=mngr-quiet").returncode == 0
    # idle timeout 3s, watch interval 1s: stopped within a few seconds more
    assert wait_for(lambda: lab.tmux("m1", "has-session", "-t", "=mngr-quiet").returncode != 0,
                    timeout=15)
    assert wait_for(marker.exists, timeout=5)
    events = [json.loads(line) for line in
              (lab.host_dir("m1") / "events" / "watcher.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "shutting_down"]
    assert lab.agents()["quiet"]["state"] == "stopped"


def test_unknown_host_key_is_refused_with_its_fingerprint(lab):
    (lab.cli.home / ".mngr" / "known_hosts").unlink()
    result = lab.cli("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect")
    assert result.code == 1
    assert "unknown host key for machine m1" in result.err and "SHA256:" in result.err
    assert "--accept-host-key" in result.err and "Traceback" not in result.err
    assert not lab.host_dir("m1").exists()            # nothing was made
    assert lab.agents() == {}
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(lab.sshd.root / "host_key.pub")],
                                 capture_output=True, text=True).stdout.split()[1]
    assert fingerprint in result.err
    lab.cli.ok("host", "check", "m1", "--accept-host-key")
    lab.cli.ok("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect")


def test_a_changed_host_key_is_refused(lab):
    known = lab.cli.home / ".mngr" / "known_hosts"
    other = Sshd(lab.root / "other-sshd")   # keys only: never started
    known.write_text(f"[{lab.sshd.address}]:{lab.sshd.port} "
                     + " ".join((other.root / "host_key.pub").read_text().split()[:2]) + "\n")
    result = lab.cli("host", "check", "m1")
    assert result.code == 1 and "has changed" in result.err, result.err


def test_host_add_list_check_remove(lab):
    cli = lab.cli
    target = f"root@{lab.sshd.address}:{lab.sshd.port}"
    result = cli("host", "add", "box", "--ssh", target, "--identity", lab.sshd.identity, "--in", PROVIDER,
                 "--host-dir", str(lab.root / "box" / "host"), "--work-root", str(lab.root / "box" / "work"))
    assert result.code == 0, result.err   # the key is known already
    rows = {r["name"]: r for r in json.loads(cli.ok("host", "list", "--json").out)}
    assert rows["box"]["source"] == "added" and rows["box"]["address"] == target
    assert rows["m1"]["source"] == "settings"
    assert json.loads(cli.ok("host", "check", "box", "--json").out)["ok"] is True
    assert cli("host", "add", "box", "--ssh", target, "--in", PROVIDER).code == 1
    assert cli("host", "remove", "m1").code == 1        # from settings: said so
    cli.ok("create", "onbox", "--host", "box", "--agent-cmd", "sleep 600", "--no-connect")
    refused = cli("host", "remove", "box")
    assert refused.code == 1 and "still has agents" in refused.err
    cli.ok("destroy", "-f", "onbox")
    cli.ok("host", "remove", "box")
    assert "box" not in {r["name"] for r in json.loads(cli.ok("host", "list", "--json").out)}
    bad = cli("host", "add", "x", "--ssh", "root@:22", "--in", PROVIDER)
    assert bad.code == 2 and "bad --ssh" in bad.err


def test_authentication_refused(lab):
    (lab.sshd.root / "authorized_keys").write_text("")
    result = lab.cli("host", "check", "m1")
    assert result.code == 1 and "refused authentication" in result.err, result.err


def test_unreachable_machine_is_exit_75_and_enforce_leaves_it_alone(lab):
    cli = lab.cli
    cli.ok("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect",
           "--idle-timeout", "1s")
    # the machine goes away: its connections (the control master's among them), then sshd
    subprocess.run(["pkill", "-TERM", "-P", str(lab.sshd.pid)], capture_output=True)
    lab.sshd.stop()
    lab.started.remove(lab.sshd)
    started = time.monotonic()
    result = cli("enforce", "--json")
    assert result.code == 75, result.err
    assert time.monotonic() - started < 30
    rows = json.loads(result.out)
    assert rows[0]["result"] == "error" and "cannot reach machine m1" in rows[0]["error"]
    audit = [json.loads(line) for line in (cli.home / ".mngr" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["host"] == "m1" and audit[-1]["unreachable"] is True
    listed = json.loads(cli.ok("list", "--json").out)
    assert listed[0]["state"] == "unknown" and listed[0]["host_state"] == "unreachable"
    assert host_state(lab, "m1") == "running"     # not marked stopped on no information


def test_enforce_over_a_cut_link_is_bounded_and_acts_on_nothing(lab):
    from sshd import Netns

    need(subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0,
         "ip netns (iproute2) and root")
    netns = Netns(f"{os.getpid() % 100000}").create()
    try:
        far = Sshd(lab.root / "far-sshd", address=netns.address, netns=netns.name).start()
        lab.started.append(far)
        lab.add("far", sshd=far)
        lab.trust_key(far)
        lab.cli.ok("create", "near", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect")
        lab.cli.ok("create", "away", "--host", "far", "--agent-cmd", "sleep 600", "--no-connect",
                   "--max-lifetime", "1s")
        time.sleep(1.5)     # past its max lifetime: enforce would stop it, if it could reach it
        netns.cut()
        started = time.monotonic()
        result = lab.cli("enforce", "--json", timeout=120)
        took = time.monotonic() - started
        assert result.code == 75, result.err
        assert took < 45, took      # connect timeout 3s, call timeout 20s: bounded
        rows = {r["host"]: r for r in json.loads(result.out)}
        assert rows["far"]["result"] == "error" and rows["far"]["unreachable"] is True
        assert rows["m1"]["result"] == "ok", result.out     # the other machine was still handled
        audit = [json.loads(line) for line in
                 (lab.cli.home / ".mngr" / "audit.jsonl").read_text().splitlines()]
        assert any(a["host"] == "far" and a["unreachable"] for a in audit)
        assert host_state(lab, "far") == "running"     # not marked stopped on no information
        netns.mend()
        result = lab.cli("enforce", "--json", timeout=120)
        rows = {r["host"]: r for r in json.loads(result.out)}
        assert result.code == 0 and rows["far"]["action"] == "stop" and rows["far"]["result"] == "done"
        assert host_state(lab, "far") == "stopped"
        assert lab.tmux("far", "has-session", "-t", "=mngr-away").returncode != 0
    finally:
        netns.delete()


def test_a_machine_without_python3_is_said_so(lab):
    need(have_test_user(), f"the test user {TEST_USER} (make test adds it)")
    nopy = sshd_without_python()
    lab.cleanup.append(lambda: shutil.rmtree(nopy.root.parent, ignore_errors=True))
    nopy.start()
    lab.started.append(nopy)
    lab.add("nopy", sshd=nopy, user=TEST_USER, host_dir="~/.mngr-host-nopy", work_root="~/w-nopy")
    lab.trust_key(nopy)
    result = lab.cli("create", "a", "--host", "nopy", "--agent-cmd", "sleep 600", "--no-connect")
    assert result.code == 1
    assert "machine nopy cannot run agents: python3 is not installed there" in result.err, result.err
    assert lab.agents() == {} and not Path(f"/home/{TEST_USER}/.mngr-host-nopy").exists()
    check = lab.cli("host", "check", "nopy")
    assert check.code == 1 and "python3 is not installed there" in check.err


def test_a_full_disk_while_copying_leaves_nothing_behind(lab):
    work_root = lab.root / "m1" / "work"
    work_root.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(work_root)],
                             capture_output=True)
    need(mounted.returncode == 0, "mounting a tmpfs (root)")
    try:
        (lab.cli.work / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        result = lab.cli("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect")
        assert result.code == 1
        assert "to machine m1 failed: its disk is full" in result.err, result.err
        assert "--exclude" in result.err and "Traceback" not in result.err
        assert lab.agents() == {}
        assert list(work_root.iterdir()) == [] and not lab.host_dir("m1").exists()
        assert not list((lab.cli.home / ".mngr" / "hosts").glob("*/data.json"))
        # with the big file left out it fits
        lab.cli.ok("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect",
                   "--exclude", "*.bin")
        lab.cli.ok("destroy", "-f", "a")
    finally:
        lab.tmux("m1", "kill-server")
        subprocess.run(["umount", "-l", str(work_root)], capture_output=True)


def test_a_docker_engine_reached_over_ssh(lab):
    from test_docker import IMAGE, docker

    ok = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    need(bool(ok), "a running Docker engine (make test starts one)")
    need(docker("image", "inspect", IMAGE, check=False).returncode == 0, f"the test image {IMAGE}")
    name = f"rd{os.getpid()}"
    lab.extra = (f"[providers.{name}]\nbackend = \"docker\"\nimage = \"{IMAGE}\"\n"
                 f"docker_host = \"ssh://root@{lab.sshd.address}:{lab.sshd.port}\"\n"
                 f"ssh_identity = \"{lab.sshd.identity}\"\n"
                 "labels = { \"com.imbue.mngr.test\" = \"1\" }\n")
    lab.write()
    bin_dir, log = counting_ssh(lab)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    try:
        lab.cli.ok("create", "boxed", "--in", name, "--agent-cmd", "sleep 600", "--no-connect", env=env)
        assert log.exists() and len(log.read_text().splitlines()) >= 1   # docker went through ssh
        rows = json.loads(lab.cli.ok("list", "--json", env=env).out)
        assert [(r["name"], r["provider"], r["state"]) for r in rows] == [("boxed", name, "running")]
        ids = docker("ps", "-q", "--filter", f"label=com.imbue.mngr.provider={name}").stdout.split()
        assert len(ids) == 1
        assert docker("inspect", "-f", "{{.HostConfig.NetworkMode}}", ids[0]).stdout.strip() == "none"
        enforced = lab.cli("enforce", "--json", env=env)
        assert enforced.code == 0, enforced.err
        lab.cli.ok("stop", "boxed", env=env)
        assert docker("inspect", "-f", "{{.State.Running}}", ids[0]).stdout.strip() == "false"
        assert json.loads(lab.cli.ok("list", "--json", env=env).out)[0]["state"] == "stopped"
        lab.cli.ok("destroy", "-f", "boxed", env=env)
        assert docker("ps", "-aq", "--filter", f"label=com.imbue.mngr.provider={name}").stdout == ""
        lab.cli.ok("create", "again", "--in", name, "--agent-cmd", "sleep 600", "--no-connect", env=env)
        subprocess.run(["pkill", "-TERM", "-P", str(lab.sshd.pid)], capture_output=True)
        lab.sshd.stop()
        down = lab.cli("list", env=env)
        assert down.code == 75, down.err
        assert f"cannot reach the Docker engine at ssh://root@{lab.sshd.address}" in down.err
    finally:
        ids = docker("ps", "-aq", "--filter", f"label=com.imbue.mngr.provider={name}").stdout.split()
        if ids:
            docker("rm", "-f", *ids, check=False)


def test_untrusted_machine_runs_agents_as_agent_user_and_enforce_kills_them_all(lab):
    need(have_test_user(), f"the test user {TEST_USER} (make test adds it)")
    refused = lab.cli("create", "a", "--host", "m1", "--trust", "untrusted", "--agent-cmd", "sleep 600",
                      "--no-connect")
    assert refused.code == 1 and "has no agent_user" in refused.err, refused.err
    tag = f"{os.getpid()}-{lab.cli.socket[-6:]}"
    home = Path(f"/home/{TEST_USER}")
    lab.cleanup.append(lambda: subprocess.run(["rm", "-rf", str(home / f".mngr-host-{tag}"),
                                               str(home / f"w-{tag}")]))
    lab.add("ua", agent_user=TEST_USER, host_dir=f"~/.mngr-host-{tag}", work_root=f"~/w-{tag}")

    def as_agent_user(*argv):
        return subprocess.run(["runuser", "-u", TEST_USER, "--", *argv], capture_output=True, text=True,
                              timeout=10)
    lab.cleanup.append(lambda: as_agent_user("tmux", "-L", f"{lab.cli.socket}-ua", "kill-server"))
    # the agent leaves a process behind outside tmux, as hostile code would
    lab.cli.ok("create", "hostile", "--host", "ua", "--trust", "untrusted", "--max-lifetime", "3s",
               "--agent-cmd", f"setsid sleep 997{os.getpid() % 10} & sleep 600", "--no-connect")
    row = lab.agents()["hostile"]
    assert row["state"] == "running" and row["work_dir"].startswith(str(home))
    assert as_agent_user("tmux", "-L", f"{lab.cli.socket}-ua", "has-session", "-t", "=mngr-hostile"
                         ).returncode == 0
    stray = f"sleep 997{os.getpid() % 10}"
    assert wait_for(lambda: subprocess.run(["pgrep", "-u", TEST_USER, "-f", stray],
                                           capture_output=True).returncode == 0, timeout=5)
    # the agent kills the machine's watcher: enforce outside is what stops it
    pid_file = home / f".mngr-host-{tag}" / "watcher.pid"
    if pid_file.exists():
        as_agent_user("kill", pid_file.read_text().strip())
    time.sleep(3.5)
    result = lab.cli("enforce", "--json")
    rows = {r["host"]: r for r in json.loads(result.out)}
    assert rows["ua"]["action"] == "stop" and rows["ua"]["result"] == "done", result.out + result.err
    assert "max lifetime" in rows["ua"]["reason"]
    assert wait_for(lambda: not running_as(TEST_USER), timeout=5)   # nothing of the agents' user
    # survives, the stray process included
    assert host_state(lab, "ua") == "stopped"
    lab.cli.ok("destroy", "-f", "hostile")
    assert not (home / f".mngr-host-{tag}").exists()


def test_enforce_powers_off_an_idle_machine_that_allows_it(lab):
    marker = lab.root / "powered-off-by-enforce"
    lab.add("m1", allow_shutdown=True, shutdown_command=f"touch {marker}")
    lab.cli.ok("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--max-lifetime", "2s",
               "--no-connect")
    pid_file = lab.host_dir("m1") / "watcher.pid"
    assert wait_for(pid_file.exists, timeout=5)
    os.kill(int(pid_file.read_text()), 9)   # the watcher is gone: enforce is the backstop
    time.sleep(2.5)
    result = lab.cli("enforce", "--json")
    row = json.loads(result.out)[0]
    assert result.code == 0 and row["action"] == "stop" and row["result"] == "done", result.out
    assert marker.exists()
    assert host_state(lab, "m1") == "stopped"


def untrusted_machine(lab):
    """Machine "ua", whose agents run as the unprivileged test user: its home, and this
    test's tag in the names of the dirs it gets there (removed afterwards)."""
    need(have_test_user(), f"the test user {TEST_USER} (make test adds it)")
    tag = f"{os.getpid()}-{lab.cli.socket[-6:]}"
    home = Path(f"/home/{TEST_USER}")
    lab.cleanup.append(lambda: subprocess.run(["rm", "-rf", str(home / f".mngr-host-{tag}"),
                                               str(home / f"w-{tag}")]))
    lab.add("ua", agent_user=TEST_USER, host_dir=f"~/.mngr-host-{tag}", work_root=f"~/w-{tag}")
    return home, tag


def test_an_untrusted_host_cannot_pass_for_unreachable(lab):
    """Its copied-in mngr.py is the agents' to rewrite: one that exits 255 (as ssh does when
    it cannot connect) or hangs is a host that will not report, stopped as tampered."""
    home, tag = untrusted_machine(lab)
    lab.cli.ok("create", "liar", "--host", "ua", "--trust", "untrusted", "--agent-cmd", "sleep 600",
               "--no-connect")
    script = home / f".mngr-host-{tag}" / "bin" / "mngr.py"
    subprocess.run(["runuser", "-u", TEST_USER, "--", "sh", "-c",
                    f"printf 'import sys\\nsys.exit(255)\\n' > {script}"], check=True)
    result = lab.cli("enforce", "--json")
    row = {r["host"]: r for r in json.loads(result.out)}["ua"]
    assert row["action"] == "stop" and row["cause"] == "tampered", result.out
    assert row["result"] == "done", result.out + result.err
    assert not running_as(TEST_USER)


HOSTILE_REPORTS = {
    # the report hangs: killed well before the ssh call's own timeout
    "hangs": "import time\ntime.sleep(600)\n",
    # the report leaves a process behind holding its output open, then says nothing useful
    "holds its output": "import subprocess\nsubprocess.Popen(['setsid', 'sleep', '600'])\nprint('{}')\n",
}


@pytest.mark.parametrize("how", sorted(HOSTILE_REPORTS))
def test_a_report_that_hangs_or_holds_the_channel_is_a_failed_report(lab, how):
    """An untrusted host whose report never ends is a host that failed to report
    (stopped), not one that cannot be reached (left alone)."""
    lab.base = lab.base.replace("timeout = 20", "timeout = 12")   # reports get 12-3-5 = 4s
    home, tag = untrusted_machine(lab)
    lab.cli.ok("create", "stuck", "--host", "ua", "--trust", "untrusted", "--agent-cmd", "sleep 600",
               "--no-connect")
    pid_file = home / f".mngr-host-{tag}" / "watcher.pid"
    if pid_file.exists():   # the watcher would not report on its host either
        subprocess.run(["runuser", "-u", TEST_USER, "--", "kill", pid_file.read_text().strip()])
    script = home / f".mngr-host-{tag}" / "bin" / "mngr.py"
    hostile = "import sys\nif 'host-report' not in sys.argv:\n    sys.exit(0)\n" + HOSTILE_REPORTS[how]
    subprocess.run(["runuser", "-u", TEST_USER, "--", "sh", "-c", f"cat > {script}"], input=hostile,
                   text=True, check=True)
    started = time.monotonic()
    result = lab.cli("enforce", "--json", timeout=120)
    took = time.monotonic() - started
    row = {r["host"]: r for r in json.loads(result.out)}["ua"]
    assert not row.get("unreachable"), result.out
    assert row["action"] == "stop" and row["cause"] == "tampered", result.out
    assert row["result"] == "done", result.out + result.err
    assert took < 40, took
    assert wait_for(lambda: not running_as(TEST_USER), timeout=5)   # the stray process too


def test_login_shell_noise_is_not_taken_for_the_report(lab):
    """A machine whose login shell prints first (a chatty rc file), even a line that
    looks like mngr's: creating there works, and its report is read as it is."""
    noisy = Sshd(lab.root / "noisy-sshd", extra=(
        'ForceCommand echo "mngr-facts 99999999999"; echo "mngr-out-0"; echo "welcome to m1"; '
        'eval "$SSH_ORIGINAL_COMMAND"\n')).start()
    lab.started.append(noisy)
    lab.add("m1", sshd=noisy)
    lab.trust_key(noisy)
    assert json.loads(lab.cli.ok("host", "check", "m1", "--json").out)["ok"] is True
    lab.cli.ok("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect",
               "--max-lifetime", "2s")
    row = lab.agents()["a"]
    assert row["state"] == "running" and row["verified"] is True, row
    pid_file = lab.host_dir("m1") / "watcher.pid"
    assert wait_for(pid_file.exists, timeout=5)
    os.kill(int(pid_file.read_text()), 9)   # enforce judges it: by its real boot time
    time.sleep(2.5)
    result = lab.cli("enforce", "--json")
    row = json.loads(result.out)[0]
    assert row["action"] == "stop" and row["cause"] == "lifetime", result.out
    assert row["result"] == "done", result.out + result.err


def flaky_ssh(lab, when: str) -> dict:
    """The env of an `ssh` first on PATH that, for the call whose remote command holds
    `when`, runs it and then fails as ssh does when the link drops (exit 255)."""
    bin_dir = lab.root / "flaky-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    real = shutil.which("ssh")
    (bin_dir / "ssh").write_text(f'#!/bin/sh\ncase "$*" in *"{when}"*) {real} "$@"; exit 255;; esac\n'
                                 f'exec {real} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_create_that_fails_late_removes_what_it_made_and_only_that(lab):
    env = flaky_ssh(lab, "deploy --tmux-socket")    # the agent started there; ssh says no
    result = lab.cli("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect", env=env)
    assert result.code != 0 and "Traceback" not in result.err, result.err
    assert lab.tmux("m1", "has-session", "-t", "=mngr-a").returncode != 0
    assert not (lab.root / "m1").exists()       # host dir and work root: this create made them
    assert lab.agents() == {}
    assert not list((lab.cli.home / ".mngr" / "hosts").glob("*/data.json"))
    # a work root that was there before stays, with what was in it
    keep = lab.root / "m2" / "work" / "keep"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    lab.add("m2")
    result = lab.cli("create", "b", "--host", "m2", "--agent-cmd", "sleep 600", "--no-connect", env=env)
    assert result.code != 0
    assert keep.read_text() == "mine" and sorted(p.name for p in keep.parent.iterdir()) == ["keep"]
    assert not lab.host_dir("m2").exists(), sorted(lab.host_dir("m2").rglob("*"))
    assert lab.tmux("m2", "has-session", "-t", "=mngr-b").returncode != 0
    lab.cli.ok("create", "b", "--host", "m2", "--agent-cmd", "sleep 600", "--no-connect")


def test_a_create_that_fails_installing_leaves_nothing_behind(lab):
    machine = lab.root / "m1"
    machine.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(machine)],
                             capture_output=True)
    need(mounted.returncode == 0, "mounting a tmpfs (root)")
    try:
        result = lab.cli("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect")
        assert result.code == 1 and "Traceback" not in result.err, result.err
        assert list(machine.iterdir()) == []      # no host dir, no work root: mngr.py did not fit
        assert lab.agents() == {}
    finally:
        subprocess.run(["umount", "-l", str(machine)], capture_output=True)


def test_a_failed_power_off_is_a_failed_stop(lab):
    lab.add("m1", allow_shutdown=True, shutdown_command="echo no power switch here >&2; false")
    lab.cli.ok("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--max-lifetime", "2s",
               "--no-connect")
    pid_file = lab.host_dir("m1") / "watcher.pid"
    assert wait_for(pid_file.exists, timeout=5)
    os.kill(int(pid_file.read_text()), 9)   # enforce, not the watcher, powers it off
    time.sleep(2.5)
    result = lab.cli("enforce", "--json")
    row = json.loads(result.out)[0]
    assert result.code == 1 and row["action"] == "stop" and row["result"] == "error", result.out
    assert "powering off machine m1 failed" in row["error"] and "no power switch" in row["error"]
    assert lab.tmux("m1", "has-session", "-t", "=mngr-a").returncode != 0   # its agents did stop
    assert host_state(lab, "m1") == "stopping"     # not stopped: enforce forces it later


def test_control_sockets_fit_a_unix_socket_path(lab):
    """ssh binds <dir>/<40 hex>.<16 random> first, and a unix socket path has at most
    107 bytes: a control dir of 49 bytes works, one of 50 does not (a short one instead)."""
    for length in (49, 50):
        pad = "p" * (length - len("/tmp/") - len("/.mngr/ssh"))
        link = Path("/tmp") / pad      # the same home, by a path of the length wanted
        assert len(str(link / ".mngr" / "ssh")) == length
        link.symlink_to(lab.cli.home)
        lab.cleanup.append(link.unlink)
        result = lab.cli("host", "check", "m1", "-v", env={"HOME": str(link)})
        assert result.code == 0, result.err
        used = [a[len("ControlPath="):] for line in result.err.splitlines() if "run: ssh" in line
                for a in line.split() if a.startswith("ControlPath=")]
        assert used and used[0].endswith("/%C"), result.err
        control = used[0][:-len("/%C")]
        assert len(control) + 1 + 40 + 1 + 16 <= 107, control
        assert (control == str(link / ".mngr" / "ssh")) == (length == 49), control
        assert any(p.is_socket() for p in Path(control).iterdir())   # its control master


def test_exec_keeps_env_secrets_off_command_lines(lab):
    secret = f"s3cret-{os.getpid()}"
    lab.cli.ok("create", "a", "--host", "m1", "--agent-cmd", "sleep 600", "--no-connect",
               "--env", f"TOKEN={secret}", "--grant", "env:TOKEN")
    bin_dir = lab.root / "argv-bin"
    bin_dir.mkdir()
    log = lab.root / "ssh-argv"
    real = shutil.which("ssh")
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {real} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    out = lab.cli.ok("exec", "a", "echo \"[$TOKEN]\"; pwd; ls /tmp | grep -c mngr-exec || true",
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}).out.split()
    assert out[0] == f"[{secret}]" and out[1].endswith("/work/a") and out[2] == "0", out
    assert log.read_text() and secret not in log.read_text()


@pytest.mark.parametrize("value", ["~", "~/", "/", "", "relative/dir", "/a/../..", "~/.."])
def test_machine_dirs_must_be_absolute_and_below_home_or_root(lab, value):
    lab.add("m1", host_dir=value)
    result = lab.cli("host", "list")
    assert result.code == 1, result.err
    assert result.err.startswith("mngr: error: ") and len(result.err.strip().splitlines()) == 1
    assert "machine m1: host_dir must be an absolute path or ~/path" in result.err
    lab.add("m1")
    bad = lab.cli("host", "add", "x", "--ssh", f"root@{lab.sshd.address}:{lab.sshd.port}",
                  "--in", PROVIDER, "--work-root", value or "~")
    assert bad.code == 1 and "work_root must be an absolute path or ~/path" in bad.err, bad.err
