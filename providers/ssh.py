"""The SSH provider: hosts are existing machines, reached with the system ssh.

A machine is its own provider: nothing on it can be certified against code
that has root there. What this module believes comes from the controller's
signed records under ~/.mngr/hosts/<host-id>/, from reaching the machine at
all, and from its boot time (/proc/stat, read by a script the controller
sends, as the user mngr connects as). Everything the copied-in mngr.py
reports is reported data. With trust = untrusted, agents run as another,
unprivileged user (agent_user), so the user mngr connects as stays theirs
to stop: `mngr enforce` kills every process of that user.

Calls per `list`: one ssh per machine that has agents, in parallel, through
a control master, so a warm `list` costs one multiplexed round trip each.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import stat
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mngr

from .remote import CopyPlan, RecordKeeper, clean_report, need_terminal, one_at_a_time

CONTROL_PERSIST = 300          # seconds an idle control master stays up
REPORT_TIMEOUT = 20            # seconds the in-host part of a report may take, at most
REPORT_MARGIN = 5              # seconds of the ssh call's timeout kept beyond the in-host part
REPORT_MAX_BYTES = 16 << 20    # a report longer than this is cut short (and then malformed)
CONNECT_TIMEOUT = 10           # seconds to set up a connection
CALL_TIMEOUT = 60.0            # seconds for one remote command, unless told
COPY_TIMEOUT = 1800.0          # seconds for copying a work dir
PARALLEL = 8                   # machines queried at once
EXIT_NO_AGENT_USER = 93        # the remote script's sentinel: agent_user does not exist there
EXIT_NO_TIMEOUT = 94           # the remote script's sentinel: no timeout(1) there
EXIT_POWER_OFF_FAILED = 95     # the stop script's sentinel: agents stopped, the power-off failed
SSH_FAILED = 255               # ssh's own exit code: it never ran the command
CONTROL_DIR_MAX = 49           # longest control dir: ssh adds /%C (41) and, while binding, .<16 random>;
                               # a unix socket path has at most 107 bytes
FACTS_MARK = "mngr-facts"
NO_REPORT_MARK = "mngr-no-host-dir"
MACHINE_KEYS = {"address": str, "port": int, "user": str, "identity": str, "host_dir": str,
                "work_root": str, "tmux_socket": str, "allow_shutdown": bool,
                "shutdown_command": str, "agent_user": str, "proxy_jump": str}


@dataclass(frozen=True)
class Machine:
    """One machine mngr reaches over ssh, as settings or `mngr host add` describe it."""

    name: str
    address: str
    port: int = 22
    user: str = ""
    identity: str = ""
    host_dir: str = "~/.mngr-host"      # ~ is the home of the user agents run as
    work_root: str = "~/mngr-work"
    tmux_socket: str = mngr.DEFAULT_ROOT_NAME
    allow_shutdown: bool = False
    shutdown_command: str = ""          # default: shutdown -h now (through sudo when not root)
    agent_user: str = ""
    proxy_jump: str = ""                # ssh -J: reach it through this host
    source: str = "settings"            # settings, or added (by mngr host add)
    known_hosts: str = ""               # a host's own known_hosts file (cloud hosts), else mngr's

    @property
    def where(self) -> str:
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.user + '@' if self.user else ''}{address}:{self.port}"

    @classmethod
    def from_conf(cls, name: str, conf, where: str, source: str) -> "Machine":
        mngr.validate_name(name, "machine name")
        if not isinstance(conf, dict) or not isinstance(conf.get("address"), str) or not conf["address"]:
            raise mngr.ConfigError(f"{where}: machine {name} needs address = \"host\"")
        values = {}
        for key, value in conf.items():
            if key not in MACHINE_KEYS:
                raise mngr.ConfigError(f"{where}: machine {name}: unknown key {key!r}",
                                       "known: " + ", ".join(sorted(MACHINE_KEYS)))
            kind = MACHINE_KEYS[key]
            if kind is int and isinstance(value, bool) or not isinstance(value, kind):
                raise mngr.ConfigError(f"{where}: machine {name}: {key} must be a {kind.__name__}")
            values[key] = value
        machine = cls(name=name, source=source, **values)
        if not 0 < machine.port < 65536:
            raise mngr.ConfigError(f"{where}: machine {name}: port {machine.port} is out of range")
        if machine.agent_user and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", machine.agent_user):
            raise mngr.ConfigError(f"{where}: machine {name}: bad agent_user {machine.agent_user!r}")
        for key in ("host_dir", "work_root"):
            check_machine_dir(getattr(machine, key), f"{where}: machine {name}: {key}")
        return machine

    def to_conf(self) -> dict:
        defaults = Machine(self.name, self.address)
        return {k: v for k, v in asdict(self).items()
                if k in MACHINE_KEYS and (k == "address" or v != getattr(defaults, k))}


def check_machine_dir(path: str, what: str) -> None:
    """host_dir and work_root: an absolute path or ~/path below the home dir, never the
    home dir or / itself (destroy removes them: rm -rf)."""
    if path.startswith("~/"):
        rest = path[2:]
    elif path.startswith("/"):
        rest = path
    else:
        rest = ""
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\n" in path or "\0" in path:
        raise mngr.ConfigError(f"{what} must be an absolute path or ~/path below the home dir, "
                               f"not {path!r}")


def parse_target(text: str):
    """user@host[:port] (or user@[v6]:port) to (user, address, port)."""
    match = re.fullmatch(r"(?:([^@\s:]+)@)?(\[[0-9A-Fa-f:.]+\]|[^@\s:\[\]]+)(?::([0-9]{1,5}))?", text or "")
    if not match:
        raise mngr.UsageError(f"bad --ssh {text!r}", "use user@host or user@host:port")
    user, address, port = match.groups()
    return user or "", address.strip("[]"), int(port or 22)


# The ssh command ##############################################################


def control_dir(user_dir: Path) -> Path:
    """Where control sockets live: under the user's mngr dir, or a short path beside
    it when that is too long for a unix socket."""
    wanted = user_dir / "ssh"
    if len(str(wanted)) > CONTROL_DIR_MAX:
        digest = hashlib.sha256(str(user_dir).encode()).hexdigest()[:12]
        wanted = Path("/tmp") / f"mngr-ssh-{os.getuid()}-{digest}"
    wanted.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(wanted)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise mngr.RefusedError(f"{wanted} is not a directory of this user: not using it for ssh "
                                "control sockets", "remove it, then run mngr again")
    os.chmod(wanted, 0o700)
    return wanted


def known_hosts(user_dir: Path) -> Path:
    return user_dir / "known_hosts"


def ssh_options(user_dir: Path, identity: str = "", connect_timeout=CONNECT_TIMEOUT,
                accept_new: bool = False, known: str = "") -> list:
    """The options of every ssh mngr runs: no prompts, a bounded connect, host keys
    checked against mngr's known_hosts and the user's, one control master per
    machine. The user's own ssh config and agent still apply."""
    options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(connect_timeout)}",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2",
               "-o", "StrictHostKeyChecking=" + ("accept-new" if accept_new else "yes"),
               "-o", f"UserKnownHostsFile={known or known_hosts(user_dir)} ~/.ssh/known_hosts",
               "-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir(user_dir)}/%C",
               "-o", f"ControlPersist={CONTROL_PERSIST}"]
    if identity:
        options += ["-i", str(Path(identity).expanduser()), "-o", "IdentitiesOnly=yes"]
    return options


def ssh_wrapper(user_dir: Path, identity: str = "", connect_timeout=CONNECT_TIMEOUT) -> Path:
    """A directory holding an `ssh` that adds mngr's options: put first on PATH for
    programs that run ssh themselves (docker's ssh:// transport)."""
    real = shutil.which("ssh")
    if real is None:
        raise mngr.ToolMissingError("ssh not found on PATH", "install it, e.g. apt-get install openssh-client")
    options = " ".join(shlex.quote(o) for o in ssh_options(user_dir, identity, connect_timeout))
    script = f"#!/bin/sh\nexec {shlex.quote(real)} {options} \"$@\"\n".encode()
    digest = hashlib.sha256(script).hexdigest()[:12]
    directory = control_dir(user_dir) / f"bin-{digest}"
    if not (directory / "ssh").exists():
        directory.mkdir(parents=True, exist_ok=True)
        mngr.atomic_write(directory / "ssh", script, mode=0o755)
    return directory


class Ssh:
    """ssh to machines: one process per call, bounded, errors classified."""

    def __init__(self, ctx, connect_timeout=CONNECT_TIMEOUT, timeout=CALL_TIMEOUT):
        self.env = dict(ctx.env)
        self.user_dir = mngr.user_dir(ctx.env)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.calls = 0

    def argv(self, machine: Machine, remote: str, tty: bool = False, accept_new: bool = False) -> list:
        argv = ["ssh", *ssh_options(self.user_dir, machine.identity, self.connect_timeout, accept_new,
                                    machine.known_hosts), "-p", str(machine.port)]
        if machine.user:
            argv += ["-l", machine.user]
        if machine.proxy_jump:
            argv += ["-J", machine.proxy_jump]
        argv += ["-t" if tty else "-T", "--", machine.address, remote]
        return argv

    def run(self, machine: Machine, script: str, *, input=None, timeout=None, text=True,
            capture=True, tty=False, accept_new=False):
        """Run a sh script on the machine. ssh failing (exit 255) raises: unreachable
        (exit 75), an unknown or changed host key, or refused authentication."""
        timeout = self.timeout if timeout is None else timeout
        self.calls += 1
        try:
            result = mngr.run(self.argv(machine, "sh -c " + shlex.quote(script), tty, accept_new),
                              check=False, input=input, timeout=timeout, env=self.env, text=text,
                              capture=capture, what=f"ssh {machine.name}")
        except mngr.CommandTimedOutError:
            raise mngr.UnreachableError(
                f"machine {machine.name} ({machine.where}) did not answer within {timeout:g}s",
                "is it up, and its network? mngr enforce leaves it alone until it answers") from None
        if capture and result.returncode == SSH_FAILED:
            raise self.failure(machine, result.stderr)
        return result

    def failure(self, machine: Machine, stderr: str) -> mngr.MngrError:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        tail = lines[-1] if lines else "ssh failed"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            return mngr.RefusedError(
                f"the host key of machine {machine.name} ({machine.where}) has changed: refusing to connect",
                "if the machine was re-installed, remove its old key from "
                f"{known_hosts(self.user_dir)} and check it again: mngr host check {machine.name}")
        if "Host key verification failed" in stderr or "host key is known" in stderr:
            return mngr.RefusedError(
                f"unknown host key for machine {machine.name} ({machine.where}): "
                f"{self.fingerprint(machine) or 'fingerprint unavailable'}",
                f"if that is the machine's key, accept it: mngr host check {machine.name} --accept-host-key")
        if "Permission denied" in stderr or "Too many authentication failures" in stderr:
            return mngr.RefusedError(
                f"machine {machine.name} ({machine.where}) refused authentication",
                "check its user and identity file (mngr host list) and its authorized_keys")
        return mngr.UnreachableError(f"cannot reach machine {machine.name} ({machine.where}): {tail} "
                                     f"(connect timeout {self.connect_timeout:g}s)",
                                     "is it up, and sshd running? mngr enforce retries on its next run")

    def fingerprint(self, machine: Machine) -> str:
        """The key the machine offers, as `ssh-keygen -l` shows it (for the user to check)."""
        try:
            scan = mngr.run(["ssh-keyscan", "-T", str(self.connect_timeout), "-p", str(machine.port),
                             machine.address], check=False, timeout=self.connect_timeout + 5, env=self.env)
            if not scan.stdout.strip():
                return ""
            shown = mngr.run(["ssh-keygen", "-l", "-f", "-"], input=scan.stdout, check=False,
                             timeout=10, env=self.env)
        except mngr.MngrError:
            return ""
        return "; ".join(" ".join(line.split()[:2] + line.split()[-1:])
                         for line in shown.stdout.strip().splitlines())


# Scripts run on a machine #####################################################


def _home_path(path: str) -> str:
    """A machine path for sh: ~/x becomes "$H"/x (H: the agents' user's home)."""
    if path == "~":
        return '"$H"'
    if path.startswith("~/"):
        return '"$H"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def prelude(machine: Machine) -> str:
    """Sets H (home of the user agents run as), D (host dir), W (work root) and AS
    (how to run a command as the agents' user: nothing, runuser or sudo)."""
    if machine.agent_user:
        user = machine.agent_user
        who = (f"H=$(getent passwd {user} | cut -d: -f6); "
               f"[ -n \"$H\" ] || {{ echo 'no user {user} on this machine' >&2; exit {EXIT_NO_AGENT_USER}; }}; "
               # a clean environment: nothing of the user mngr logs in as reaches the agents
               f"CLEAN=\"env -i HOME=$H USER={user} LOGNAME={user} LANG=C.UTF-8 "
               f"PATH=/usr/local/bin:/usr/bin:/bin\"; "
               f"if [ \"$(id -un)\" = {user} ]; then AS=$CLEAN; elif [ \"$(id -u)\" = 0 ]; "
               f"then AS=\"runuser -u {user} -- $CLEAN\"; else AS=\"sudo -n -u {user} -- $CLEAN\"; fi; ")
    else:
        who = 'H=$HOME; AS=; '
    return who + f"D={_home_path(machine.host_dir)}; W={_home_path(machine.work_root)}; "


def framed(script: str):
    """(script, mark): the script, first printing a line of its own that no login shell
    noise (an rc file's echo) can match; unframed() keeps what follows that line."""
    mark = f"mngr-out-{secrets.token_hex(8)}"
    return f"printf '%s\\n' {mark}; " + script, mark


def unframed(stdout: str, mark: str) -> list:
    """The lines the script printed after its mark (none when the mark is missing)."""
    lines = stdout.split("\n")
    return lines[lines.index(mark) + 1:] if mark in lines else []


def in_host(machine: Machine, *argv) -> str:
    """sh for running the copied-in mngr.py as the agents' user."""
    return ('$AS env MNGR_HOST_DIR="$D" python3 -I -S -c ' + shlex.quote(mngr.HOST_BOOT) + ' "$D/bin" '
            + " ".join(shlex.quote(str(a)) for a in argv))


CHECKS = (f"command -v python3 >/dev/null 2>&1 || exit {mngr.EXIT_INIT_NO_PYTHON}; "
          f"python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' "
          f"|| exit {mngr.EXIT_INIT_OLD_PYTHON}; "
          f"command -v tmux >/dev/null 2>&1 || exit {mngr.EXIT_INIT_NO_TMUX}; "
          f"command -v timeout >/dev/null 2>&1 || exit {EXIT_NO_TIMEOUT}; ")
MACHINE_EXIT_REASONS = {mngr.EXIT_INIT_NO_PYTHON: "python3 is not installed there",
                        mngr.EXIT_INIT_OLD_PYTHON: "its python3 is older than 3.9",
                        mngr.EXIT_INIT_NO_TMUX: "tmux is not installed there",
                        EXIT_NO_TIMEOUT: "timeout (coreutils) is not installed there",
                        EXIT_NO_AGENT_USER: "its agent_user does not exist there"}


@dataclass(frozen=True)
class SshPlan(CopyPlan):
    machine: Machine = None


class SshProvider(RecordKeeper):
    backend = "ssh"
    has_machines = True         # its hosts are machines named in settings or by host add
    default_trust = "trusted"   # your own machines

    def __init__(self, name: str, conf: dict, ctx):
        super().__init__(name, conf, ctx)
        timeout = conf.get("timeout", CALL_TIMEOUT)
        connect = conf.get("connect_timeout", CONNECT_TIMEOUT)
        for key, value in (("timeout", timeout), ("connect_timeout", connect)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise mngr.ConfigError(f"settings [providers.{name}]: {key} must be a positive number")
        self.ssh = Ssh(ctx, connect, float(timeout))
        trust = conf.get("trust", self.default_trust)
        if trust not in mngr.TRUST_LEVELS:
            raise mngr.ConfigError(f"settings [providers.{name}]: trust must be trusted or untrusted")
        self.trust = trust
        self._machines = None

    # Machines ---------------------------------------------------------------

    @property
    def machines_file(self) -> Path:
        return mngr.user_dir(self.ctx.env) / "machines.json"

    def _added(self) -> dict:
        try:
            data = json.loads(self.machines_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise mngr.ConfigError(f"{self.machines_file} is not valid JSON: {exc}",
                                   "fix or remove it; mngr host add writes it") from None
        table = data.get(self.name) if isinstance(data, dict) else None
        return table if isinstance(table, dict) else {}

    def machines(self) -> dict:
        """name -> Machine: those in settings, then those added with mngr host add."""
        if self._machines is None:
            found = {}
            table = self.conf.get("machines") or {}
            if not isinstance(table, dict):
                raise mngr.ConfigError(f"settings [providers.{self.name}.machines] must be a table")
            for name, conf in table.items():
                found[name] = Machine.from_conf(name, conf, f"settings [providers.{self.name}]", "settings")
            for name, conf in self._added().items():
                if name not in found:
                    found[name] = Machine.from_conf(name, conf, str(self.machines_file), "added")
            self._machines = found
        return self._machines

    def machine(self, name: str) -> Machine:
        machines = self.machines()
        if name not in machines:
            raise mngr.NotFoundError(f"no machine named {name} in provider {self.name}",
                                     "add it: mngr host add NAME --ssh user@host[:port]")
        return machines[name]

    def add_machine(self, machine: Machine) -> None:
        if machine.name in self.machines():
            raise mngr.RefusedError(f"provider {self.name} already has a machine named {machine.name}",
                                    "pick another name, or remove it first: mngr host remove "
                                    + machine.name)
        with mngr.FileLock(self.machines_file.with_name(".machines.lock")):
            try:
                data = json.loads(self.machines_file.read_text())
            except FileNotFoundError:
                data = {}
            data.setdefault(self.name, {})[machine.name] = machine.to_conf()
            mngr.write_json(self.machines_file, data, mode=0o600)
        self._machines = None

    def new_machine(self, name: str, target: str, conf: dict) -> Machine:
        """A machine from `mngr host add NAME --ssh user@host[:port]` and its options."""
        user, address, port = parse_target(target)
        return Machine.from_conf(name, {"address": address, "port": port, "user": user, **conf},
                                 "mngr host add", "added")

    def remove_machine(self, name: str) -> None:
        machine = self.machine(name)
        if machine.source != "added":
            raise mngr.RefusedError(f"machine {name} comes from settings",
                                    f"remove it from [providers.{self.name}.machines] in settings")
        if any(record.name == name for _, record in self._records()):
            raise mngr.RefusedError(f"machine {name} still has agents",
                                    f"destroy them first (mngr list --include host={name})")
        with mngr.FileLock(self.machines_file.with_name(".machines.lock")):
            data = json.loads(self.machines_file.read_text())
            data.get(self.name, {}).pop(name, None)
            mngr.write_json(self.machines_file, data, mode=0o600)
        self._machines = None

    def check_machine(self, machine: Machine, accept_host_key: bool = False) -> dict:
        """Reach the machine (accepting an unknown host key when told) and check that
        agents can run there: python3 3.9+, tmux, and agent_user when set."""
        script, mark = framed(prelude(machine) + CHECKS +
                              'printf "%s\\n%s\\n" "$(uname -sr)" "$(python3 -V 2>&1)"')
        result = self.ssh.run(machine, script, accept_new=accept_host_key)
        if result.returncode != 0:
            raise self._machine_error(machine, result)
        system, python = (unframed(result.stdout, mark) + ["", ""])[:2]
        return {"machine": machine.name, "provider": self.name, "address": machine.where,
                "ok": True, "system": system, "python": python.replace("Python ", "")}

    def _machine_error(self, machine: Machine, result) -> mngr.MngrError:
        reason = MACHINE_EXIT_REASONS.get(result.returncode)
        if reason:
            return mngr.RefusedError(f"machine {machine.name} cannot run agents: {reason}",
                                     "install python3 (3.9+), tmux and coreutils there, e.g. "
                                     "apt-get install python3 tmux coreutils")
        tail = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        return mngr.CommandFailedError(f"on machine {machine.name}: {tail}", detail=result.stderr)

    def _known_machine(self, host):
        """The host's machine, or None when it is no longer configured."""
        return self.machines().get(host.record.name)

    def _machine_of(self, host) -> Machine:
        return self.machine(host.record.name if isinstance(host, mngr.HostView) else host.name)

    # Reading ------------------------------------------------------------------

    def default_policy(self) -> mngr.IdlePolicy:
        policy = mngr.default_policy(self.ctx.settings, self.name, trusted=False)
        explicit = ((self.conf.get("policy") or {}).get("trust")
                    or (self.ctx.settings.get("policy") or {}).get("trust"))
        return policy if explicit else replace(policy, trust=self.trust)

    def collect(self) -> list:
        records = self._records()
        return self._views(records) if records else []  # no agents anywhere: no ssh at all

    def _views(self, records) -> list:
        """Host views of (store, record) pairs: one ssh call per machine, in parallel."""
        machines = self.machines()
        known = [(store, record) for store, record in records if record.name in machines]
        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            reports = list(pool.map(lambda item: self._report(machines[item[1].name]), known))
        hosts = []
        for (store, record), (facts, report) in zip(known, reports):
            facts["created"] = record.created_at  # the controller's own record: certified
            facts["running"] = facts["reachable"] and record.lifecycle.state in (
                "starting", "running", "stopping")
            host = self._view(store, record, facts, report if facts["reachable"] else None,
                              unreported="unknown")
            if not facts["reachable"]:
                host.reachable, host.error = False, facts["error"]
            hosts.append(host)
        for store, record in records:
            if record.name not in machines:
                facts = {"exists": True, "reachable": False, "running": False,
                         "error": f"machine {record.name} is no longer configured"}
                host = self._view(store, record, facts, None, unreported="unknown")
                host.reachable, host.error = False, facts["error"]
                hosts.append(host)
        return hosts

    def report_timeout(self) -> int:
        """Seconds the in-host part of a report may take: well inside the ssh call's own
        timeout, so a report that hangs is a failed report, never a machine that seems
        unreachable (which enforcement leaves alone)."""
        room = self.ssh.timeout - self.ssh.connect_timeout - REPORT_MARGIN
        return max(1, min(REPORT_TIMEOUT, int(room)))

    def _report(self, machine: Machine):
        """(facts, report) of a machine in one ssh call: its boot time, read as the user
        mngr connects as (certified), then what the copied-in mngr.py reports."""
        # the in-host part is the agents' code: killed after report_timeout(), its output
        # into files of the user mngr connects as (a process it leaves behind holding
        # them cannot hold the ssh channel open), and never allowed to pass for ssh
        # failing (exit 255), so a host cannot make itself look unreachable
        nonce = secrets.token_hex(8)
        limit = self.report_timeout()
        quiet = "</dev/null >/dev/null 2>&1"
        script = (prelude(machine) +
                  f"printf '{FACTS_MARK} {nonce} %s\\n' \"$(sed -n 's/^btime //p' /proc/stat)\"; "
                  f"command -v timeout >/dev/null 2>&1 || {{ echo 'timeout (coreutils) is not "
                  f"installed there' >&2; exit 1; }}; "
                  f"T='timeout -s KILL {limit}'; "
                  f"$T $AS test -f \"$D/bin/mngr.py\" {quiet} || {{ echo {NO_REPORT_MARK}; exit 0; }}; "
                  "F=$(mktemp -d) || exit 1; trap 'rm -rf \"$F\"' EXIT; "
                  + "$T " + in_host(machine, "host-report", "--tmux-socket", machine.tmux_socket)
                  + ' </dev/null >"$F/out" 2>"$F/err"; R=$?; '
                  f'head -c {REPORT_MAX_BYTES} "$F/out"; tail -c 2000 "$F/err" >&2; '
                  f'[ "$R" -eq 137 ] && echo "host-report did not finish within {limit}s" >&2; '
                  '[ "$R" -eq 255 ] && R=254; exit "$R"')
        try:
            result = self.ssh.run(machine, script)
        except mngr.MngrError as exc:
            return {"exists": True, "reachable": False, "error": exc.line()}, None
        facts = {"exists": True, "reachable": True, "machine": machine.name}
        # the facts line is the first this script prints: a login shell's noise before it
        # is skipped, and nothing can pass for it without this call's nonce
        lines = result.stdout.split("\n")
        found = [i for i, line in enumerate(lines)
                 if re.fullmatch(rf"{FACTS_MARK} {nonce} ([0-9]*)", line)]
        if not found:
            return facts, {"error": "no answer from the machine's shell"}
        first, rest = lines[found[0]], "\n".join(lines[found[0] + 1:])
        btime = first.rsplit(" ", 1)[1]
        facts["started"] = float(btime) if btime else None
        if rest.strip() == NO_REPORT_MARK:
            return facts, {"error": "the host dir is gone from the machine"}
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["host-report failed"])[-1]
            return facts, {"error": tail[:200]}
        try:
            return facts, clean_report(json.loads(rest))
        except Exception as exc:  # the host wrote it: any failure to read it is its own
            return facts, {"error": f"malformed: {type(exc).__name__}: {exc}"[:200]}

    def observe(self, host, now: float) -> mngr.Observation:
        if not host.reachable:  # never judged on missing information
            record = host.record
            return mngr.Observation(exists=True, running=False, state="unreachable",
                                    state_since=record.lifecycle.since if record else now)
        return super().observe(host, now)

    # Creating -------------------------------------------------------------------

    def plan_agent(self, args, name) -> SshPlan:
        machines = self.machines()
        if args.host:
            machine = self.machine(args.host)
        elif len(machines) == 1:
            machine = next(iter(machines.values()))
        else:
            raise mngr.UsageError(f"which machine of provider {self.name}?",
                                  "pass --host MACHINE; see mngr host list" if machines
                                  else "add one: mngr host add NAME --ssh user@host[:port]")
        if args.snapshot:
            raise mngr.UsageError("--snapshot is for container and cloud hosts",
                                  f"drop it for machine {machine.name}")
        name, agent_type, command, env, permissions, source, policy = self._copy_basics(
            args, name, f"machine {machine.name}")
        if policy.trust == "untrusted" and not machine.agent_user:
            raise mngr.RefusedError(
                f"machine {machine.name} is untrusted but has no agent_user",
                "agents on an untrusted machine must run as their own unprivileged user: set "
                f"agent_user for {machine.name}, or trust it (--trust trusted)")
        if policy.trust == "untrusted" and not mngr.grants(permissions, "net", "egress"):
            mngr.warn(f"machine {machine.name} is not cut off from the network: "
                      "its agents can reach whatever it can")
        return SshPlan(name, agent_type, command, env, source, tuple(args.exclude), args, permissions,
                       machine)

    def _copy_basics(self, args, name, what: str):
        """What every agent on a host reached over ssh needs, checked: the agent's basics,
        its source dir, and the new host's policy."""
        name, agent_type, command, env, permissions = mngr.agent_basics(self.ctx, args, name,
                                                                        programs_here=False)
        if args.mount or args.image or args.dockerfile or args.start_arg:
            raise mngr.UsageError("--mount, --image, --dockerfile and -s are for container hosts",
                                  f"drop them for {what}")
        if args.work_mode in ("in_place", "worktree") or args.target or args.base_branch \
                or args.new_branch:
            raise mngr.UsageError(f"{what} gets a copy of the source dir",
                                  "drop --in-place/--worktree/--target/--base-branch/--new-branch")
        source = Path(args.source or self.ctx.cwd).resolve()
        if not source.is_dir():
            raise mngr.UsageError(f"source dir {source} does not exist", "give an existing --source DIR")
        policy = mngr.apply_policy_flags(self.default_policy(), args)
        return name, agent_type, command, env, permissions, source, policy

    def create_agent(self, plan: SshPlan, host=None):
        machine = plan.machine
        existing = next((r for _, r in self._records() if r.name == machine.name), None)
        if existing is not None:
            if host is None:
                host = self._views([(s, r) for s, r in self._records() if r.id == existing.id])[0]
            return self._add_agent(host, plan)
        return self._create_host(plan)

    def _create_host(self, plan: SshPlan):
        machine = plan.machine
        record, store = self._new_host(machine.name, plan.args, plan.permissions)
        host_id, now = record.id, record.created_at
        with mngr.FileLock(self.records_root / f".machine-{self.name}-{machine.name}.lock"):
            if any(r.name == machine.name for _, r in self._records()):
                raise mngr.RefusedError(f"machine {machine.name} got a host meanwhile", "run it again")
            self._begin_host(record, store)
        home, agent, deploying = None, None, False
        try:
            home = self._install(machine)
            agent = self._agent_record(plan, host_id, now, home["work_root"])
            self.ctx.hook("on_before_agent_create",
                          mngr.agent_info(agent, mngr.host_info(record, self.name)))
            self._copy_work(machine, plan, agent.work_dir)
            self.ctx.hook("on_after_host_create", mngr.host_info(record, self.name))
            store.write_agent(agent)
            mngr.atomic_write(store.host_dir.agent_dir(agent.id) / "env",
                              mngr.format_env_file(plan.env), mode=0o600)
            record = replace(record, agents=(agent.id,),
                             version=store.next_version(host_id, record.version))
            running = self._set_state(store, record, "running", write=False)
            deploying = True
            self._deploy(machine, store, start=[agent.id], records=[agent, running], new_host=True)
        except BaseException as exc:
            # nothing half-made: what this create put onto the machine goes (the agent's
            # session, the dirs it made), and the record with it
            if home is not None:
                self._undo_create(machine, home, agent, watcher=deploying)
            self._drop_records(record)
            if isinstance(exc, mngr.MngrError) and not exc.hint:
                exc.hint = "nothing was left on the machine; fix the cause and create again"
            raise
        self.ctx.state_changed(record, running, self.name)
        view = self._fresh_view(running, agent, {"machine": machine.name, "reachable": True})
        self.ctx.hook("on_after_agent_create", mngr.agent_info(agent, mngr.host_info(running, self.name),
                                                               view.state))
        return view

    def _undo_create(self, machine: Machine, home: dict, agent, watcher: bool = False) -> None:
        """Best effort, after a failed create: the agent's session, its watcher and the
        host dir and work root when this create made them, else the agent's own dirs.
        watcher: the deploy may have started one (it writes its pid file as it starts)."""
        script = prelude(machine)
        if agent is not None:
            script += (f"$AS tmux -L {shlex.quote(machine.tmux_socket)} kill-session -t "
                       f"{shlex.quote('=' + agent.session)} 2>/dev/null; ")
        paths = []
        if home["made_host"]:
            if watcher:
                script += ('for i in $(seq 30); do [ -f "$D/watcher.pid" ] && break; sleep 0.1; done; ')
            script += ('P=$(cat "$D/watcher.pid" 2>/dev/null) && $AS kill "$P" 2>/dev/null && '
                       'for i in $(seq 50); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done; ')
            paths.append(home["made_host"])
        elif agent is not None:
            paths.append(f"{home['host_dir']}/agents/{agent.id}")
        if home["made_work"]:
            paths.append(home["made_work"])
        elif agent is not None:
            paths.append(agent.work_dir)
        if paths:
            script += "$AS rm -rf -- " + " ".join(shlex.quote(p) for p in paths)
        try:
            self.ssh.run(machine, script, timeout=120)
        except mngr.MngrError as exc:
            mngr.warn(f"could not clean up on machine {machine.name}: {exc.line()}")

    def _agent_record(self, plan: SshPlan, host_id: str, now: float, work_root: str) -> mngr.AgentRecord:
        return mngr.AgentRecord(
            id=mngr.new_id(), name=plan.name, host_id=host_id, agent_type=plan.agent_type,
            command=plan.command, session=self.ctx.prefix + plan.name,
            work_dir=f"{work_root.rstrip('/')}/{plan.name}", work_mode="copy",
            source_dir=str(plan.source_dir), start_on_boot=bool(plan.args.start_on_boot),
            created_at=now, permissions=plan.permissions)

    @one_at_a_time
    def _add_agent(self, host, plan: SshPlan):
        if host is None or not host.reachable:
            raise mngr.UnreachableError(f"machine {plan.machine.name} cannot be reached now",
                                        host.error if host is not None else "try again later")
        store = self.store(host.record.id)
        fresh, _ = store.read_host()
        host.record = fresh or host.record
        if any(a.record.name == plan.name for a in host.agents):
            raise mngr.RefusedError(f"machine {host.name} already has an agent named {plan.name}")
        union = mngr.permission_union([host.record.permissions, plan.permissions])
        mngr.widening(host.name, host.record.permissions, bool(host.agents), union,
                      plan.args.allow_widen)
        machine = plan.machine
        home = self._install(machine)
        agent = self._agent_record(plan, host.record.id, time.time(), home["work_root"])
        info = mngr.host_info(host.record, self.name)
        self.ctx.hook("on_before_agent_create", mngr.agent_info(agent, info))
        record = replace(host.record, agents=host.record.agents + (agent.id,), permissions=union,
                         policy=mngr.apply_policy_flags(host.record.policy, plan.args),
                         version=store.next_version(host.record.id, host.record.version))
        if record.lifecycle.state in ("stopped",):
            record = replace(record, lifecycle=mngr.transition(record.lifecycle, "starting", time.time()))
        if record.lifecycle.state == "starting":
            record = replace(record, lifecycle=mngr.transition(record.lifecycle, "running", time.time()))
        try:
            self._copy_work(machine, plan, agent.work_dir)
            mngr.atomic_write(store.host_dir.agent_dir(agent.id) / "env",
                              mngr.format_env_file(plan.env), mode=0o600)
            self._deploy(machine, store, start=[agent.id], records=[agent, record])
        except BaseException:
            shutil.rmtree(store.host_dir.agent_dir(agent.id), ignore_errors=True)
            self._undo_create(machine, {**home, "made_host": "", "made_work": ""}, agent)
            raise
        self.ctx.state_changed(host.record, record, self.name)
        view = self._fresh_view(record, agent, {"machine": machine.name, "reachable": True})
        self.ctx.hook("on_after_agent_create", mngr.agent_info(agent, info, view.state))
        return view

    def _install(self, machine: Machine) -> dict:
        """Check the machine can run agents and put this mngr.py into its host dir (one
        ssh call); the host dir and work root as absolute paths there, and the top dirs
        this call made for them ("" when they were there before): what a failed create
        removes. A failure here removes what it made itself."""
        inner = (
            # the topmost missing dir of a path: what mkdir -p makes for it
            'top() { p=$1; t=; while [ ! -e "$p" ] && [ ! -L "$p" ]; do t=$p; p=$(dirname "$p"); done; '
            'printf "%s" "$t"; }; A=$(top "$1"); B=$(top "$2"); '
            # a new host dir gets its (free) deploy lock; an existing one is left as it is
            'if { [ -f "$1/data.json" ] || mkdir -p "$1/deploy_lock"; } && mkdir -p "$1/bin" "$2" '
            '&& cat > "$1/bin/mngr.py.new" && mv -f "$1/bin/mngr.py.new" "$1/bin/mngr.py"; '
            'then printf "%s\\n%s\\n%s\\n%s\\n" "$1" "$2" "$A" "$B"; '
            'else rm -f "$1/bin/mngr.py.new"; for m in "$A" "$B"; do [ -z "$m" ] || rm -rf "$m"; done; '
            'exit 1; fi')
        script, mark = framed(prelude(machine) + CHECKS + "$AS sh -c " + shlex.quote(inner)
                              + ' sh "$D" "$W" || exit 1')
        result = self.ssh.run(machine, script, input=Path(mngr.__file__).resolve().read_bytes(),
                              text=True)
        if result.returncode != 0:
            raise self._machine_error(machine, result)
        host_dir, work_root, made_host, made_work = (unframed(result.stdout, mark) + [""] * 4)[:4]
        if not host_dir.startswith("/") or not work_root.startswith("/"):
            raise mngr.CommandFailedError(f"machine {machine.name} gave no usable home dir",
                                          "set host_dir and work_root to absolute paths")
        return {"host_dir": host_dir, "work_root": work_root, "made_host": made_host,
                "made_work": made_work}

    def _copy_work(self, machine: Machine, plan: SshPlan, work_dir: str) -> None:
        """The source dir as a tar stream into its work dir there (--exclude honoured)."""
        stream = io.BytesIO()

        def keep(info):
            rel = info.name.split("/", 1)[1] if "/" in info.name else ""
            if rel and any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p)
                           for p in plan.excludes):
                return None
            return info
        with tarfile.open(fileobj=stream, mode="w") as tar:
            tar.add(plan.source_dir, arcname=".", filter=keep)
        script = (prelude(machine) +
                  '$AS sh -c \'rm -rf "$1" && mkdir -p "$1" && tar -x -o -C "$1"\' sh '
                  + shlex.quote(work_dir))
        result = self.ssh.run(machine, script, input=stream.getvalue(), timeout=COPY_TIMEOUT)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            full = any(sign in result.stderr for sign in ("No space left", "Wrote only", "Disk quota"))
            raise mngr.CommandFailedError(
                f"copying {plan.source_dir} to machine {machine.name} failed: "
                + ("its disk is full" if full else tail),
                f"free space on {machine.name}, or leave big paths out with --exclude" if full else "",
                detail=result.stderr)

    def _deploy(self, machine: Machine, store: mngr.Store, start=(), records=(),
                new_host: bool = False) -> None:
        """One ssh call: the signed records into the host dir (each file atomically, under
        the deploy lock), start agents, and make sure the watcher runs. The controller
        keeps the records only once the machine has them."""
        files = self._files(store, records=records)
        if new_host:
            files["env"] = store.host_dir.env.read_bytes() if store.host_dir.env.exists() else b""
        stream = io.BytesIO()
        with tarfile.open(fileobj=stream, mode="w") as tar:
            for rel, content in files.items():
                info = tarfile.TarInfo(rel)
                info.size, info.mtime = len(content), time.time()
                info.mode = 0o600 if rel.endswith("env") else 0o644
                tar.addfile(info, io.BytesIO(content))
        argv = ["deploy", "--tmux-socket", machine.tmux_socket]
        for agent_id in start:
            argv += ["--start", agent_id]
        host = next((r for r in records if isinstance(r, mngr.HostRecord)), None)
        if start or (host and host.lifecycle.state == "running"):
            argv += ["--watcher", "shutdown" if machine.allow_shutdown else "agents",
                     "--interval", self.interval]
            if machine.shutdown_command:
                argv += ["--shutdown-command", machine.shutdown_command]
        script = (prelude(machine) + '$AS test -f "$D/bin/mngr.py" || { echo "its host dir is gone" >&2; '
                  'exit 1; }; ' + "B=$(sed -n 's/^btime //p' /proc/stat); "
                  + in_host(machine, *argv) + (' --boot-time "$B"' if "--watcher" in argv else ""))
        result = self.ssh.run(machine, script, input=stream.getvalue(), text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["deploy failed"])[-1]
            raise mngr.CommandFailedError(f"deploying to machine {machine.name} failed: {tail}",
                                          detail=result.stderr)
        self._keep(store, records)

    def _remove_from_machine(self, machine: Machine, work_dir: str = "", whole_host_dir=False,
                             agent_id: str = "") -> None:
        """Best effort: what mngr put on the machine for a host or an agent."""
        paths = []
        if work_dir:
            paths.append(shlex.quote(work_dir))
        if whole_host_dir:
            paths.append('"$D"')
        elif agent_id:
            paths.append(f'"$D/agents/{agent_id}"')
        if not paths:
            return
        script = prelude(machine)
        if whole_host_dir:  # its watcher goes with it, first (it writes into the host dir)
            script += ('P=$(cat "$D/watcher.pid" 2>/dev/null) && $AS kill "$P" 2>/dev/null && '
                       'for i in $(seq 50); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done; ')
        script += "$AS rm -rf " + " ".join(paths)
        try:
            self.ssh.run(machine, script, timeout=120)
        except mngr.MngrError as exc:
            mngr.warn(f"could not clean up on machine {machine.name}: {exc.line()}")

    def _push(self, host, store, records=()) -> None:
        if not host.reachable:
            raise mngr.UnreachableError(f"machine {host.name} cannot be reached: {host.error}",
                                        "try again when it answers")
        self._deploy(self._machine_of(host), store, records=records)

    # Acting on agents and hosts -------------------------------------------------

    def tmux(self, machine: Machine) -> mngr.Tmux:
        def runner(argv, **kwargs):
            kwargs.pop("what", None)
            check = kwargs.pop("check", True)
            script = prelude(machine) + "$AS " + " ".join(shlex.quote(str(a)) for a in argv)
            result = self.ssh.run(machine, script, **kwargs)
            if check and result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or [""])[-1]
                raise mngr.CommandFailedError(f"tmux on machine {machine.name} failed: {tail}",
                                              detail=result.stderr, returncode=result.returncode)
            return result
        return mngr.Tmux(machine.tmux_socket, runner)

    def _reachable(self, view) -> Machine:
        host = view.host if isinstance(view, mngr.AgentView) else view
        if not host.reachable:
            raise mngr.UnreachableError(host.error or f"machine {host.name} cannot be reached",
                                        "try again when it answers")
        return self._machine_of(host)

    @one_at_a_time
    def start_agent(self, view):
        machine = self._reachable(view)
        store = self.store(view.host.record.id)
        record, _ = store.read_host()
        new = record
        if record.lifecycle.state == "stopping":  # a stop that never finished: it has now
            new = replace(new, lifecycle=mngr.transition(new.lifecycle, "stopped", time.time()))
        if new.lifecycle.state == "stopped":
            new = replace(new, lifecycle=mngr.transition(new.lifecycle, "starting", time.time()))
        if new.lifecycle.state == "starting":
            new = replace(new, lifecycle=mngr.transition(new.lifecycle, "running", time.time()))
        records = []
        if new is not record:
            new = replace(new, version=store.next_version(record.id, record.version))
            records.append(new)
        self._deploy(machine, store, start=[view.record.id], records=records)
        self.ctx.state_changed(record, new, self.name)
        return self._fresh_view(new, view.record, {"machine": machine.name, "reachable": True})

    def restart_agent(self, view):
        return self.start_agent(view)

    def stop_agent(self, view, snapshot_mode: str = "auto") -> None:
        if snapshot_mode == "always":
            raise mngr.RefusedError("machines have no snapshots", "use --snapshot-mode never")
        machine = self._reachable(view)
        others = [a for a in view.host.agents if a.record.id != view.record.id and a.state == "running"]
        if others:
            self.tmux(machine).kill(view.record.session)
        else:
            self._stop(view.host, power_off=False)

    def stop_host(self, host) -> None:
        self._stop(host, power_off=True)

    def force_stop_host(self, host) -> None:
        self._stop(host, power_off=True, kill_all=True)

    @one_at_a_time
    def _stop(self, host, power_off: bool, kill_all: bool = False) -> None:
        """Stop hooks, then every agent; with agent_user (and when forced) every process of
        that user; with allow_shutdown (from the watcher or enforce), power off."""
        machine = self._reachable(host)
        store = self.store(host.record.id)
        record, _ = store.read_host()
        if record.lifecycle.state == "running":
            record = self._set_state(store, record, "stopping")
        result = self.ssh.run(machine, self._stop_script(machine, power_off, kill_all),
                              timeout=mngr.HOOK_TIMEOUT + 30)
        if result.returncode == EXIT_POWER_OFF_FAILED:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            why = "; ".join(lines[-2:]) or "powering off failed"
            raise mngr.CommandFailedError(
                f"its agents stopped, but powering off machine {machine.name} failed: {why}",
                "check its shutdown_command (and sudo rights); mngr enforce tries again after "
                "the stopping timeout", detail=result.stderr)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            raise mngr.CommandFailedError(f"stopping agents on machine {machine.name} failed: {tail}",
                                          "mngr enforce forces it after the stopping timeout",
                                          detail=result.stderr)
        if record.lifecycle.state != "failed":
            record = self._set_state(store, record, "stopped", write=False)
            try:
                self._deploy(machine, store, records=[record])
            except mngr.MngrError:  # powered off already: the controller's record is the truth
                self._keep(store, [record])
            self.ctx.state_changed(host.record, record, self.name)

    @staticmethod
    def _stop_script(machine: Machine, power_off: bool, kill_all: bool) -> str:
        """Stop hooks and agents (the agents' own code: bounded, never trusted to finish),
        then, whatever it did: with agent_user every process of that user, when forced
        their tmux server, and with allow_shutdown the power. Exit: that of the hooks,
        or 0 once everything was killed; EXIT_POWER_OFF_FAILED when the power-off failed."""
        script = (prelude(machine) + "T=; command -v timeout >/dev/null 2>&1 && "
                  f"T='timeout -s KILL {int(mngr.HOOK_TIMEOUT)}'; $T "
                  + in_host(machine, "host-stop", "--tmux-socket", machine.tmux_socket) + "; S=$?; ")
        if kill_all:
            script += f"$AS tmux -L {shlex.quote(machine.tmux_socket)} kill-server 2>/dev/null; S=0; "
        if machine.agent_user:  # the agents' user keeps nothing running (unless it is us)
            # (whatever the hooks did: once nothing of that user runs, the host is stopped)
            # (a killed process is a zombie until reaped: not running, not counted)
            alive = f"ps -u {machine.agent_user} -o stat= | grep -qv '^Z'"
            script += (f'[ "$(id -un)" = {machine.agent_user} ] || {{ $AS kill -KILL -1 2>/dev/null; '
                       f'! {alive} || sleep 0.2; '
                       f'if {alive}; then echo "processes of '
                       f'{machine.agent_user} survived" >&2; S=1; else S=0; fi; }}; ')
        if power_off and machine.allow_shutdown:
            command = machine.shutdown_command or ('if [ "$(id -u)" = 0 ]; then shutdown -h now; '
                                                   'else sudo -n shutdown -h now; fi')
            script += (f"{{ {command}\n}}; P=$?; if [ \"$P\" -ne 0 ]; then echo \"powering off failed "
                       f"(exit $P)\" >&2; S={EXIT_POWER_OFF_FAILED}; fi; ")
        return script + "exit $S"

    @one_at_a_time
    def mark_failed(self, host) -> None:
        store = self.store(host.record.id)
        record, _ = store.read_host()
        if host.reachable:
            try:
                machine = self._machine_of(host)
                self.ssh.run(machine, self._stop_script(machine, False, True),
                             timeout=mngr.HOOK_TIMEOUT + 30)
            except mngr.MngrError as exc:
                mngr.warn(f"could not stop agents on {host.name}: {exc.line()}")
        self._set_state(store, record, "failed")

    def send_message(self, view, text: str) -> None:
        self.tmux(self._reachable(view)).send(view.record.session, text)

    def output(self, view, lines: int) -> str:
        machine = self._reachable(view)
        if view.state == "running":
            return self.tmux(machine).capture(view.record.session, lines)
        log = f'"$D/agents/{view.record.id}/logs/output.log"'
        result = self.ssh.run(machine, prelude(machine) + f"$AS tail -n {int(lines)} {log} 2>/dev/null")
        return result.stdout

    def exec_in(self, view, shell_command: str, timeout) -> int:
        """The command in the agent's work dir, with its env. The env (secrets among it)
        never goes on a command line, where ps shows it on both ends: a first call sends
        it on stdin into a file only the agents' user can read, which the command's shell
        reads and removes before anything else; stdin stays the user's."""
        machine = self._reachable(view)
        env = mngr.read_env_file(self.store(view.host.record.id).host_dir.agent_dir(view.record.id) / "env")
        env.update(MNGR_AGENT_NAME=view.record.name, MNGR_AGENT_ID=view.record.id)
        bad = sorted(k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
        if bad:
            raise mngr.RefusedError(f"agent {view.record.name} has env names a shell cannot set: "
                                    + ", ".join(bad), "rename them in its env")
        blob = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
        script, mark = framed(prelude(machine) + "$AS sh -c " + shlex.quote(
            'umask 077; F=$(mktemp "${TMPDIR:-/tmp}/mngr-exec.XXXXXXXX") || exit 1; '
            'cat > "$F" || { rm -f "$F"; exit 1; }; printf "%s\\n" "$F"'))
        sent = self.ssh.run(machine, script, input=blob)
        path = (unframed(sent.stdout, mark) + [""])[0]
        if sent.returncode != 0 or not path.startswith("/"):
            tail = (sent.stderr.strip().splitlines() or [f"exit {sent.returncode}"])[-1]
            raise mngr.CommandFailedError(f"exec in {view.record.name}: could not pass its env to "
                                          f"machine {machine.name}: {tail}", detail=sent.stderr)
        script = (prelude(machine) + 'exec $AS env MNGR_HOST_DIR="$D" sh -c '
                  + shlex.quote('. "$2"; S=$?; rm -f "$2"; [ "$S" -eq 0 ] || exit 1; '
                                'cd "$1" || exit 1; exec sh -c "$3"') + " sh "
                  + " ".join(shlex.quote(a) for a in (view.record.work_dir, path, shell_command)))
        return mngr.run(self.ssh.argv(machine, "sh -c " + shlex.quote(script)), env=self.ssh.env,
                        capture=False, check=False, timeout=timeout,
                        what=f"exec in {view.record.name}").returncode

    def attach(self, view) -> int:
        need_terminal(view)
        machine = self._reachable(view)
        script = (prelude(machine) + '$AS touch "$D/activity/user"; exec $AS tmux -L '
                  + shlex.quote(machine.tmux_socket) + " attach-session -t "
                  + shlex.quote(f"={view.record.session}"))
        return mngr.run(self.ssh.argv(machine, "sh -c " + shlex.quote(script), tty=True),
                        env=self.ssh.env, capture=False, check=False, timeout=None,
                        what="ssh tmux attach").returncode

    @one_at_a_time
    def destroy_agent(self, view, remove_work: bool, discard_changes: bool) -> None:
        """Forget the agent and remove its work dir there; with its last agent the host
        dir goes too (the machine stays, configured)."""
        host = view.host
        store, record, info, agent, remaining = self._destroying(view)
        machine = self._known_machine(host)   # None: no longer configured, or not running
        live = machine is not None and host.reachable
        if live:
            try:
                self.tmux(machine).kill(view.record.session)
            except mngr.MngrError:
                pass
        elif remaining and not host.reachable:  # its other agents' records must reach it
            raise mngr.UnreachableError(f"machine {host.name} cannot be reached: {host.error}",
                                        "try again when it answers")
        if not remaining:
            self.ctx.hook("on_before_host_destroy", info)
            if machine is not None and host.reachable:
                self._remove_from_machine(machine, view.record.work_dir, whole_host_dir=True)
            elif machine is not None:
                mngr.warn(f"machine {host.name} is unreachable: its host dir and "
                          f"{view.record.work_dir} stay there")
            self._host_destroyed(record, agent)
            return
        kept = [store.read_agent(a)[0] for a in remaining]
        record = replace(record, agents=remaining, version=store.next_version(record.id, record.version),
                         permissions=mngr.permission_union([a.permissions for a in kept if a]))
        self._push(host, store, [record])
        if live:
            self._remove_from_machine(machine, view.record.work_dir, agent_id=view.record.id)
        else:
            mngr.warn(f"{host.name} is not running: {view.record.work_dir} stays on its disk")
        shutil.rmtree(store.host_dir.agent_dir(view.record.id), ignore_errors=True)
        self.ctx.hook("on_after_agent_destroy", agent)

    # Snapshots: machines have none -----------------------------------------------

    def snapshot_create(self, host) -> dict:
        raise mngr.RefusedError(f"{host.name} is an ssh machine: machines have no snapshots",
                                "snapshot a container or cloud host instead")

    def snapshot_list(self) -> list:
        return []

    def snapshot_destroy(self, snapshot_id: str) -> None:
        raise mngr.NotFoundError(f"no snapshot {snapshot_id} in provider {self.name}",
                                 "machines have no snapshots")

    def start_from_snapshot(self, view, snapshot_id: str):
        raise mngr.RefusedError("machines have no snapshots", "drop --snapshot")

