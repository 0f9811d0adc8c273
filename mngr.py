#!/usr/bin/env python3
"""mngr: run AI coding agents in tmux sessions on hosts, and stop idle hosts.

This one file is the controller (``python3 -m mngr``, the ``mngr`` script) and
also the copy-in script that runs inside every host as
``python3 $MNGR_HOST_DIR/bin/mngr.py``.

The copy-in contract:
  * it imports nothing outside the standard library;
  * sections 1-8 (model, pure core, signing checks, host-dir I/O, in-host
    commands) run on Python 3.9 under ``python3 -I -S``; the controller needs
    Python 3.10+;
  * importing it has no side effects: no files, no logging, no plugin
    discovery.
"""
from __future__ import annotations

__version__ = "0.1.0"

# Imports ###################################################################

import dataclasses
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# Constants #################################################################

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_UNREACHABLE = 75

ENV_ROOT_NAME = "MNGR_ROOT_NAME"        # names ~/.<root>, ~/.config/<root>, the tmux socket
ENV_PREFIX = "MNGR_PREFIX"              # tmux session prefix, default "mngr-"
ENV_HOST_DIR = "MNGR_HOST_DIR"          # the host dir of the host we run on
ENV_TMUX_SOCKET = "MNGR_TMUX_SOCKET"    # tmux -L name, default the root name
ENV_REQUIRE_REAL = "MNGR_REQUIRE_REAL"
ENV_COMMAND_PREFIX = "MNGR_COMMANDS_"

DEFAULT_ROOT_NAME = "mngr"
DEFAULT_PREFIX = "mngr-"
DEFAULT_AGENT_TYPE = "claude"

SUBPROCESS_TIMEOUT = 30.0     # seconds, for every provider call unless told
SIGNATURE_DOMAIN = b"mngr-signed-record-v1\n"

# Errors ####################################################################


class MngrError(Exception):
    """The root of every error a person sees: one line and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str = "", detail: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail

    def line(self) -> str:
        """One line, whatever the values in it: control characters are escaped."""
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UsageError(MngrError):
    exit_code = EXIT_USAGE


class ConfigError(MngrError):
    pass


class NotFoundError(MngrError):
    pass


class ToolMissingError(MngrError):
    pass


class CommandFailedError(MngrError):
    def __init__(self, message: str, hint: str = "", detail: str = "", returncode: int = 1):
        super().__init__(message, hint, detail)
        self.returncode = returncode


class CommandTimedOutError(MngrError):
    exit_code = EXIT_UNREACHABLE


class UnreachableError(MngrError):
    exit_code = EXIT_UNREACHABLE


class PluginError(MngrError):
    pass


class InvalidTransitionError(MngrError):
    pass


class TamperedStateError(MngrError):
    pass


class RefusedError(MngrError):
    pass


# Model #####################################################################

HOST_STATES = ("building", "starting", "running", "stopping", "stopped", "failed", "destroyed")
AGENT_STATES = ("running", "done", "replaced", "stopped")
WORK_MODES = ("in_place", "copy", "worktree")

ACTIVITY_SOURCES = ("create", "boot", "start", "ssh", "process", "agent", "user")
REPORTED_SOURCES = ("start", "ssh", "agent", "user")   # written inside the host: never trusted blindly
TRUST_LEVELS = ("trusted", "untrusted")
ACTIONS = ("none", "stop", "mark_failed", "force_stop")
IDLE_MODES = {
    "io": frozenset({"user", "agent", "ssh", "create", "start", "boot"}),
    "user": frozenset({"user", "ssh", "create", "start", "boot"}),
    "agent": frozenset({"agent", "ssh", "create", "start", "boot"}),
    "ssh": frozenset({"ssh", "create", "start", "boot"}),
    "create": frozenset({"create"}),
    "boot": frozenset({"boot"}),
    "start": frozenset({"start", "boot"}),
    "run": frozenset({"create", "start", "boot", "process"}),
    "disabled": frozenset(),
}

# Patterns are strings, compiled on first use (re caches them): start-up stays cheap.
NAME_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ID_PATTERN = r"[0-9a-f]{32}"
DURATION_PATTERN = r"([0-9]{1,12})([smhd]?)"
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def validate_name(name: str, what: str = "agent name") -> str:
    """Names are DNS labels: letters, digits and inner hyphens, 1-63 chars."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name, re.ASCII):
        raise UsageError(
            f"bad {what} {name!r}",
            "use 1-63 letters, digits and hyphens, not starting or ending with a hyphen",
        )
    return name


def new_id() -> str:
    import uuid

    return uuid.uuid4().hex


def is_id(text: str) -> bool:
    return bool(re.fullmatch(ID_PATTERN, text or ""))


def parse_duration(text) -> int:
    """'90', '30s', '5m', '1h', '2d' -> seconds. Anything else is a usage error."""
    if isinstance(text, bool):
        raise UsageError(f"bad duration {text!r}", "use a number of seconds or 30s, 5m, 1h, 2d")
    if isinstance(text, int) and text >= 0:
        return text
    match = re.fullmatch(DURATION_PATTERN, text.strip(), re.ASCII) if isinstance(text, str) else None
    if not match:
        raise UsageError(f"bad duration {text!r}", "use a number of seconds or 30s, 5m, 1h, 2d")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def format_duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def mode_for(sources) -> str:
    """The idle mode whose source set is exactly this one, else 'custom'."""
    sources = frozenset(sources)
    for mode, mode_sources in IDLE_MODES.items():
        if mode_sources == sources:
            return mode
    return "custom"


@dataclass(frozen=True)
class IdlePolicy:
    """When a host counts as idle or stuck; signed into the host's data.json.

    The activity sources are the truth; the idle mode is the name of that set
    (DESIGN 5), or 'custom'. Durations are seconds.
    """

    activity_sources: frozenset = frozenset()
    idle_timeout: int = 3600
    max_lifetime: int | None = None
    trust: str = "trusted"
    trust_reported: bool = False
    building_timeout: int = 1800
    starting_timeout: int = 600
    stopping_timeout: int = 300
    deploy_timeout: int = 600

    @property
    def idle_mode(self) -> str:
        return mode_for(self.activity_sources)

    @classmethod
    def for_mode(cls, mode: str, **fields) -> "IdlePolicy":
        if mode not in IDLE_MODES:
            raise UsageError(f"unknown idle mode {mode!r}", "known: " + ", ".join(IDLE_MODES))
        return cls(activity_sources=IDLE_MODES[mode], **fields)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["activity_sources"] = sorted(self.activity_sources)
        data["idle_mode"] = self.idle_mode
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "IdlePolicy":
        sources = frozenset(data.get("activity_sources") or ())
        unknown = sources - set(ACTIVITY_SOURCES)
        if unknown:
            raise ValueError(f"unknown activity sources {sorted(unknown)}")
        if data.get("trust", "trusted") not in TRUST_LEVELS:
            raise ValueError(f"unknown trust {data.get('trust')!r}")
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls)
                  if f.name in data and f.name != "activity_sources"}
        for name, value in fields.items():
            if name in ("trust",):
                continue
            if name == "trust_reported":
                if not isinstance(value, bool):
                    raise ValueError("trust_reported must be true or false")
            elif not (value is None and name == "max_lifetime") and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a whole number of seconds")
        return cls(activity_sources=sources, **fields)


@dataclass(frozen=True)
class Lifecycle:
    """A host's state and the moment it entered it (epoch seconds)."""

    state: str
    since: float


# The host lifecycle of DESIGN section 4: every legal move, and no other.
HOST_TRANSITIONS = {
    "building": frozenset({"starting", "failed"}),
    "starting": frozenset({"running", "failed", "stopped"}),
    "running": frozenset({"stopping", "stopped", "destroyed"}),
    "stopping": frozenset({"stopped"}),
    "stopped": frozenset({"starting", "destroyed"}),
    "failed": frozenset({"destroyed"}),
    "destroyed": frozenset(),
}


@dataclass(frozen=True)
class HostRecord:
    """The signed record of one host (its data.json payload)."""

    id: str
    name: str
    provider: str
    lifecycle: Lifecycle
    policy: IdlePolicy
    agents: tuple = ()
    created_at: float = 0.0
    version: int = 1
    permissions: tuple = ()      # the union of its agents' permissions

    def to_dict(self) -> dict:
        return {
            "kind": "host",
            "permissions": list(self.permissions),
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "state": self.lifecycle.state,
            "state_since": self.lifecycle.since,
            "policy": self.policy.to_dict(),
            "agents": list(self.agents),
            "created_at": self.created_at,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HostRecord":
        if data.get("kind") != "host":
            raise ValueError("not a host record")
        state = data["state"]
        if state not in HOST_STATES:
            raise ValueError(f"unknown host state {state!r}")
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            provider=str(data["provider"]),
            lifecycle=Lifecycle(state, float(data["state_since"])),
            policy=IdlePolicy.from_dict(data.get("policy") or {}),
            agents=tuple(str(a) for a in data.get("agents", ())),
            created_at=float(data.get("created_at", 0.0)),
            version=int(data["version"]),
            permissions=tuple(str(p) for p in data.get("permissions", ())),
        )


@dataclass(frozen=True)
class AgentRecord:
    """The signed record of one agent (agents/<id>/data.json payload)."""

    id: str
    name: str
    host_id: str
    agent_type: str
    command: str
    session: str
    work_dir: str
    work_mode: str
    branch: str = ""
    source_dir: str = ""
    start_on_boot: bool = False
    created_at: float = 0.0
    version: int = 1
    permissions: tuple = ()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["kind"] = "agent"
        data["permissions"] = list(self.permissions)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "AgentRecord":
        if data.get("kind") != "agent":
            raise ValueError("not an agent record")
        if data.get("work_mode") not in WORK_MODES:
            raise ValueError(f"unknown work mode {data.get('work_mode')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        fields["permissions"] = tuple(str(p) for p in fields.get("permissions", ()))
        return cls(**fields)


# Pure core #################################################################


def transition(current: Lifecycle, new_state: str, now: float) -> Lifecycle:
    """Apply one lifecycle move, refusing any that the table does not list."""
    if new_state not in HOST_TRANSITIONS:
        raise InvalidTransitionError(f"unknown host state {new_state!r}")
    if new_state not in HOST_TRANSITIONS.get(current.state, ()):
        allowed = ", ".join(sorted(HOST_TRANSITIONS.get(current.state, ()))) or "nothing"
        raise InvalidTransitionError(
            f"a host cannot go from {current.state} to {new_state}",
            f"from {current.state} it can go to: {allowed}",
        )
    return Lifecycle(new_state, now)


PERMISSION_PATTERN = r"([a-z][a-z0-9]*):(\S+)"


def parse_permission(text: str):
    """'family:detail' -> (family, detail); anything else is a usage error."""
    match = re.fullmatch(PERMISSION_PATTERN, text or "", re.ASCII) if isinstance(text, str) else None
    if not match:
        raise UsageError(f"bad permission {text!r}",
                         "write family:detail, e.g. env:GITHUB_TOKEN, net:egress, fs:mount:/data")
    return match.group(1), match.group(2)


def format_permission(family: str, detail: str) -> str:
    return f"{family}:{detail}"


def permission_union(agent_sets) -> tuple:
    """A host's effective permissions: the union of its agents' (every agent on a host
    can use every permission on it)."""
    return tuple(sorted(set().union(*map(set, agent_sets)))) if agent_sets else ()


def grants(permissions, family: str, detail: str) -> bool:
    """Whether a set of permissions covers family:detail (family:* covers the family)."""
    return f"{family}:*" in permissions or f"{family}:{detail}" in permissions


def derive_state(exists: bool, running: bool, signed_state: str) -> str:
    """A host's observed state: provider facts first, the signed record for the rest."""
    if signed_state == "failed":  # broke before it could run; only destroy moves it on
        return "failed"
    if not exists:
        return "building" if signed_state == "building" else "destroyed"
    if running:
        return signed_state if signed_state in ("starting", "stopping") else "running"
    if signed_state == "starting":
        return signed_state
    return "stopped"


@dataclass(frozen=True)
class Observation:
    """What enforcement knows about one host at one moment.

    certified_*: from the provider. signed_*: from data.json, which verified
    (or ``verify_error`` says why not). reported: timestamps written inside
    the host, as (source, epoch seconds) pairs; believed only when trusted.
    """

    exists: bool
    running: bool
    state: str
    state_since: float
    verify_error: str = ""
    certified_created_at: float | None = None
    certified_boot_time: float | None = None
    signed_created_at: float | None = None
    process_alive: bool = False
    reported: tuple = ()
    deploy_lock_since: float | None = None


class Decision(NamedTuple):
    """What to do with a host, and why. cause: tampered, timeout, lifetime, idle or ''.

    A NamedTuple rather than a frozen dataclass: just as immutable, and
    several times cheaper to build, which decide() does once per host.
    """

    action: str
    reason: str
    idle_seconds: float | None = None
    deadline: float | None = None
    cause: str = ""

    def to_dict(self) -> dict:
        return self._asdict()


TRANSITIONAL_TIMEOUTS = {"building": ("building_timeout", "mark_failed"),
                         "starting": ("starting_timeout", "mark_failed"),
                         "stopping": ("stopping_timeout", "force_stop")}


def decide(observation: Observation, policy: IdlePolicy, now: float) -> Decision:
    """The one place policy is interpreted. Pure: no I/O, no clock.

    In order: a host that is gone gets nothing (never destroy on missing
    information); a tampered record stops a running host; a transitional
    state past its timeout fails or is forced stopped; a host that is not
    running needs nothing; max_lifetime always wins; then idleness, which a
    live deploy lock defers (where reported data is believed).
    """
    obs = observation
    if not obs.exists and obs.state != "building":
        return Decision("none", "host does not exist")
    if obs.verify_error and obs.running:
        return Decision("stop", f"tampered: {obs.verify_error}", cause="tampered")
    if obs.state in TRANSITIONAL_TIMEOUTS:
        field_name, action = TRANSITIONAL_TIMEOUTS[obs.state]
        limit = getattr(policy, field_name)
        deadline = obs.state_since + limit
        if now >= deadline:
            return Decision(action, f"{obs.state} for {format_duration(int(now - obs.state_since))}, "
                                    f"past its {format_duration(limit)} timeout", None, deadline,
                            "timeout")
        return Decision("none", f"{obs.state} (timeout {format_duration(limit)})", None, deadline)
    if not obs.running or obs.state == "failed":
        return Decision("none", f"host is {obs.state}")

    lifetime_deadline = None
    if policy.max_lifetime is not None:
        created, booted = obs.certified_created_at, obs.certified_boot_time
        if created is None:
            born = obs.state_since if booted is None else booted
        else:
            born = created if booted is None or booted < created else booted
        lifetime_deadline = born + policy.max_lifetime
        if now >= lifetime_deadline:
            return Decision("stop", f"max lifetime {format_duration(policy.max_lifetime)} reached",
                            None, lifetime_deadline, "lifetime")

    sources = policy.activity_sources
    if not sources:
        return Decision("none", "idle checks disabled", None, lifetime_deadline)
    believe_reported = policy.trust == "trusted" or policy.trust_reported
    last = last_activity(obs, policy, now, believe_reported)
    idle = max(0.0, now - last)
    deadline = last + policy.idle_timeout
    # the deploy lock lives in the host dir: reported, so believed only like activity
    lock_deadline = None
    if obs.deploy_lock_since is not None and believe_reported:
        lock_deadline = min(obs.deploy_lock_since, now) + policy.deploy_timeout
        deadline = max(deadline, lock_deadline)
    if lifetime_deadline is not None:
        deadline = min(deadline, lifetime_deadline)
    if idle < policy.idle_timeout:
        return Decision("none", f"active {int(idle)}s ago", idle, deadline)
    if lock_deadline is not None and now < lock_deadline:
        return Decision("none", "idle, but a deploy is in progress", idle, deadline)
    return Decision("stop", f"idle for {int(idle)}s (timeout {policy.idle_timeout}s)",
                    idle, deadline, "idle")


def last_activity(obs: Observation, policy: IdlePolicy, now: float,
                  believe_reported: bool) -> float:
    """The newest activity among the enabled sources this host may claim.

    A host is never idle sooner than idle_timeout after it entered its
    current state (state_since, signed), so activity from before a restart
    cannot stop a fresh host. Reported timestamps count only on a trusted
    host or with trust_reported, only for the sources a host can report
    (never create, boot or process), and never later than now.
    """
    sources = policy.activity_sources
    last = obs.state_since
    if "create" in sources:
        for stamp in (obs.signed_created_at, obs.certified_created_at):
            if stamp is not None and stamp > last:
                last = stamp
    if "boot" in sources and obs.certified_boot_time is not None and obs.certified_boot_time > last:
        last = obs.certified_boot_time
    if "process" in sources and obs.process_alive and believe_reported:
        return now
    if believe_reported:
        for source, stamp in obs.reported:
            if stamp > last and source in sources and source in REPORTED_SOURCES:
                last = stamp
    return now if last > now else last


# Signing and host-dir I/O ##################################################


def canonical_json(payload) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature_for(secret: bytes, payload: dict) -> str:
    import hashlib
    import hmac

    return hmac.new(secret, SIGNATURE_DOMAIN + canonical_json(payload), hashlib.sha256).hexdigest()


@dataclass(frozen=True, eq=False)
class SigningKey:
    id: str
    secret: bytes
    created_at: float


@dataclass(frozen=True, eq=False)
class Keyring:
    """Every key verifies; the newest (last) signs. Keys never enter a host."""

    keys: tuple

    def signer(self) -> SigningKey:
        return self.keys[-1]

    def get(self, key_id: str):
        for key in self.keys:
            if key.id == key_id:
                return key
        return None


@dataclass(frozen=True)
class Verification:
    """The result of checking a signed file: ok, or why not."""

    ok: bool
    reason: str = ""
    payload: dict | None = None


def sign_payload(keyring: Keyring, payload: dict) -> dict:
    key = keyring.signer()
    return {"payload": payload, "key_id": key.id, "signature": signature_for(key.secret, payload)}


def verify_document(document, keyring: Keyring, kind: str, record_id: str = "",
                    min_version: int = 0) -> Verification:
    """Check a parsed signed document; every failure says why."""
    if document is None:
        return Verification(False, "missing")
    if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
        return Verification(False, "malformed")
    payload = document["payload"]
    key = keyring.get(document.get("key_id"))
    if key is None:
        return Verification(False, "unknown key")
    import hmac

    signature = document.get("signature")
    try:  # a payload a host wrote may not even encode (lone surrogates, huge numbers)
        expected = signature_for(key.secret, payload)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return Verification(False, "malformed")
    if not isinstance(signature, str) or not hmac.compare_digest(
            signature.encode(errors="replace"), expected.encode()):
        return Verification(False, "bad signature")
    if payload.get("kind") != kind or (record_id and payload.get("id") != record_id):
        return Verification(False, "wrong record")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        return Verification(False, "malformed")
    if version < min_version:
        return Verification(False, f"older version than seen ({version} < {min_version})")
    return Verification(True, "", payload)


def read_json(path: Path):
    """The parsed file, None when it is missing; ValueError when it is not JSON."""
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def verify_file(path: Path, keyring: Keyring, kind: str, record_id: str = "",
                min_version: int = 0) -> Verification:
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read())
    except FileNotFoundError:
        return Verification(False, "missing")
    except (ValueError, OSError):
        return Verification(False, "malformed")
    if document is None:
        return Verification(False, "malformed")
    return verify_document(document, keyring, kind, record_id, min_version)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file or nothing: temp file in the same dir, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, data, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode)


def append_jsonl(path: Path, event: dict) -> None:
    """Append one JSON object as one line (O_APPEND writes of a line are whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_env_file(path: Path) -> dict:
    """KEY=VALUE lines; blank lines and # comments are skipped."""
    env = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return env
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise UsageError(f"bad line {number} in env file {path}: {raw!r}", "use KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env


def format_env_file(env: dict) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode()


class HostDir:
    """The layout of DESIGN section 3 under one host dir."""

    def __init__(self, root):
        self.root = Path(root)

    data = property(lambda self: self.root / "data.json")
    env = property(lambda self: self.root / "env")
    activity = property(lambda self: self.root / "activity")
    agents = property(lambda self: self.root / "agents")
    bin = property(lambda self: self.root / "bin")
    deploy_lock = property(lambda self: self.root / "deploy_lock")
    hooks = property(lambda self: self.root / "hooks")
    events = property(lambda self: self.root / "events")
    logs = property(lambda self: self.root / "logs")
    work = property(lambda self: self.root / "work")
    lock = property(lambda self: self.root / ".lock")
    sessions_lock = property(lambda self: self.root / ".sessions.lock")  # starting agents

    def agent_dir(self, agent_id: str) -> Path:
        return self.agents / agent_id

    def skeleton(self) -> None:
        for sub in ("activity", "agents", "bin", "hooks/boot", "hooks/post_services",
                    "hooks/stop", "events", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)


def agent_skeleton(agent_dir: Path) -> None:
    for sub in ("logs", "events", "hooks/start"):
        (agent_dir / sub).mkdir(parents=True, exist_ok=True)


class FileLock:
    """An exclusive advisory lock on a file, held for a with-block."""

    def __init__(self, path: Path, blocking: bool = True):
        self.path = Path(path)
        self.blocking = blocking
        self.fd = None

    def acquire(self) -> bool:
        """Take the lock; False (non-blocking only) when someone else holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        if not self.acquire():
            raise BlockingIOError(f"{self.path} is locked")
        return self

    def __exit__(self, *exc):
        self.release()


# Subprocess ################################################################

_VERBOSITY = [0]


def log(level: int, message: str) -> None:
    """Logs go to stderr: level 0 normal, 1 verbose (-v), -1 only without -q."""
    if _VERBOSITY[0] >= level:
        print(f"mngr: {message}", file=sys.stderr)


def warn(message: str) -> None:
    if _VERBOSITY[0] >= -1:
        print(f"mngr: warning: {message}", file=sys.stderr)


def run(argv, *, timeout=SUBPROCESS_TIMEOUT, check=True, capture=True, input=None,
        cwd=None, env=None, what="", text=True):
    """The one subprocess wrapper: argv list, timeout, typed errors.

    ``timeout=None`` is only for interactive calls the user drives (attach,
    exec). The child gets a new session so a timeout kills its whole group.
    """
    import signal
    import subprocess

    argv = [str(a) for a in argv]
    log(1, "run: " + " ".join(_shell_quote(a) for a in argv))
    label = what or argv[0]
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env,
            stdin=subprocess.PIPE if input is not None else (None if not capture else subprocess.DEVNULL),
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            start_new_session=capture,
        )
    except FileNotFoundError:
        raise ToolMissingError(f"{argv[0]} not found on PATH", _install_hint(argv[0])) from None
    except NotADirectoryError:
        raise CommandFailedError(f"cannot run {label}: {cwd} is not a directory") from None
    try:
        stdout, stderr = proc.communicate(
            input=input.encode() if isinstance(input, str) else input, timeout=timeout)
    except subprocess.TimeoutExpired:
        if capture:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            proc.kill()
        proc.wait()
        raise CommandTimedOutError(f"{label} timed out after {timeout:g}s",
                                   "the host or tool may be hung; retry later") from None
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise
    result = subprocess.CompletedProcess(
        argv, proc.returncode, (stdout or b"").decode(errors="replace") if text else (stdout or b""),
        (stderr or b"").decode(errors="replace"))
    if check and proc.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or (
            result.stdout.strip().splitlines()[-1:] if text else [])
        raise CommandFailedError(
            f"{label} failed (exit {proc.returncode})" + (f": {tail[0]}" if tail else ""),
            detail=result.stderr, returncode=proc.returncode)
    return result


def spawn(argv, *, log_path: Path, env=None, cwd=None) -> int:
    """Start a detached background process (no terminal, its own session); its pid."""
    import subprocess

    argv = [str(a) for a in argv]
    log(1, "spawn: " + " ".join(_shell_quote(a) for a in argv))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as output:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                    env=env, cwd=cwd, start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise ToolMissingError(f"{argv[0]} not found on PATH", _install_hint(argv[0])) from None
    return proc.pid


def _install_hint(tool: str) -> str:
    packages = {"tmux": "tmux", "git": "git", "docker": "docker.io", "ssh": "openssh-client",
                "ssh-keygen": "openssh-client", "aws": "awscli"}
    if tool in packages:
        return f"install it, e.g. apt-get install {packages[tool]}"
    return "install it or put it on PATH"


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def resign_host(old: Store, new: Store, host: HostRecord) -> int:
    """Re-sign a host's record and its agents' with new's keyring; how many."""
    count = 1
    for agent_id in host.agents:
        agent, _ = old.read_agent(agent_id)
        if agent is not None:
            new.write_agent(dataclasses.replace(agent, version=new.next_version(agent.id, agent.version)))
            count += 1
    new.write_host(dataclasses.replace(host, version=new.next_version(host.id, host.version)))
    return count


# Tmux agents ###############################################################


@dataclass(frozen=True, eq=False)
class PaneInfo:
    """Pane 0.0 of an agent's session, as tmux reports it."""

    session: str
    pane_pid: int
    dead: bool
    dead_status: int | None
    attached: bool
    window_activity: float | None = None    # last output in the window
    client_activity: float | None = None    # last input from an attached client


@dataclass(frozen=True, eq=False)
class AgentView:
    """An agent as seen now: its record plus its observed (reported) state."""

    record: AgentRecord
    host: "HostView"
    state: str
    verification: Verification
    exit_status: int | None = None
    attached: bool = False
    started_at: float | None = None     # reported: its last start, from its status file


@dataclass(eq=False)
class HostView:
    """A host as collected from its provider, with its agents."""

    provider: object
    record: HostRecord | None
    verification: Verification
    agents: list = field(default_factory=list)
    reachable: bool = True
    error: str = ""
    problems: list = field(default_factory=list)   # agent records that failed verification
    facts: dict = field(default_factory=dict)      # what the provider certified, for observe()

    @property
    def verify_error(self) -> str:
        if not self.verification.ok:
            return f"host record: {self.verification.reason}"
        if self.problems:
            return self.problems[0]
        if self.record is not None and tuple(self.record.permissions) != permission_union(
                [a.record.permissions for a in self.agents]):
            return "host permissions are not the union of its agents'"
        return ""

    @property
    def name(self) -> str:
        return self.record.name if self.record else "?"


class Tmux:
    """tmux on one host, on mngr's own socket so users' tmux never collides."""

    PANE_FORMAT = "\t".join(["P", "#{session_name}", "#{window_index}", "#{pane_index}",
                             "#{pane_pid}", "#{pane_dead}", "#{pane_dead_status}",
                             "#{session_attached}", "#{window_activity}"])
    CLIENT_FORMAT = "\t".join(["C", "#{client_session}", "#{client_activity}"])

    def __init__(self, socket: str, runner=None):
        self.socket = socket
        self.runner = runner or run

    def call(self, *args, **kwargs):
        return self.runner(["tmux", "-L", self.socket, *args], what=f"tmux {args[0]}", **kwargs)

    def panes(self) -> dict:
        """Pane 0 of window 0 of every session, with its window's last output and
        its clients' last input, in one call: {session: PaneInfo, or None when
        the session has no pane 0.0}."""
        result = self.call("list-panes", "-a", "-F", self.PANE_FORMAT, ";",
                           "list-clients", "-F", self.CLIENT_FORMAT, check=False)
        if result.returncode != 0:
            if "no server running" in result.stderr or "error connecting" in result.stderr:
                return {}
            if "no current target" not in result.stderr:  # that: its last session just ended
                raise CommandFailedError(f"tmux list-panes failed: {result.stderr.strip()}",
                                         detail=result.stderr)
        panes, clients = {}, {}
        for line in result.stdout.splitlines():
            parts = line.split("\t")
            if parts[0] == "C" and len(parts) == 3 and parts[2].isdigit():
                clients[parts[1]] = max(clients.get(parts[1], 0.0), float(parts[2]))
            if parts[0] != "P" or len(parts) != 9:
                continue
            _, session, window, pane, pid, dead, status, attached, activity = parts
            if window != "0" or pane != "0":
                panes.setdefault(session, None)
                continue
            panes[session] = PaneInfo(session, int(pid or 0), dead == "1",
                                      int(status) if status.isdigit() else None,
                                      attached not in ("", "0"),
                                      float(activity) if activity.isdigit() else None)
        return {session: (dataclasses.replace(pane, client_activity=clients.get(session))
                          if pane is not None and session in clients else pane)
                for session, pane in panes.items()}

    def start(self, session: str, command: str, work_dir: str, env: dict, log_path: Path) -> int:
        args = ["set-option", "-g", "remain-on-exit", "on", ";",
                "new-session", "-d", "-P", "-F", "#{pane_pid}", "-s", session,
                "-x", "200", "-y", "50", "-c", work_dir]
        for key, value in sorted(env.items()):
            args += ["-e", f"{key}={value}"]
        args += [command, ";", "pipe-pane", "-t", f"={session}:0.0",
                 f"cat >> {_shell_quote(str(log_path))}"]
        result = self.call(*args)
        pid = result.stdout.strip().splitlines()[0] if result.stdout.strip() else "0"
        return int(pid) if pid.isdigit() else 0

    def kill(self, session: str) -> None:
        result = self.call("kill-session", "-t", f"={session}", check=False)
        if result.returncode != 0 and "can't find session" not in result.stderr \
                and "no server running" not in result.stderr \
                and "error connecting" not in result.stderr:
            raise CommandFailedError(f"tmux kill-session failed: {result.stderr.strip()}")

    def send(self, session: str, text: str) -> None:
        target = f"={session}:0.0"
        self.call("send-keys", "-t", target, "-l", text, ";", "send-keys", "-t", target, "Enter")

    def capture(self, session: str, lines: int) -> str:
        """The last lines of the pane's output (scrollback and screen, blank tail dropped)."""
        text = self.call("capture-pane", "-p", "-J", "-t", f"={session}:0.0",
                         "-S", str(-lines)).stdout
        kept = text.rstrip("\n").splitlines()[-lines:]
        return "\n".join(kept) + "\n" if kept else ""

    def attach_argv(self, session: str) -> list:
        return ["tmux", "-L", self.socket, "attach-session", "-t", f"={session}"]


def agent_state(record_pid: int, pane) -> str:
    """running / done / replaced / stopped, from pane 0 of the agent's session."""
    if pane is False:
        return "stopped"
    if pane is None:
        return "replaced"
    if pane.dead:
        return "done"
    if record_pid and pane.pane_pid != record_pid:
        return "replaced"
    return "running"


def boot_time():
    """This machine's boot time (epoch seconds) from /proc/stat, or None."""
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def mtime(path: Path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def read_status(agent_dir: Path) -> dict:
    try:
        status = read_json(agent_dir / "status")
    except (ValueError, OSError):
        return {}
    return status if isinstance(status, dict) else {}


# In-host: script hooks, the deploy lock, the idle watcher ##################

HOOK_TIMEOUT = 60.0
WATCH_INTERVAL = 10.0
# how the watcher stops its host: agents only; PID 1 exits (containers); agents, then the
# machine powers off (ssh and cloud machines that allow it)
STOP_MODES = ("agents", "pid1", "shutdown")
HOST_COMMANDS = ("watch", "run-hooks", "host-info", "host-init", "host-report", "deploy", "host-stop")
# host-init's sentinel exit codes, which the controller explains
EXIT_INIT_NO_PYTHON = 90
EXIT_INIT_OLD_PYTHON = 91
EXIT_INIT_NO_TMUX = 92
INIT_EXIT_REASONS = {
    EXIT_INIT_NO_PYTHON: "the image has no python3",
    EXIT_INIT_OLD_PYTHON: "the image's python3 is older than 3.9",
    EXIT_INIT_NO_TMUX: "the image has no tmux",
}
EXIT_NO_PYTHON = 3                # the sentinel of the controller's python3 probe


# How a host runs its copied-in mngr.py: imported from its bin dir rather than run as a
# script, so the interpreter keeps (and can be sent) its compiled bytecode instead of
# compiling the whole file again on every call.
HOST_BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); import mngr; mngr.exit_quickly(mngr.main())"


def host_python(python, bin_dir) -> list:
    """argv running this file's commands on a host: [python, ..., bin_dir]; add the command."""
    return [str(python), "-I", "-S", "-c", HOST_BOOT, str(bin_dir)]


def host_bytecode() -> tuple:
    """(path under the host dir, bytes) of this file compiled for this interpreter, checked
    against the file's hash (not its mtime, which a copy changes); made once per version."""
    import hashlib
    import importlib.util
    import py_compile

    source = Path(__file__).resolve()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    tag = sys.implementation.cache_tag
    cached = Path.home() / ".cache" / "mngr" / f"mngr-{digest}.{tag}.pyc"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        made = cached.with_name(f".{cached.name}.{os.getpid()}")
        py_compile.compile(str(source), cfile=str(made), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        os.replace(made, cached)
    return f"bin/{Path(importlib.util.cache_from_source('mngr.py')).as_posix()}", cached.read_bytes()


def run_hooks(directory: Path, log_path: Path, moment: str, env=None,
              timeout: float = HOOK_TIMEOUT) -> list:
    """Run the executable files of a hooks dir in name order, each bounded by a
    timeout; log each run. A failing hook is logged and never stops the rest."""
    try:
        hooks = sorted(p for p in Path(directory).iterdir()
                       if p.is_file() and os.access(p, os.X_OK))
    except (FileNotFoundError, NotADirectoryError):
        return []
    events = []
    for hook in hooks:
        started = time.time()
        event = {"at": started, "event": "hook", "moment": moment, "hook": hook.name}
        try:
            result = run([str(hook)], timeout=timeout, check=False, cwd=str(directory),
                         env=env, what=f"{moment} hook {hook.name}")
            event["exit_code"] = result.returncode
            if result.returncode:
                event["stderr"] = result.stderr[-500:]
        except MngrError as exc:
            event.update(exit_code=None, error=exc.line())
        event["duration"] = round(time.time() - started, 3)
        append_jsonl(log_path, event)
        events.append(event)
    return events


def deploy_lock_since(host_dir: HostDir):
    """When the oldest deploy still holding the lock began, or None (no deploy).

    deploy_lock/ exists empty at rest; a controller deploying puts a file in
    it; the watcher takes the lock by removing the empty dir."""
    try:
        stamps = [mtime(p) for p in host_dir.deploy_lock.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return None
    stamps = [t for t in stamps if t is not None]
    return min(stamps) if stamps else None


def ssh_session_open() -> bool:
    """Whether an interactive SSH session is open here (an sshd serving a pts)."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read(200)
        except OSError:
            continue
        if cmdline.startswith(b"sshd:") and b"@pts/" in cmdline:
            return True
    return False


def session_env(host_dir: HostDir, record: AgentRecord) -> dict:
    """An agent's environment: the host's env, the agent's env, then mngr's variables."""
    agent_dir = host_dir.agent_dir(record.id)
    env = read_env_file(host_dir.env)
    env.update(read_env_file(agent_dir / "env"))
    env.update({
        ENV_HOST_DIR: str(host_dir.root),
        "MNGR_AGENT_ID": record.id,
        "MNGR_AGENT_NAME": record.name,
        "MNGR_AGENT_STATE_DIR": str(agent_dir),
        "MNGR_AGENT_WORK_DIR": record.work_dir,
    })
    return env


def start_agent_session(host_dir: HostDir, record: AgentRecord, tmux: Tmux, python: str,
                        base_env=None) -> int:
    """Start an agent's tmux session on this host, record its start, and run its
    start hooks in the background. The same code runs on the controller for the
    local host and inside a host (``mngr.py agent-start``) for the others."""
    if not Path(record.work_dir).is_dir():
        raise RefusedError(f"work dir {record.work_dir} of {record.name} is gone",
                           "restore it, or destroy the agent")
    agent_dir = host_dir.agent_dir(record.id)
    agent_skeleton(agent_dir)
    env = session_env(host_dir, record)
    pid = tmux.start(record.session, record.command, record.work_dir, env,
                     agent_dir / "logs" / "output.log")
    write_json(agent_dir / "status", {"pane_pid": pid, "started_at": time.time()})
    append_jsonl(agent_dir / "events" / "events.jsonl",
                 {"at": time.time(), "event": "started", "pane_pid": pid})
    hooks = agent_dir / "hooks" / "start"
    if any(hooks.iterdir()):  # start hooks run in the background, logged on the host
        spawn([*host_python(python, host_dir.bin), "run-hooks", hooks,
               "--moment", f"start:{record.name}"],
              log_path=host_dir.logs / "hooks.log", env={**(base_env or os.environ), **env})
    return pid


def read_unverified_agents(host_dir: HostDir, payload: dict) -> list:
    """The agent records a host's data.json lists, read without a key (inside a host)."""
    agents = []
    for agent_id in payload.get("agents") or ():
        try:
            document = read_json(host_dir.agent_dir(str(agent_id)) / "data.json")
            agents.append(AgentRecord.from_dict(document["payload"]))
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return agents


def host_report(host_dir: HostDir, tmux: Tmux) -> dict:
    """Everything the controller needs from a running host, in one call: the
    signed documents as they are here (the controller checks them), tmux's view
    of every agent, and the reported activity. All of it is *reported*."""
    try:
        document = read_json(host_dir.data)
    except ValueError:
        document = "malformed"
    payload = document.get("payload") if isinstance(document, dict) else None
    agent_ids = [str(a) for a in (payload or {}).get("agents") or ()]
    agents = {}
    for agent_id in agent_ids:
        agent_dir = host_dir.agent_dir(agent_id)
        try:
            agent_document = read_json(agent_dir / "data.json")
        except ValueError:
            agent_document = "malformed"
        agents[agent_id] = {"document": agent_document, "status": read_status(agent_dir),
                            "output_mtime": mtime(agent_dir / "logs" / "output.log")}
    panes = {}
    for session, pane in tmux.panes().items():
        panes[session] = dataclasses.asdict(pane) if pane is not None else None
    return {
        "version": __version__,
        "document": document,
        "agents": agents,
        "panes": panes,
        "activity": {s: mtime(host_dir.activity / s) for s in ("agent", "user", "ssh")},
        "deploy_lock_since": deploy_lock_since(host_dir),
        "ssh_open": ssh_session_open(),
        "now": time.time(),
    }


class Watcher:
    """The in-host idle watcher: `python3 $MNGR_HOST_DIR/bin/mngr.py watch`.

    It is a convenience, not the guard: code in the host can kill it, and
    `mngr enforce` outside is the backstop. It reads the policy from data.json
    without verifying it (it has no key), gathers activity itself, and asks
    the same decide() as enforce.
    """

    def __init__(self, host_dir: HostDir, socket: str, interval: float, on_stop: str,
                 boot_time=None, shutdown_command: str = ""):
        self.host_dir = host_dir
        self.tmux = Tmux(socket)
        self.interval = interval
        self.on_stop = on_stop
        self.shutdown_command = shutdown_command or default_shutdown_command()
        # the host's boot as its provider knows it; on the local host, the watcher's start
        self.boot = time.time() if boot_time is None else boot_time
        self.stopping = False
        self.log_path = host_dir.events / "watcher.jsonl"

    def log(self, event: str, **fields) -> None:
        if self.host_dir.root.is_dir():  # never re-make a host dir that was removed
            append_jsonl(self.log_path, {"at": time.time(), "event": event, **fields})

    def observe(self, now: float):
        """(policy, observation, live agent sessions) from what this host shows."""
        document = read_json(self.host_dir.data)
        if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
            raise ValueError("data.json is missing or malformed")
        payload = document["payload"]
        policy = IdlePolicy.from_dict(payload.get("policy") or {})
        agents = read_unverified_agents(self.host_dir, payload)
        panes = self.tmux.panes()
        reported, live = [], []
        for agent in agents:
            pane = panes.get(agent.session)
            if pane and not pane.dead:
                live.append(agent.session)
            if pane and pane.window_activity:
                reported.append(("agent", pane.window_activity))
            if pane and pane.client_activity:
                reported.append(("user", pane.client_activity))
            started = read_status(self.host_dir.agent_dir(agent.id)).get("started_at")
            if isinstance(started, (int, float)):
                reported.append(("start", float(started)))
        if ssh_session_open():
            touch(self.host_dir.activity / "ssh")
        for source in ("agent", "user", "ssh"):
            stamp = mtime(self.host_dir.activity / source)
            if stamp is not None:
                reported.append((source, stamp))
        created = [a.created_at for a in agents]
        state = str(payload.get("state", "running"))
        # a container host is up while its PID 1 is, a machine that may power off while it
        # runs; the local host "runs" while agents do
        up = bool(live) or self.on_stop in ("pid1", "shutdown")
        observation = Observation(
            exists=True, running=up, state=derive_state(True, up, state),
            # measured from this boot at the earliest: stale activity cannot stop a fresh host
            state_since=max(float(payload.get("state_since") or 0.0), self.boot),
            certified_boot_time=self.boot,
            # the host's creation, so a machine up for weeks is not past its max lifetime
            certified_created_at=_number_or_none(payload.get("created_at")),
            signed_created_at=max(created) if created else None,
            process_alive=bool(live), reported=tuple(sorted(reported)),
            deploy_lock_since=deploy_lock_since(self.host_dir))
        # the watcher trusts what it gathered itself; enforce outside does not
        return dataclasses.replace(policy, trust="trusted"), observation, live

    def take_deploy_lock(self, policy: IdlePolicy, now: float) -> bool:
        """rmdir deploy_lock: fails while a deploy holds it, unless that deploy is stale."""
        lock = self.host_dir.deploy_lock
        try:
            os.rmdir(lock)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        since = deploy_lock_since(self.host_dir)
        if since is not None and now - since < policy.deploy_timeout:
            self.log("deploy_in_progress", since=since)
            return False
        self.log("crashed_deploy_ignored", since=since)
        for entry in lock.iterdir():
            entry.unlink()
        os.rmdir(lock)
        return True

    def stop_host(self, live: list) -> None:
        if self.on_stop == "pid1":  # PID 1 runs the stop hooks, stops the agents, and exits
            self.log("stopping_host", how="pid1")
            os.kill(1, signal.SIGTERM)
            return
        try:
            stop_here(self.host_dir, self.tmux, live)
            self.log("stopped_agents", sessions=live, how=self.on_stop)
            if self.on_stop == "shutdown":
                self.log("shutting_down", command=self.shutdown_command)
                result = run(["sh", "-c", self.shutdown_command], check=False, timeout=HOOK_TIMEOUT)
                if result.returncode != 0:
                    self.log("error", error=f"shutdown failed (exit {result.returncode}): "
                                            f"{result.stderr.strip()[-300:]}")
        finally:
            self.host_dir.deploy_lock.mkdir(exist_ok=True)  # the host stays up: release the lock

    def round(self) -> str:
        """One look: 'stopped', 'idle' (nothing to watch), or 'watching'."""
        now = time.time()
        policy, observation, live = self.observe(now)
        decision = decide(observation, policy, now)
        if decision.action != "none":
            self.log("decision", **decision.to_dict())
        if decision.action in ("stop", "force_stop") and observation.running:
            if not self.take_deploy_lock(policy, now):
                return "watching"
            self.stop_host(live)
            return "stopped"
        return "watching" if live else "idle"

    def wait(self) -> None:
        """Sleep one interval, waking early on SIGTERM or when data.json changes."""
        before = mtime(self.host_dir.data)
        deadline = time.monotonic() + self.interval
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            if mtime(self.host_dir.data) != before:
                return

    def watch(self, once: bool = False) -> int:
        def on_term(signum, frame):
            self.stopping = True
        signal.signal(signal.SIGTERM, on_term)
        self.host_dir.skeleton()
        lock = FileLock(self.host_dir.root / "watcher.lock", blocking=False)
        if not lock.acquire():
            return EXIT_OK  # a watcher already runs for this host: once per host
        try:
            atomic_write(self.host_dir.root / "watcher.pid", f"{os.getpid()}\n".encode())
            self.host_dir.deploy_lock.mkdir(exist_ok=True)
            self.log("started", pid=os.getpid(), interval=self.interval)
            if self.on_stop != "pid1":  # under host-init, PID 1 runs them, once a boot
                hooks_log = self.host_dir.events / "hooks.jsonl"
                run_hooks(self.host_dir.hooks / "boot", hooks_log, "boot")
                run_hooks(self.host_dir.hooks / "post_services", hooks_log, "post_services")
            while not self.stopping:
                if not self.host_dir.data.parent.is_dir():
                    break  # the host dir is gone (the host was destroyed): nothing left to watch
                try:
                    outcome = self.round()
                except (MngrError, OSError, ValueError, KeyError, TypeError) as exc:
                    self.log("error", error=str(exc))  # logged and retried, never fatal
                    outcome = "watching"
                if once or outcome == "stopped" or outcome == "idle" and self.on_stop == "agents":
                    break
                self.wait()
            self.log("exited", reason="SIGTERM" if self.stopping else "done")
        finally:
            try:
                os.unlink(self.host_dir.root / "watcher.pid")
            except FileNotFoundError:
                pass
            lock.release()
        return EXIT_OK


class HostInit:
    """PID 1 of a container host: `python3 $MNGR_HOST_DIR/bin/mngr.py host-init`.

    Reaps zombies, runs boot hooks, starts the agents flagged start-on-boot
    and the idle watcher (and starts the watcher again if something kills
    it); on SIGTERM runs stop hooks, stops the agents and exits. So `docker
    stop` is a clean stop, and the watcher stops an idle host by signalling
    PID 1.
    """

    def __init__(self, host_dir: HostDir, socket: str, interval: float):
        self.host_dir = host_dir
        self.tmux = Tmux(socket)
        self.interval = interval
        self.stopping = False
        self.watcher = 0
        self.boot = time.time()
        self.hooks_log = host_dir.events / "hooks.jsonl"

    def log(self, event: str, **fields) -> None:
        append_jsonl(self.host_dir.events / "init.jsonl", {"at": time.time(), "event": event, **fields})

    def reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def start_watcher(self) -> None:
        self.watcher = spawn([*host_python(sys.executable, self.host_dir.bin), "watch",
                              "--tmux-socket", self.tmux.socket, "--interval", self.interval,
                              "--on-stop", "pid1", "--boot-time", self.boot],
                             log_path=self.host_dir.logs / "watcher.log")

    def watcher_alive(self) -> bool:
        try:
            os.kill(self.watcher, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie not yet reaped is dead too
            with open(f"/proc/{self.watcher}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def run(self) -> int:
        def on_term(signum, frame):
            self.stopping = True
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, on_term)
        self.host_dir.skeleton()
        self.host_dir.deploy_lock.mkdir(exist_ok=True)
        self.log("booted", pid=os.getpid())
        run_hooks(self.host_dir.hooks / "boot", self.hooks_log, "boot")
        try:  # a deploy starting agents at this moment waits: one tmux server, started once
            with FileLock(self.host_dir.sessions_lock):
                payload = read_json(self.host_dir.data)["payload"]
                for agent in read_unverified_agents(self.host_dir, payload):
                    if agent.start_on_boot:
                        start_agent_session(self.host_dir, agent, self.tmux, sys.executable)
        except (MngrError, OSError, ValueError, KeyError, TypeError) as exc:
            self.log("error", error=f"starting agents: {exc}")
        self.start_watcher()
        run_hooks(self.host_dir.hooks / "post_services", self.hooks_log, "post_services")
        checked = time.monotonic()
        while not self.stopping:
            self.reap()
            if time.monotonic() - checked > 5:
                checked = time.monotonic()
                if not self.watcher_alive():
                    self.log("watcher_restarted")
                    self.start_watcher()
            time.sleep(0.2)
        self.log("stopping")
        run_hooks(self.host_dir.hooks / "stop", self.hooks_log, "stop")
        try:
            os.kill(self.watcher, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.tmux.call("kill-server", check=False)
        self.reap()
        self.log("stopped")
        return EXIT_OK


def deploy_here(host_dir: HostDir, tar_bytes: bytes, start, tmux: Tmux) -> int:
    """The controller's one call into a running host: holding the deploy lock, write
    each file of the tar atomically under the host dir, then start the named agents."""
    root = host_dir.root.resolve()
    stamp = host_dir.deploy_lock / f"deploy-{os.getpid()}"
    try:  # hold the deploy lock: the watcher never stops a host mid-deploy
        os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileNotFoundError:
        raise RefusedError("the host's idle watcher is stopping it right now",
                           "try again in a few seconds") from None
    try:
        return _deploy_files_and_start(host_dir, root, tar_bytes, start, tmux)
    finally:
        try:
            stamp.unlink()
        except FileNotFoundError:
            pass


def _deploy_files_and_start(host_dir: HostDir, root: Path, tar_bytes: bytes, start, tmux) -> int:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            target = (root / member.name).resolve()
            if root not in target.parents or not member.isfile():
                raise UsageError(f"refusing {member.name!r}: not a file inside the host dir")
            atomic_write(target, tar.extractfile(member).read(), mode=member.mode & 0o777)
    started = {}
    with FileLock(host_dir.sessions_lock):  # PID 1 may be starting boot agents right now
        for agent_id in start:
            try:
                payload = read_json(host_dir.agent_dir(agent_id) / "data.json")["payload"]
                record = AgentRecord.from_dict(payload)
            except (ValueError, KeyError, TypeError) as exc:
                raise NotFoundError(f"no usable agent record {agent_id}: {exc}") from None
            tmux.kill(record.session)
            started[agent_id] = start_agent_session(host_dir, record, tmux, sys.executable)
    print(json.dumps({"started": started}))
    return EXIT_OK


def _number_or_none(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def default_shutdown_command() -> str:
    """Power this machine off: directly as root, through sudo (no password) otherwise."""
    return "shutdown -h now" if os.geteuid() == 0 else "sudo -n shutdown -h now"


def stop_here(host_dir: HostDir, tmux: Tmux, sessions=None) -> list:
    """Stop this host's agents: stop hooks, then their sessions (all that data.json
    lists when not told). The sessions stopped."""
    if sessions is None:
        try:
            payload = read_json(host_dir.data)["payload"]
        except (ValueError, KeyError, TypeError):
            payload = {}
        live = {s for s, pane in tmux.panes().items() if pane is not None}
        sessions = [a.session for a in read_unverified_agents(host_dir, payload) if a.session in live]
    run_hooks(host_dir.hooks / "stop", host_dir.events / "hooks.jsonl", "stop")
    for session in sessions:
        tmux.kill(session)
    return sessions


def ensure_watcher(host_dir: HostDir, socket: str, interval: float, on_stop: str,
                   boot_time, shutdown_command: str = "") -> None:
    """Start this host's watcher unless one runs (it holds watcher.lock)."""
    lock = FileLock(host_dir.root / "watcher.lock", blocking=False)
    if not lock.acquire():
        return
    lock.release()
    argv = [*host_python(sys.executable, host_dir.bin), "watch", "--tmux-socket", socket,
            "--interval", interval, "--on-stop", on_stop]
    if boot_time is not None:
        argv += ["--boot-time", boot_time]
    if shutdown_command:
        argv += ["--shutdown-command", shutdown_command]
    spawn(argv, log_path=host_dir.logs / "watcher.log",
          env={**os.environ, ENV_HOST_DIR: str(host_dir.root)})


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a"):
        os.utime(path, None)


def host_main(argv) -> int:
    """The in-host commands, parsed without the controller's CLI (stdlib only)."""
    import argparse

    parser = argparse.ArgumentParser(prog="mngr.py")
    subs = parser.add_subparsers(dest="command", required=True)
    watch = subs.add_parser("watch", help="the idle watcher of this host")
    watch.add_argument("--once", action="store_true", help="one round, then exit")
    watch.add_argument("--interval", type=float, default=WATCH_INTERVAL)
    watch.add_argument("--tmux-socket", default=DEFAULT_ROOT_NAME)
    watch.add_argument("--on-stop", choices=STOP_MODES, default="agents")
    watch.add_argument("--boot-time", type=float, help="the host's boot (epoch seconds); "
                       "default: now, the watcher's start")
    watch.add_argument("--shutdown-command", default="",
                       help="with --on-stop shutdown: how to power off (default: shutdown -h now)")
    hooks = subs.add_parser("run-hooks", help="run a hooks dir in name order, logged")
    hooks.add_argument("directory")
    hooks.add_argument("--moment", default="start")
    subs.add_parser("host-info", help="this file's version and python, as JSON")
    init = subs.add_parser("host-init", help="PID 1 of a container host")
    init.add_argument("--tmux-socket", default=DEFAULT_ROOT_NAME)
    init.add_argument("--interval", type=float, default=WATCH_INTERVAL)
    report = subs.add_parser("host-report", help="this host's state for the controller, as JSON")
    report.add_argument("--tmux-socket", default=DEFAULT_ROOT_NAME)
    deploy = subs.add_parser("deploy", help="write the files of a tar on stdin into the host "
                             "dir, each atomically, then start agents")
    deploy.add_argument("--start", action="append", default=[], metavar="AGENT_ID")
    deploy.add_argument("--tmux-socket", default=DEFAULT_ROOT_NAME)
    deploy.add_argument("--watcher", choices=STOP_MODES,
                        help="then start the watcher, stopping the host this way, unless it runs")
    deploy.add_argument("--interval", type=float, default=WATCH_INTERVAL)
    deploy.add_argument("--boot-time", type=float)
    deploy.add_argument("--shutdown-command", default="")
    stop = subs.add_parser("host-stop", help="run the stop hooks and stop every agent here")
    stop.add_argument("--tmux-socket", default=DEFAULT_ROOT_NAME)
    args = parser.parse_args(argv)
    host_dir = HostDir(os.environ.get(ENV_HOST_DIR) or Path.home() / f".{DEFAULT_ROOT_NAME}")
    try:
        return _host_command(args, host_dir)
    except MngrError as exc:
        print(f"mngr: error: {exc.line()}", file=sys.stderr)
        return exc.exit_code


def _host_command(args, host_dir: HostDir) -> int:
    if args.command == "watch":
        return Watcher(host_dir, args.tmux_socket, args.interval, args.on_stop,
                       args.boot_time, args.shutdown_command).watch(args.once)
    if args.command == "run-hooks":
        run_hooks(Path(args.directory), host_dir.events / "hooks.jsonl", args.moment)
        return EXIT_OK
    if args.command == "host-init":
        return HostInit(host_dir, args.tmux_socket, args.interval).run()
    if args.command == "host-report":
        print(json.dumps(host_report(host_dir, Tmux(args.tmux_socket))))
        return EXIT_OK
    if args.command == "deploy":
        code = deploy_here(host_dir, sys.stdin.buffer.read(), args.start, Tmux(args.tmux_socket))
        if args.watcher:
            ensure_watcher(host_dir, args.tmux_socket, args.interval, args.watcher, args.boot_time,
                           args.shutdown_command)
        return code
    if args.command == "host-stop":
        print(json.dumps({"stopped": stop_here(host_dir, Tmux(args.tmux_socket))}))
        return EXIT_OK
    try:
        document = read_json(host_dir.data)
    except ValueError:
        document = "malformed"
    print(json.dumps({"version": __version__, "python": sys.version.split()[0],
                      "host_dir": str(host_dir.root), "data": document}))
    return EXIT_OK


# Settings and the controller's files ######################################


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading settings needs Python 3.11+ or the tomli package",
                              "pip install tomli") from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"bad settings file {path}: {exc}", "fix the file or remove it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from None


def root_name(env) -> str:
    name = env.get(ENV_ROOT_NAME) or DEFAULT_ROOT_NAME
    return validate_name(name, f"{ENV_ROOT_NAME} value")


def user_dir(env) -> Path:
    """The controller's own files: version cache, audit log, locks."""
    return Path(env.get("HOME") or Path.home()) / f".{root_name(env)}"


def controller_id(env) -> str:
    """This controller's id, made once: it marks the containers and instances it makes,
    so that two controllers using one engine or one account never act on each other's."""
    path = user_dir(env) / "controller-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        made = path.with_name(f".controller-id.{os.getpid()}")
        made.write_text(new_id() + "\n")
        try:  # whole or not at all; the first of two racing processes wins
            os.link(made, path)
        except FileExistsError:
            pass
        finally:
            made.unlink()
    text = path.read_text().strip()
    if not is_id(text):
        raise ConfigError(f"{path} is damaged: it must hold this controller's id",
                          "restore it from a backup: the containers and instances made by this "
                          "controller are marked with it")
    return text


def config_dir(env) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / root_name(env)


def project_dir(cwd: Path):
    """The nearest enclosing dir that has a .mngr/ dir, else the git top, else None."""
    for parent in (cwd, *cwd.parents):
        if (parent / ".mngr").is_dir():
            return parent
    for parent in (cwd, *cwd.parents):
        if (parent / ".git").exists():
            return parent
    return None


def settings_files(env, cwd: Path) -> list:
    """Settings in increasing precedence, as (scope, path)."""
    files = [("user", config_dir(env) / "settings.toml")]
    project = project_dir(cwd)
    if project is not None:
        files.append(("project", project / ".mngr" / "settings.toml"))
        files.append(("local", project / ".mngr" / "settings.local.toml"))
    return files


def merge_settings(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


# What a project's settings may set without being trusted: how output looks. A project
# dir can be written by code inside a host (a mounted source dir), so policy, providers,
# plugins, agent types and every other option need the user's trust, as git never runs
# hooks a repository brings.
PROJECT_SAFE_OPTIONS = frozenset({"format", "quiet", "verbose", "running", "stopped", "include",
                                  "exclude", "connect", "lines"})


def _untrusted_part(table: dict):
    """(what a project may set, the keys it may not) of a project's settings."""
    kept, dropped = {}, []
    for key, value in table.items():
        if key == "prefix":
            kept[key] = value
        elif key == "commands" and isinstance(value, dict):
            for command, options in value.items():
                for option, setting in (options.items() if isinstance(options, dict) else [(None, 0)]):
                    if option in PROJECT_SAFE_OPTIONS:
                        kept.setdefault("commands", {}).setdefault(command, {})[option] = setting
                    else:
                        dropped.append(f"commands.{command}" + (f".{option}" if option else ""))
        else:
            dropped.append(key)
    return kept, dropped


def load_settings(env, cwd: Path) -> dict:
    settings = {}
    for scope, path in settings_files(env, cwd):
        table = _load_toml(path)
        if scope != "user":
            project = path.parent.parent.resolve()
            trusted = settings.get("trusted_projects") or []
            if not isinstance(trusted, list) or str(project) not in [str(Path(str(t)).expanduser().resolve())
                                                                      for t in trusted]:
                table, dropped = _untrusted_part(table)
                if dropped:
                    warn(f"ignoring {', '.join(sorted(dropped))} in {path}: a project may not set "
                         f"them (code in a host may write it); to allow it, add "
                         f"trusted_projects = [\"{project}\"] to {config_dir(env) / 'settings.toml'}")
            table.pop("trusted_projects", None)   # a project never trusts itself
        settings = merge_settings(settings, table)
    return settings


def load_keyring(env) -> Keyring:
    """The controller's keyring; made (0600) on first use."""
    path = config_dir(env) / "keys.json"
    try:
        data = read_json(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot read keyring {path}: {exc}", "restore it from a backup") from None
    if data is None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with FileLock(path.with_name(".keys.lock")):
            data = read_json(path)
            if data is None:
                data = {"keys": [_new_key_entry()]}
                write_json(path, data, mode=0o600)
    try:
        keys = tuple(SigningKey(k["id"], bytes.fromhex(k["secret"]), float(k["created_at"]))
                     for k in data["keys"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"keyring {path} is malformed", "restore it from a backup") from None
    if not keys:
        raise ConfigError(f"keyring {path} has no keys", "run: mngr keys rotate")
    return Keyring(keys)


def _new_key_entry() -> dict:
    return {"id": os.urandom(4).hex(), "secret": os.urandom(32).hex(), "created_at": time.time()}


class VersionCache:
    """The highest signed version seen per record, kept on the controller.

    A replayed older data.json is then 'tampered'. A record the cache has
    never seen is accepted and remembered (trust on first sight), so losing
    the cache can never turn a healthy host into a tampered one.
    """

    def __init__(self, path: Path):
        self.path = path
        self.seen = self._load()
        self.dirty = False

    def _load(self) -> dict:
        """The cache on disk; anything unreadable counts as lost, never as a crash."""
        try:
            data = read_json(self.path)
        except (ValueError, OSError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items()
                if isinstance(v, int) and not isinstance(v, bool)}

    def minimum(self, record_id: str) -> int:
        return self.seen.get(record_id, 0)

    def saw(self, record_id: str, version: int) -> None:
        if version > self.seen.get(record_id, 0):
            self.seen[record_id] = version
            self.dirty = True

    def save(self) -> None:
        """Merge with what another process may have saved meanwhile: never go down."""
        if self.dirty:
            with FileLock(self.path.with_name(".versions.lock")):
                merged = self._load()
                for key, value in self.seen.items():
                    merged[key] = max(value, merged.get(key, 0))
                write_json(self.path, merged, mode=0o600)
            self.dirty = False


class Store:
    """Signed records on one host dir, checked against the version cache."""

    def __init__(self, host_dir: HostDir, keyring: Keyring, versions: VersionCache):
        self.host_dir = host_dir
        self.keyring = keyring
        self.versions = versions

    def _read(self, path: Path, kind: str, record_id: str) -> Verification:
        result = verify_file(path, self.keyring, kind, record_id)
        if result.ok:
            seen_id, version = result.payload["id"], result.payload["version"]
            seen = self.versions.minimum(seen_id)
            if version < seen:
                return Verification(False, f"older version than seen ({version} < {seen})")
            self.versions.saw(seen_id, version)
        return result

    def read_host(self):
        """(HostRecord or None, Verification)."""
        return self._parse(self._read(self.host_dir.data, "host", ""), HostRecord)

    def read_agent(self, agent_id: str):
        return self._parse(self._read(self.host_dir.agent_dir(agent_id) / "data.json",
                                      "agent", agent_id), AgentRecord)

    @staticmethod
    def _parse(result: Verification, cls):
        if not result.ok:
            return None, result
        try:
            return cls.from_dict(result.payload), result
        except (KeyError, TypeError, ValueError):
            return None, Verification(False, "malformed")

    def write(self, path: Path, record) -> None:
        payload = record.to_dict()
        document = sign_payload(self.keyring, payload)
        write_json(path, document)
        self.versions.saw(record.id, record.version)

    def write_host(self, record: HostRecord) -> None:
        self.write(self.host_dir.data, record)

    def write_agent(self, record: AgentRecord) -> None:
        self.write(self.host_dir.agent_dir(record.id) / "data.json", record)

    def next_version(self, record_id: str, current: int) -> int:
        return max(current, self.versions.minimum(record_id)) + 1


# Agent types, env and work dirs (controller side) ##########################


def agent_types(ctx) -> dict:
    """Every agent type: the ones plugins declare (claude, codex, ...), then settings'."""
    custom = ctx.settings.get("agent_types") or {}
    if not isinstance(custom, dict) or not all(isinstance(v, dict) for v in custom.values()):
        raise ConfigError("settings: [agent_types] must hold tables, e.g. [agent_types.NAME]")
    return {**ctx.plugins.agent_types(), **custom}, set(custom)


def resolve_agent_command(types: dict, from_settings, type_name, agent_cmd, extra_args, which=None):
    """(type name, shell command) for create; refuses before anything is made.

    A type is a table with command, env and parent_type; one with no entry is
    a program on PATH. which(): where a program is found (None: not found)."""
    import shlex
    import shutil

    which = which or shutil.which
    tail = "".join(" " + shlex.quote(a) for a in extra_args)
    if agent_cmd:
        if type_name:
            raise UsageError(f"both a type ({type_name}) and --agent-cmd given", "use one of them")
        return "generic", agent_cmd + tail
    type_name = type_name or DEFAULT_AGENT_TYPE
    seen, name, command, origin = [], type_name, None, None
    while name in types:
        if name in seen:
            raise ConfigError(f"agent type {type_name!r} has a parent_type cycle: "
                              + " -> ".join(seen + [name]))
        seen.append(name)
        if command is None and types[name].get("command"):
            command, origin = str(types[name]["command"]), name
        name = types[name].get("parent_type")
        if not name:
            break
    if command is None:
        if seen:
            raise ConfigError(f"agent type {type_name!r} has no command and no parent_type with one")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", type_name) or which(type_name) is None:
            raise UsageError(f"unknown agent type {type_name!r}", _known_types_hint(types))
        command = shlex.quote(type_name)
    elif origin not in from_settings:  # a plugin's type runs a program: it must be there
        program = shlex.split(command)[0]
        if which(program) is None:
            raise ToolMissingError(f"{program} not found on PATH",
                                   "install it, or run another agent: --agent-cmd 'CMD'")
    return type_name, command + tail


def _known_types_hint(types) -> str:
    return f"known types: {', '.join(sorted(types))}; or a program on PATH, or --agent-cmd 'CMD'"


def agent_type_env(types: dict, type_name: str) -> dict:
    """The env of a type and its parents (the child's values win)."""
    chain, name = [], type_name
    while name in types and name not in chain:
        chain.append(name)
        name = types[name].get("parent_type")
    env = {}
    for name in reversed(chain):
        values = types[name].get("env") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"agent type {name}: env must be a table")
        env.update({str(k): str(v) for k, v in values.items()})
    return env


def agent_env_from_args(args, env) -> dict:
    """--env-file, then --env, then --pass-env; refuses bad entries."""
    result = {}
    for path in args.env_file:
        if not Path(path).is_file():
            raise UsageError(f"no env file {path}", "give a file of KEY=VALUE lines")
        result.update(read_env_file(Path(path)))
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise UsageError(f"bad --env {item!r}", "use KEY=VALUE")
        result[key] = value
    for key in args.pass_env:
        if key not in env:
            raise UsageError(f"--pass-env {key}: {key} is not set in your environment")
        result[key] = env[key]
    return result


def agent_basics(ctx, args, name, programs_here: bool = True):
    """(name, type, command, env, permissions) for create, whatever the provider;
    refuses early. programs_here: the agent runs on this (trusted) machine, so its
    program must be on PATH, and its env needs no env: grants (a warning instead)."""
    types, from_settings = agent_types(ctx)
    agent_type, command = resolve_agent_command(types, from_settings, args.agent_type,
                                                args.agent_cmd, args.extra,
                                                None if programs_here else str)
    env = agent_type_env(types, agent_type)
    env.update(agent_env_from_args(args, ctx.env))
    name = validate_name(name or f"{agent_type if agent_type != 'generic' else 'agent'}-"
                                 f"{os.urandom(2).hex()}")
    declared = []
    for type_name in _type_chain(types, agent_type):
        declared += list(types[type_name].get("permissions") or ())
    permissions = validate_permissions(ctx, list(args.grant) + declared, name)
    missing = [key for key in sorted(env) if not grants(permissions, "env", key)]
    if missing and programs_here:
        warn(f"env {', '.join(missing)} without an env: grant; the local host is trusted, so "
             "it is passed anyway")
    elif missing:
        raise RefusedError(f"env {', '.join(missing)} needs a grant to reach this host",
                           "add " + " ".join(f"--grant env:{key}" for key in missing))
    return name, agent_type, command, env, permissions


def _type_chain(types: dict, type_name: str) -> list:
    chain, name = [], type_name
    while name in types and name not in chain:
        chain.append(name)
        name = types[name].get("parent_type")
    return chain


def git(source, *args, **kwargs):
    return run(["git", "-C", str(source), *args], what=f"git {args[0]}", **kwargs)


def git_toplevel(path: Path):
    result = git(path, "rev-parse", "--show-toplevel", check=False)
    return Path(result.stdout.strip()) if result.returncode == 0 else None


def git_is_dirty(path: Path) -> bool:
    return bool(git(path, "status", "--porcelain").stdout.strip())


# Providers and plugins #####################################################

BUILTIN_PROVIDERS = {"local": "mngr_providers.local:LocalProvider",
                     "docker": "mngr_providers.docker:DockerProvider",
                     "ssh": "mngr_providers.ssh:SshProvider",
                     "aws": "mngr_providers.aws:AwsProvider"}
BUILTIN_PLUGINS = {"claude": "mngr:ClaudeAgentType", "codex": "mngr:CodexAgentType",
                   "core-permissions": "mngr:CorePermissions"}
PLUGIN_GROUPS = ("mngr.plugins", "mngr.providers")
HOOKS = {
    "program": ("on_startup", "on_load_config", "on_validate_permissions", "on_before_command",
                "on_after_command", "on_error", "on_shutdown"),
    "host": ("on_host_collected", "on_before_host_create", "on_after_host_create",
             "on_host_state_change", "on_before_host_destroy", "on_after_host_destroy"),
    "agent": ("on_agent_collected", "on_before_agent_create", "on_after_agent_create",
              "on_before_agent_destroy", "on_after_agent_destroy"),
    "fields": ("host_fields", "agent_fields"),
    "declaring": ("agent_types", "permissions"),
}
ALL_HOOKS = tuple(h for names in HOOKS.values() for h in names)


# What hooks are given: plain dataclasses (README, "Plugins").

@dataclass(eq=False)
class CommandCall:
    """on_before_command may change args, or raise RefusedError to refuse the command."""
    command: str
    args: object


@dataclass(frozen=True, eq=False)
class CommandOutcome:
    command: str
    exit_code: int
    error: str = ""


@dataclass(frozen=True, eq=False)
class PermissionRequest:
    """on_validate_permissions: the permissions asked for, before anything is made."""
    agent: str
    permissions: tuple = ()


@dataclass(frozen=True, eq=False)
class HostInfo:
    id: str
    name: str
    provider: str
    state: str


@dataclass(frozen=True, eq=False)
class StateChange:
    host: HostInfo
    old: str
    new: str


@dataclass(frozen=True, eq=False)
class AgentInfo:
    id: str
    name: str
    agent_type: str
    host: HostInfo
    state: str = ""


def host_info(record: HostRecord, provider: str = "") -> HostInfo:
    return HostInfo(record.id, record.name, provider or record.provider, record.lifecycle.state)


def agent_info(record: AgentRecord, host: HostInfo, state: str = "") -> AgentInfo:
    return AgentInfo(record.id, record.name, record.agent_type, host, state)


class ClaudeAgentType:
    """Built-in plugin: the `claude` agent type (Claude Code)."""

    def agent_types(self):
        return {"claude": {"command": "claude"}}


class CodexAgentType:
    """Built-in plugin: the `codex` agent type."""

    def agent_types(self):
        return {"codex": {"command": "codex"}}


class CorePermissions:
    """Built-in plugin: the env, net and fs permission families."""

    def permissions(self):
        return {"env": "env:NAME lets the host receive that environment variable",
                "net": "net:egress gives the host a network; without it (net:none) it has none",
                "fs": "fs:mount:/abs/path[:ro] lets the host bind-mount that path"}

    def on_validate_permissions(self, request):
        for permission in request.permissions:
            family, detail = parse_permission(permission)
            if detail == "*" or family not in ("env", "net", "fs"):
                continue
            if family == "env" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", detail):
                raise RefusedError(f"bad permission {permission!r}: env:NAME takes a variable name")
            if family == "net" and detail not in ("egress", "none"):
                raise RefusedError(f"bad permission {permission!r}", "net:egress or net:none")
            if family == "fs" and not re.fullmatch(r"mount:/[^:]*(:ro)?", detail):
                raise RefusedError(f"bad permission {permission!r}",
                                   "fs:mount:/absolute/path, or fs:mount:/absolute/path:ro")


def validate_permissions(ctx, permissions, agent: str = "") -> tuple:
    """Refuse, before anything is made, a permission that is malformed, of a family no
    plugin owns, or that its owner rejects. Each family has exactly one owner."""
    owners = {}
    for name, declared in ctx.hook("permissions"):
        for family in declared or {}:
            if family in owners:
                raise PluginError(f"permission family {family!r} is claimed by two plugins: "
                                  f"{owners[family]} and {name}", "disable one of them")
            owners[family] = name
    for permission in permissions:
        family, _ = parse_permission(permission)
        if family not in owners:
            raise UsageError(f"unknown permission family in {permission!r}",
                             f"known families: {', '.join(sorted(owners))}")
    ctx.hook("on_validate_permissions", PermissionRequest(agent, tuple(permissions)))
    return tuple(sorted(set(permissions)))


def mount_allowed(permissions, source: str, read_only: bool) -> bool:
    """Whether fs:mount: grants cover bind-mounting source (read-only when the grant says :ro)."""
    if "fs:*" in permissions:
        return True
    for permission in permissions:
        family, detail = parse_permission(permission)
        if family != "fs" or not detail.startswith("mount:"):
            continue
        path, _, flag = detail[len("mount:"):].partition(":")
        inside = source == path or source.startswith(path.rstrip("/") + "/")
        if inside and (read_only or flag != "ro"):
            return True
    return False


def widening(host_name: str, union, has_agents: bool, new_union, allow: bool) -> None:
    """Refuse to widen a host's permissions without --allow-widen, when other agents
    are on it (they would all get what is added)."""
    added = sorted(set(new_union) - set(union))
    if has_agents and added and not allow:
        raise RefusedError(f"this would widen host {host_name}'s permissions by {', '.join(added)}",
                           "every agent on a host can use every permission on it; "
                           "pass --allow-widen to accept")


@dataclass(eq=False)
class Plugin:
    name: str
    group: str
    entry: object
    dist: str = "mngr (built in)"
    version: str = ""
    enabled: bool = True
    obj: object = None
    error: str = ""

    def hooks(self) -> list:
        return [h for h in ALL_HOOKS if callable(getattr(self.obj, h, None))]


def _ensure_builtin_providers_importable() -> None:
    """Make mngr_providers importable from a checkout (providers/ beside this file)."""
    import importlib.util

    if "mngr_providers" in sys.modules or importlib.util.find_spec("mngr_providers"):
        return
    package_dir = Path(__file__).resolve().parent / "providers"
    init = package_dir / "__init__.py"
    if not init.exists():
        raise PluginError("the built-in providers are not beside mngr.py",
                          f"expected {package_dir}; reinstall mngr")
    spec = importlib.util.spec_from_file_location(
        "mngr_providers", init, submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mngr_providers"] = module
    spec.loader.exec_module(module)


def find_plugins() -> dict:
    """Group -> {name: Plugin}, built-ins first, then installed entry points, found
    (not loaded) in one scan of the installed distributions, sorted by name. Two
    different entry points with one name are an error naming both packages."""
    from importlib.metadata import EntryPoint, entry_points

    found = {group: {} for group in PLUGIN_GROUPS}
    for group, builtins in (("mngr.providers", BUILTIN_PROVIDERS), ("mngr.plugins", BUILTIN_PLUGINS)):
        for name, value in builtins.items():
            found[group][name] = Plugin(name, group, EntryPoint(name, value, group))
    everything = entry_points()
    for group in PLUGIN_GROUPS:
        for entry in sorted(everything.select(group=group), key=lambda e: e.name):
            dist = getattr(entry, "dist", None)
            dist_name = getattr(dist, "name", None) or "?"
            other = found[group].get(entry.name)
            if other is not None and other.entry.value != entry.value:
                raise PluginError(f"two plugins are named {entry.name!r}: {other.entry.value} "
                                  f"(from {other.dist}) and {entry.value} (from {dist_name})",
                                  "uninstall one of them")
            if other is None or other.dist.startswith("mngr"):
                found[group][entry.name] = Plugin(entry.name, group, entry, dist_name,
                                                  getattr(dist, "version", "") or "")
    return {group: dict(sorted(plugins.items())) for group, plugins in found.items()}


def load_entry(plugin: Plugin):
    """Import what an entry point names; a failure names the plugin."""
    if plugin.entry.value.startswith("mngr_providers."):
        _ensure_builtin_providers_importable()
    try:
        return plugin.entry.load()
    except Exception as exc:  # a plugin's own bug: report it by name
        raise PluginError(f"plugin {plugin.name} failed to load: {exc}",
                          f"disable it: --disable-plugin {plugin.name}",
                          detail=_traceback(exc)) from None


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class Plugins:
    """The plugins of one process: found once, loaded once, called in name order."""

    def __init__(self, settings: dict, env, enable=(), disable=()):
        table = settings.get("plugins") or {}
        if not isinstance(table, dict):
            raise ConfigError("settings: [plugins] must be a table")
        self.disabled = {name for name, conf in table.items()
                         if isinstance(conf, dict) and conf.get("enabled") is False}
        self.disabled |= {n.strip() for n in (env.get("MNGR_DISABLE_PLUGINS") or "").split(",")
                          if n.strip()}
        self.disabled |= set(disable)
        self.disabled -= set(enable)
        self._found = None
        self._loaded = None
        self._methods = {}

    def found(self) -> dict:
        if self._found is None:
            self._found = find_plugins()
            for group in self._found.values():
                for plugin in group.values():
                    plugin.enabled = plugin.name not in self.disabled
        return self._found

    def active(self) -> list:
        """The enabled plugins of the mngr.plugins group, loaded (once)."""
        if self._loaded is None:
            loaded = []
            for plugin in self.found()["mngr.plugins"].values():
                if not plugin.enabled:
                    continue
                target = load_entry(plugin)
                try:
                    plugin.obj = target() if isinstance(target, type) else target
                except Exception as exc:
                    raise PluginError(f"plugin {plugin.name} failed to load: {exc}",
                                      f"disable it: --disable-plugin {plugin.name}",
                                      detail=_traceback(exc)) from None
                loaded.append(plugin)
            self._loaded = loaded
        return self._loaded

    def call(self, hook: str, *args) -> list:
        """Call a hook on every active plugin that has it: [(plugin name, result)].
        A plugin that raises is reported by name; RefusedError passes through."""
        results = []
        if hook not in self._methods:  # which plugins have this hook: worked out once
            self._methods[hook] = [(p, getattr(p.obj, hook)) for p in self.active()
                                   if callable(getattr(p.obj, hook, None))]
        for plugin, method in self._methods[hook]:
            try:
                results.append((plugin.name, method(*args)))
            except MngrError as exc:
                if isinstance(exc, RefusedError):
                    raise
                raise PluginError(f"plugin {plugin.name} failed in {hook}: {exc.line()}",
                                  f"disable it: --disable-plugin {plugin.name}",
                                  detail=_traceback(exc)) from None
            except Exception as exc:
                raise PluginError(f"plugin {plugin.name} failed in {hook}: "
                                  f"{type(exc).__name__}: {exc}",
                                  f"disable it: --disable-plugin {plugin.name}",
                                  detail=_traceback(exc)) from None
        return results

    def agent_types(self) -> dict:
        types = {}
        for _name, declared in self.call("agent_types"):
            types.update(declared or {})
        return types


class DisabledProvider:
    """A provider instance whose backend plugin is disabled: its hosts are not touched."""

    def __init__(self, name: str, backend: str, ctx):
        self.name = name
        self.backend = backend
        self.ctx = ctx

    def collect(self) -> list:
        if not self.ctx.settings.get("providers", {}).get(self.name) and self.backend == "docker":
            return []  # the implicit instance: nothing to say
        warn(f"provider {self.name} ({self.backend}) is disabled: its hosts are not shown "
             f"(enable it: --enable-plugin {self.backend})")
        return []

    def __getattr__(self, attribute):
        raise PluginError(f"provider {self.name} is disabled, so its hosts cannot be used",
                          f"enable it: --enable-plugin {self.backend}")


# CLI #######################################################################


class Context:
    """What one command invocation knows: env, cwd, settings, keys, providers."""

    def __init__(self, args, env=None, cwd=None, settings=None, plugins=None):
        self.args = args
        self.env = dict(os.environ if env is None else env)
        self.cwd = Path(cwd or os.getcwd())
        self.settings = settings if settings is not None else {}
        self.plugins = plugins or Plugins(self.settings, self.env)
        self._announced = set()
        self._keyring = None
        self._versions = None
        self._providers = None
        self._backends = None

    @property
    def keyring(self) -> Keyring:
        if self._keyring is None:
            self._keyring = load_keyring(self.env)
        return self._keyring

    @property
    def versions(self) -> VersionCache:
        if self._versions is None:
            self._versions = VersionCache(user_dir(self.env) / "versions.json")
        return self._versions

    def setting(self, key: str, default=None):
        return self.settings.get(key, default)

    @property
    def prefix(self) -> str:
        prefix = self.env.get(ENV_PREFIX) or self.setting("prefix") or DEFAULT_PREFIX
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", prefix):
            raise ConfigError(f"bad session prefix {prefix!r}", "use letters, digits, - and _")
        return prefix

    @property
    def tmux_socket(self) -> str:
        return (self.env.get(ENV_TMUX_SOCKET) or self.setting("tmux_socket")
                or root_name(self.env))

    def providers(self) -> list:
        """Every configured provider instance, local first, loaded on first use."""
        if self._providers is None:
            backends = self.plugins.found()["mngr.providers"]
            # local always; docker and ssh too, but they cost nothing until they have a host
            instances = {"local": {"backend": "local"}, "docker": {"backend": "docker", "implicit": True},
                         "ssh": {"backend": "ssh", "implicit": True}}
            configured = self.setting("providers", {})
            if not isinstance(configured, dict):
                raise ConfigError("settings: [providers] must be a table")
            for name, conf in sorted(configured.items()):
                if not isinstance(conf, dict) or "backend" not in conf:
                    raise ConfigError(f"settings: [providers.{name}] needs backend = \"...\"")
                instances[name] = conf
            self._providers = []
            for name, conf in instances.items():
                backend = conf["backend"]
                if backend not in backends:
                    raise ConfigError(f"settings: provider {name!r} uses unknown backend {backend!r}",
                                      f"known backends: {', '.join(sorted(backends))}")
                if not backends[backend].enabled:
                    self._providers.append(DisabledProvider(name, backend, self))
                    continue
                cls = load_entry(backends[backend])
                self._providers.append(cls(name, conf, self))
        return self._providers

    def hook(self, name: str, *args) -> list:
        return self.plugins.call(name, *args)

    def collect_from(self, provider) -> list:
        """One provider's hosts; each host and agent is announced to plugins once a command."""
        hosts = provider.collect()
        for host in hosts:
            if host.record is None:
                continue
            info = host_info(host.record, provider.name)
            if host.record.id not in self._announced:
                self._announced.add(host.record.id)
                self.hook("on_host_collected", info)
            for agent in host.agents:
                if agent.record.id not in self._announced:
                    self._announced.add(agent.record.id)
                    self.hook("on_agent_collected", agent_info(agent.record, info, agent.state))
        return hosts

    def state_changed(self, old: HostRecord, new: HostRecord, provider: str) -> None:
        if old is None or old.lifecycle.state != new.lifecycle.state:
            self.hook("on_host_state_change",
                      StateChange(host_info(new, provider), old.lifecycle.state if old else "",
                                  new.lifecycle.state))

    def provider(self, name: str):
        for provider in self.providers():
            if provider.name == name:
                return provider
        raise NotFoundError(f"no provider named {name!r}",
                            "known: " + ", ".join(p.name for p in self.providers()))

    def collect(self) -> list:
        """Every host with its agents, one call per provider."""
        hosts = []
        for provider in self.providers():
            hosts.extend(self.collect_from(provider))
        self.versions.save()
        return hosts

    def agents(self) -> list:
        return [agent for host in self.collect() for agent in host.agents]

    def resolve(self, names, all_agents=False, stdin=False) -> list:
        """Names (or ids) to AgentViews; an unknown name fails before anything is done."""
        names = list(names or [])
        if stdin:
            names += [line.strip() for line in sys.stdin if line.strip()]
        if not names and not all_agents:
            raise UsageError("no agent given", "name one or more agents, or use --all")
        agents = self.agents()
        if all_agents:
            return agents
        chosen, missing = [], []
        for name in dict.fromkeys(names):
            match = [a for a in agents if name in (a.record.name, a.record.id)]
            if not match:
                missing.append(name)
            elif len(match) > 1:
                raise UsageError(f"{name} names agents on several hosts: "
                                 + ", ".join(f"{a.record.id} on {a.host.name}" for a in match),
                                 "use the agent's id")
            else:
                chosen.extend(match)
        if missing:
            known = ", ".join(sorted(a.record.name for a in agents)) or "none"
            raise NotFoundError(f"no agent named {', '.join(missing)}",
                                f"known agents: {known}; see mngr list")
        return chosen


def _parser_class():
    """argparse's parser, with errors that are one line and exit 2."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message, f"see '{self.prog} --help'")

    return Parser


def _add_output_flags(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_const", const="json", dest="format",
                       help="print JSON for scripts")
    group.add_argument("--jsonl", action="store_const", const="jsonl", dest="format",
                       help="print one JSON object per line")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="print less")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="print more, including the detail behind errors")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="run without this plugin (repeatable)")
    parser.add_argument("--enable-plugin", action="append", default=[], metavar="NAME",
                        help="run with this plugin even if settings disable it (repeatable)")


def _add_targets(parser, what: str = "agents") -> None:
    parser.add_argument("agents", nargs="*", metavar="AGENT", help=f"{what} (names or ids)")
    parser.add_argument("-a", "--all", action="store_true", help="every agent")
    parser.add_argument("--stdin", action="store_true", help="read agent names from stdin")


def _args_create(sp, Parser):
    sp.add_argument("name", nargs="?", help="agent name (default: generated)")
    sp.add_argument("agent_type", nargs="?", metavar="TYPE",
                    help="claude, codex, a custom type from settings, or a program on PATH")
    sp.add_argument("--agent-cmd", metavar="CMD", help="run this shell command as the agent")
    sp.add_argument("--in", dest="provider", default="local", metavar="PROVIDER",
                    help="the provider instance that makes the host (default: local)")
    sp.add_argument("--host", metavar="HOST", help="add the agent to this existing host")
    sp.add_argument("--grant", action="append", default=[], metavar="PERM",
                    help="a permission, family:detail, e.g. env:GITHUB_TOKEN, net:egress (repeatable)")
    sp.add_argument("--allow-widen", action="store_true",
                    help="accept widening an existing host's permissions")
    sp.add_argument("--mount", action="append", default=[], metavar="SRC:DST[:ro]",
                    help="bind-mount a path into a container host (needs an fs:mount: grant)")
    group = sp.add_argument_group("container hosts")
    group.add_argument("--image", metavar="IMAGE", help="run the host from this local image")
    group.add_argument("--dockerfile", metavar="PATH", help="build the host's image from this file")
    group.add_argument("-b", "--build-arg", action="append", default=[], metavar="ARG",
                       help="an argument for docker build (repeatable)")
    group.add_argument("-s", "--start-arg", action="append", default=[], metavar="ARG",
                       help="an argument for docker create (repeatable)")
    group.add_argument("--cpus", metavar="N", help="CPU limit")
    group.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 2g")
    group.add_argument("--pull", action="store_true", help="allow docker to pull missing images")
    group.add_argument("--snapshot", metavar="ID", help="start the new host from this snapshot")
    group.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="leave matching paths out of the copied work dir (repeatable)")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--in-place", dest="work_mode", action="store_const", const="in_place",
                      help="run in the source dir itself")
    mode.add_argument("--copy", dest="work_mode", action="store_const", const="copy",
                      help="run in a copy of the source dir")
    mode.add_argument("--worktree", dest="work_mode", action="store_const", const="worktree",
                      help="run in a new git worktree (default inside a git repo)")
    sp.add_argument("--source", metavar="DIR", help="the source dir (default: the current dir)")
    sp.add_argument("--target", metavar="DIR", help="where a copy or worktree goes")
    sp.add_argument("--base-branch", metavar="REF", help="what the new branch starts from (default HEAD)")
    sp.add_argument("--new-branch", metavar="NAME", help="the worktree's branch (default mngr/NAME)")
    sp.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set a variable for the agent (repeatable)")
    sp.add_argument("--env-file", action="append", default=[], metavar="FILE",
                    help="read KEY=VALUE lines for the agent (repeatable)")
    sp.add_argument("--pass-env", action="append", default=[], metavar="KEY",
                    help="pass this variable from your environment (repeatable)")
    connect = sp.add_mutually_exclusive_group()
    connect.add_argument("--connect", dest="connect", action="store_true", default=None,
                         help="attach after creating (default when stdin is a terminal)")
    connect.add_argument("--no-connect", dest="connect", action="store_false",
                         help="do not attach after creating")
    _add_policy_flags(sp)


def _args_list(sp, Parser):
    sp.add_argument("--running", action="store_true", help="only running agents")
    sp.add_argument("--stopped", action="store_true", help="only stopped or finished agents")
    sp.add_argument("--include", action="append", default=[], metavar="FIELD=GLOB",
                    help="keep agents whose field matches (repeatable)")
    sp.add_argument("--exclude", action="append", default=[], metavar="FIELD=GLOB",
                    help="drop agents whose field matches (repeatable)")


def _args_connect(sp, Parser):
    sp.add_argument("agent", metavar="AGENT")
    sp.add_argument("--no-start", action="store_true", help="fail instead of starting a stopped agent")


def _args_message(sp, Parser):
    _add_targets(sp)
    sp.add_argument("-m", "--message", metavar="TEXT", help="the message (default: read stdin)")


def _args_exec(sp, Parser):
    sp.add_argument("agent", metavar="AGENT")
    sp.add_argument("shell_command", nargs="*", metavar="CMD", help="the command (after --)")
    sp.add_argument("--timeout", type=parse_duration, metavar="DURATION", help="give up after this long")


def _args_logs(sp, Parser):
    sp.add_argument("agent", metavar="AGENT")
    sp.add_argument("-n", "--lines", type=int, default=100, metavar="N", help="lines of history")


def _args_stop(sp, Parser):
    _add_targets(sp)
    sp.add_argument("--snapshot-mode", choices=("auto", "always", "never"), default="auto",
                    help="snapshot a host before stopping it (auto: when its provider would "
                         "lose its disk)")


def _args_start(sp, Parser):
    _add_targets(sp)
    sp.add_argument("--snapshot", metavar="ID", help="start the agent's host from this snapshot")


def _args_snapshot(sp, Parser):
    actions = sp.add_subparsers(dest="snapshot_command", metavar="ACTION", parser_class=Parser)
    actions.required = True
    for name, help_text in (("create", "snapshot the host of an agent"),
                            ("list", "list snapshots"), ("destroy", "delete snapshots")):
        asp = actions.add_parser(name, help=help_text, description=help_text)
        _add_output_flags(asp)
        if name == "create":
            asp.add_argument("agent", metavar="AGENT", help="an agent on the host to snapshot")
        if name == "destroy":
            asp.add_argument("snapshots", nargs="+", metavar="ID")


def _args_destroy(sp, Parser):
    _add_targets(sp)
    sp.add_argument("-f", "--force", action="store_true",
                    help="do not ask, and destroy running agents too")
    sp.add_argument("--remove-branch", action="store_true",
                    help="also remove the agent's worktree and branch, or its copy")
    sp.add_argument("--discard-changes", action="store_true",
                    help="with --remove-branch: remove even with uncommitted changes")


def _args_config(sp, Parser):
    cfg = sp.add_subparsers(dest="config_command", metavar="ACTION", parser_class=Parser)
    cfg.required = True
    for name, help_text in (("get", "print one setting"), ("set", "change one setting"),
                            ("list", "print every setting"), ("path", "print the settings files")):
        csp = cfg.add_parser(name, help=help_text, description=help_text)
        _add_output_flags(csp)
        if name in ("get", "set"):
            csp.add_argument("key", metavar="KEY", help="dotted key, e.g. commands.create.agent_type")
        if name == "set":
            csp.add_argument("value", metavar="VALUE", help="a TOML value; bare words are strings")
        if name in ("set", "path"):
            csp.add_argument("--scope", choices=("user", "project", "local"),
                             default="user" if name == "set" else None,
                             help="which settings file (default: user)")


def _args_keys(sp, Parser):
    keys = sp.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=Parser)
    keys.required = True
    for name, help_text in (("list", "list the signing keys (never their secrets)"),
                            ("rotate", "make a new signing key and re-sign local records")):
        ksp = keys.add_parser(name, help=help_text, description=help_text)
        _add_output_flags(ksp)
        if name == "rotate":
            ksp.add_argument("--retire-old", action="store_true",
                             help="drop the older keys once everything is re-signed")


def parse_sources(text) -> frozenset:
    items = text if isinstance(text, (list, tuple)) else [i for i in str(text).split(",") if i.strip()]
    sources = frozenset(i.strip() for i in items)
    unknown = sorted(sources - set(ACTIVITY_SOURCES))
    if unknown:
        raise UsageError(f"unknown activity source {', '.join(unknown)}",
                         "known: " + ", ".join(ACTIVITY_SOURCES))
    return sources


def parse_source(text) -> str:
    (source,) = parse_sources(text) or {""}
    return source


def parse_lifetime(text):
    """A duration, or none/off for no cap."""
    if isinstance(text, str) and text.strip().lower() in ("none", "off"):
        return "none"
    return parse_duration(text)


def _add_policy_flags(sp) -> None:
    import argparse

    group = sp.add_argument_group("idle policy of the host (signed into its data.json)")
    group.add_argument("--idle-mode", choices=tuple(IDLE_MODES),
                       help="which activity keeps the host alive (see README)")
    group.add_argument("--idle-timeout", type=parse_duration, metavar="DURATION",
                       help="stop after this long without activity: 90, 30s, 5m, 1h, 2d")
    group.add_argument("--activity-sources", type=parse_sources, metavar="LIST",
                       help="exactly these sources, comma separated: " + ",".join(ACTIVITY_SOURCES))
    group.add_argument("--add-activity-source", type=parse_source, action="append", default=[],
                       metavar="SOURCE", help="add one source (repeatable)")
    group.add_argument("--remove-activity-source", type=parse_source, action="append", default=[],
                       metavar="SOURCE", help="remove one source (repeatable)")
    group.add_argument("--max-lifetime", type=parse_lifetime, metavar="DURATION",
                       help="hard cap from create or boot that no activity extends; none to remove")
    group.add_argument("--trust", choices=TRUST_LEVELS,
                       help="whether activity reported from inside the host is believed")
    group.add_argument("--trust-reported", action=argparse.BooleanOptionalAction, default=None,
                       help="believe reported activity even on an untrusted host")
    for state in ("building", "starting", "stopping", "deploy"):
        group.add_argument(f"--{state}-timeout", type=parse_duration, metavar="DURATION",
                           help=f"how long a host may stay {state}" if state != "deploy"
                           else "how long a deploy lock may defer an idle stop")
    group.add_argument("--start-on-boot", action=argparse.BooleanOptionalAction, default=None,
                       help="start the agent whenever its host boots")


POLICY_FLAGS = ("idle_timeout", "trust", "trust_reported", "building_timeout",
                "starting_timeout", "stopping_timeout", "deploy_timeout")


def apply_policy_flags(policy: IdlePolicy, args) -> IdlePolicy:
    """The policy with the command line's changes; unchanged when none were given."""
    changes = {name: getattr(args, name) for name in POLICY_FLAGS if getattr(args, name) is not None}
    if args.max_lifetime is not None:
        changes["max_lifetime"] = None if args.max_lifetime == "none" else args.max_lifetime
    if args.idle_mode and args.activity_sources is not None:
        raise UsageError("both --idle-mode and --activity-sources given", "use one of them")
    sources = policy.activity_sources
    if args.idle_mode:
        sources = IDLE_MODES[args.idle_mode]
    if args.activity_sources is not None:
        sources = args.activity_sources
    sources = (sources | set(args.add_activity_source)) - set(args.remove_activity_source)
    if sources != policy.activity_sources:
        changes["activity_sources"] = frozenset(sources)
    if changes.get("idle_timeout") == 0:
        raise UsageError("--idle-timeout must be more than 0", "to never idle, use --idle-mode disabled")
    return dataclasses.replace(policy, **changes) if changes else policy


def default_policy(settings: dict, provider_name: str, trusted: bool) -> IdlePolicy:
    """A new host's policy: local disabled and trusted, others io and untrusted;
    then [policy] and [providers.NAME.policy] from settings."""
    policy = IdlePolicy.for_mode("disabled" if trusted else "io",
                                 trust="trusted" if trusted else "untrusted")
    tables = [("[policy]", settings.get("policy") or {}),
              (f"[providers.{provider_name}.policy]",
               ((settings.get("providers") or {}).get(provider_name) or {}).get("policy") or {})]
    for where, table in tables:
        if not isinstance(table, dict):
            raise ConfigError(f"settings: {where} must be a table")
        data = policy.to_dict()
        for key, value in table.items():
            if key == "idle_mode":
                if value not in IDLE_MODES:
                    raise ConfigError(f"settings {where}: unknown idle_mode {value!r}",
                                      "known: " + ", ".join(IDLE_MODES))
                data["activity_sources"] = sorted(IDLE_MODES[value])
            elif key in ("activity_sources",):
                data[key] = sorted(parse_sources(value))
            elif key in ("trust", "trust_reported"):
                data[key] = value
            elif key == "max_lifetime" or key == "idle_timeout" or key.endswith("_timeout"):
                if key not in data:
                    raise ConfigError(f"settings {where}: unknown key {key!r}")
                data[key] = None if key == "max_lifetime" and value in ("none", "off") \
                    else parse_duration(value)
            else:
                raise ConfigError(f"settings {where}: unknown key {key!r}",
                                  "known: idle_mode, " + ", ".join(sorted(data)))
        try:
            policy = IdlePolicy.from_dict(data)
        except ValueError as exc:
            raise ConfigError(f"settings {where}: {exc}") from None
    return policy


def _args_enforce(sp, Parser):
    import argparse

    sp.add_argument("--dry-run", action="store_true", help="decide and report, change nothing")
    sp.add_argument("--watch", type=parse_duration, metavar="SECONDS",
                    help="run again every SECONDS until interrupted")
    sp.add_argument("--check-idle", action=argparse.BooleanOptionalAction, default=True,
                    help="stop idle hosts and hosts past max lifetime (default: on)")
    sp.add_argument("--check-timeouts", action=argparse.BooleanOptionalAction, default=True,
                    help="fail or force-stop hosts stuck in building, starting, stopping (default: on)")
    sp.add_argument("--provider", action="append", default=[], metavar="NAME",
                    help="only this provider instance (repeatable)")
    sp.add_argument("--at", type=parse_when, metavar="TIME",
                    help="decide as if it were TIME: epoch seconds, or +DURATION/-DURATION from now, "
                         "e.g. --at=+2h (what-if with --dry-run; a clock jump, for testing)")


def parse_when(text) -> float:
    """Epoch seconds, or +DURATION / -DURATION from now."""
    text = str(text).strip()
    if text and text[0] in "+-":
        try:
            return time.time() + (1 if text[0] == "+" else -1) * parse_duration(text[1:])
        except UsageError:
            pass
    else:
        try:
            value = float(text)
            if 0 <= value < 1e11:
                return value
        except ValueError:
            pass
    raise UsageError(f"bad time {text!r}", "use epoch seconds, or +2h / -30m from now")


def _args_gc(sp, Parser):
    sp.add_argument("--older-than", type=parse_duration, default=7 * 86400, metavar="DURATION",
                    help="retention: only what ended (or was left) longer ago than this (default 7d)")
    sp.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    sp.add_argument("--provider", action="append", default=[], metavar="NAME",
                    help="only this provider instance (repeatable)")


def _args_limit(sp, Parser):
    _add_targets(sp)
    sp.add_argument("--host", action="append", default=[], metavar="HOST",
                    help="a host (name or id) instead of agents' hosts (repeatable)")
    sp.add_argument("--dry-run", action="store_true", help="show the new policy, change nothing")
    sp.add_argument("--grant", action="append", default=[], metavar="PERM",
                    help="grant the agents a permission (repeatable)")
    sp.add_argument("--revoke", action="append", default=[], metavar="PERM",
                    help="revoke a permission, exactly as granted (repeatable)")
    sp.add_argument("--allow-widen", action="store_true",
                    help="accept widening the host's permissions")
    sp.add_argument("--no-restart", action="store_true",
                    help="do not restart the agents now (the change waits for their next start)")
    _add_policy_flags(sp)


def _args_plugin(sp, Parser):
    actions = sp.add_subparsers(dest="plugin_command", metavar="ACTION", parser_class=Parser)
    actions.required = True
    lsp = actions.add_parser("list", help="installed plugins and providers",
                             description="installed plugins and providers")
    _add_output_flags(lsp)


def _args_host(sp, Parser):
    actions = sp.add_subparsers(dest="host_command", metavar="ACTION", parser_class=Parser)
    actions.required = True
    add = actions.add_parser("add", help="add an ssh machine agents can run on",
                             description="add an ssh machine agents can run on; it is checked first")
    add.add_argument("name", help="the machine's name in mngr (mngr create --host NAME)")
    add.add_argument("--ssh", required=True, metavar="USER@HOST[:PORT]", help="how to reach it")
    add.add_argument("--identity", metavar="FILE", help="the private key to log in with")
    add.add_argument("--host-dir", metavar="DIR", help="mngr's dir there (default ~/.mngr-host)")
    add.add_argument("--work-root", metavar="DIR", help="where work dirs go there (default ~/mngr-work)")
    add.add_argument("--agent-user", metavar="USER",
                     help="run agents as this unprivileged user there (needed when untrusted)")
    add.add_argument("--allow-shutdown", action="store_true",
                     help="let the idle watcher and mngr enforce power the machine off")
    add.add_argument("--accept-host-key", action="store_true",
                     help="accept and remember the machine's host key if it is not known yet")
    add.add_argument("--no-check", action="store_true", help="add it without connecting")
    add.add_argument("--in", dest="provider", default="ssh", metavar="PROVIDER",
                     help="the ssh provider instance (default: ssh)")
    _add_output_flags(add)
    check = actions.add_parser("check", help="connect to a machine and check it can run agents",
                               description="connect to a machine and check it can run agents")
    check.add_argument("name")
    check.add_argument("--accept-host-key", action="store_true",
                       help="accept and remember the machine's host key if it is not known yet")
    check.add_argument("--in", dest="provider", metavar="PROVIDER")
    _add_output_flags(check)
    remove = actions.add_parser("remove", help="forget a machine added with host add",
                                description="forget a machine added with host add")
    remove.add_argument("name")
    remove.add_argument("--in", dest="provider", metavar="PROVIDER")
    _add_output_flags(remove)
    lsp = actions.add_parser("list", help="the ssh machines agents can run on",
                             description="the ssh machines agents can run on (no connection made)")
    lsp.add_argument("--in", dest="provider", metavar="PROVIDER")
    _add_output_flags(lsp)


# name, aliases, one-line help, the function that adds its arguments
COMMAND_TABLE = (
    ("create", ("c",), "create an agent and start it", _args_create),
    ("list", ("ls",), "list agents and their hosts", _args_list),
    ("connect", (), "attach to an agent's tmux session", _args_connect),
    ("message", ("msg",), "send a message to agents", _args_message),
    ("exec", (), "run a shell command in an agent's work dir on its host", _args_exec),
    ("logs", (), "print an agent's recent output", _args_logs),
    ("stop", (), "stop agents (their work dirs are kept)", _args_stop),
    ("start", (), "start stopped agents again, with the same command and env", _args_start),
    ("destroy", ("rm",), "destroy agents", _args_destroy),
    ("config", (), "read and change settings", _args_config),
    ("keys", (), "the signing keys", _args_keys),
    ("snapshot", (), "snapshots of hosts: create, list, destroy", _args_snapshot),
    ("enforce", (), "stop idle and stuck hosts (run it from cron)", _args_enforce),
    ("plugin", (), "the installed plugins", _args_plugin),
    ("limit", ("lim",), "change the idle policy of agents' hosts", _args_limit),
    ("host", (), "ssh machines agents can run on: add, list, check, remove", _args_host),
    ("gc", (), "remove what is left of failed and destroyed hosts, old orphans", _args_gc),
)


def build_parser(only=None):
    """The CLI parser; given ``only`` (a command or ""), the other commands get no
    arguments, so start-up does not pay for what this run will not parse."""
    Parser = _parser_class()
    parser = Parser(prog="mngr", description="Run AI coding agents in tmux sessions on hosts, "
                    "and stop idle hosts.")
    parser.add_argument("--version", action="version", version=f"mngr {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, aliases, help_text, add_arguments in COMMAND_TABLE:
        sp = subs.add_parser(name, aliases=list(aliases), help=help_text, description=help_text)
        sp.set_defaults(command=name)
        if only is None or only == name:
            _add_output_flags(sp)
            add_arguments(sp, Parser)
    return parser


COMMANDS = {}


def command(name):
    def register(func):
        COMMANDS[name] = func
        return func
    return register


def _split_after_dashes(argv):
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


def apply_command_settings(parser, command_name: str, settings: dict, env) -> None:
    """Settings and MNGR_COMMANDS_<CMD>_<PARAM> become the subcommand's defaults."""
    subparser = _subparser(parser, command_name)
    if subparser is None:
        return
    actions = {a.dest: a for a in subparser._actions if a.dest not in ("help", "command")}
    values = []
    table = (settings.get("commands") or {}).get(command_name) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"settings: [commands.{command_name}] must be a table")
    values += [(f"settings [commands.{command_name}]", k, v) for k, v in table.items()]
    env_prefix = f"{ENV_COMMAND_PREFIX}{command_name.upper()}_"
    values += [(f"${k}", k[len(env_prefix):].lower(), v)
               for k, v in sorted(env.items()) if k.startswith(env_prefix)]
    defaults = {}
    for source, key, value in values:
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"{source}: {command_name} has no option {key!r}",
                              "known: " + ", ".join(sorted(actions)))
        defaults[key] = _coerce_setting(source, key, value, action)
    subparser.set_defaults(**defaults)


def _coerce_setting(source, key, value, action):
    import argparse

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) \
            or action.default is None and action.const is not None and action.nargs == 0 \
            and isinstance(action.const, bool):
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: {key} must be true or false, not {value!r}")
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [s for s in str(value).split(",") if s]
        return [_convert(source, key, action, item) for item in items]
    return _convert(source, key, action, value)


def _convert(source, key, action, value):
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, action.choices))}")
    if action.type is None:
        return value if isinstance(value, str) else str(value)
    try:
        return action.type(value if isinstance(value, (str, int)) else str(value))
    except MngrError as exc:
        raise ConfigError(f"{source}: {key}: {exc.message}", exc.hint) from None
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: bad value {value!r} for {key}") from None


def _subparser(parser, name):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _command_name(argv) -> str:
    """The subcommand named in argv (aliases resolved), or ''."""
    names = {alias: name for name, aliases, _, _ in COMMAND_TABLE for alias in (name, *aliases)}
    for arg in argv:
        if not arg.startswith("-"):
            return names.get(arg, "")
    return ""


def emit(ctx, rows, human) -> None:
    """Results on stdout: JSON, JSON lines, or the human form."""
    fmt = getattr(ctx.args, "format", None)
    if fmt == "json":  # indented for a person at a terminal; compact (and fast) for scripts
        print(json.dumps(rows, indent=2 if sys.stdout.isatty() else None, sort_keys=True,
                         default=str))
    elif fmt == "jsonl":
        for row in rows if isinstance(rows, list) else [rows]:
            print(json.dumps(row, sort_keys=True, default=str))
    elif human is not None:
        text = human() if callable(human) else human
        if text:
            print(text)


def table(rows, columns) -> str:
    if not rows:
        return ""
    widths = [max(len(col), *(len(str(r.get(key, ""))) for r in rows)) for col, key in columns]
    lines = ["  ".join(col.upper().ljust(w) for (col, _), w in zip(columns, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(row.get(key, "")).ljust(w)
                               for (_, key), w in zip(columns, widths)).rstrip())
    return "\n".join(lines)


def iso(timestamp) -> str:
    if not timestamp:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def age(timestamp, now) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, int(now - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def agent_row(agent: AgentView, now: float, judged=None) -> dict:
    record = agent.record
    host = agent.host
    obs, decision = judged if judged else (None, None)
    deadline = decision.deadline if decision else None
    return {
        "id": record.id,
        "name": record.name,
        "type": record.agent_type,
        "state": agent.state,
        "command": record.command,
        "session": record.session,
        "work_dir": record.work_dir,
        "work_mode": record.work_mode,
        "branch": record.branch,
        "start_on_boot": record.start_on_boot,
        "created_at": iso(record.created_at),
        "age": age(record.created_at, now),
        "exit_status": agent.exit_status,
        "attached": agent.attached,
        "verified": agent.verification.ok,
        "host": host.name,
        "host_id": host.record.id if host.record else "",
        "provider": host.provider.name,
        "host_state": obs.state if obs else (host.record.lifecycle.state if host.record else "unknown"),
        "idle_mode": host.record.policy.idle_mode if host.record else "",
        "idle_seconds": None if not decision or decision.idle_seconds is None
        else int(decision.idle_seconds),
        "idle": "-" if not decision or decision.idle_seconds is None
        else age(now - decision.idle_seconds, now),
        "deadline": iso(deadline) if deadline else None,
        "stops_in": "-" if deadline is None else age(now, deadline) if deadline > now else "now",
        "decision": decision.to_dict() if decision else None,
        "permissions": list(record.permissions),
        "host_permissions": list(host.record.permissions) if host.record else [],
    }


def run_on_targets(ctx, agents, action, verb: str) -> int:
    """Do action on each agent; report each result; exit 3 on partial failure."""
    done, failed = [], []
    for agent in agents:
        try:
            outcome = action(agent)
        except MngrError as exc:
            failed.append({"name": agent.record.name, "id": agent.record.id, "ok": False,
                           "error": exc.line()})
            print(f"mngr: error: {agent.record.name}: {exc.line()}", file=sys.stderr)
        else:
            done.append({"name": agent.record.name, "id": agent.record.id, "ok": True,
                         "result": outcome or verb})
    emit(ctx, done + failed, lambda: "\n".join(f"{r['result']} {r['name']}" for r in done))
    if failed and done:
        return EXIT_PARTIAL
    return EXIT_ERROR if failed else EXIT_OK


@command("create")
def cmd_create(args, ctx) -> int:
    host = None
    machine_of = [p for p in _machine_providers(ctx) if args.host in p.machines()] if args.host else []
    if args.provider != "local":
        machine_of = [p for p in machine_of if p.name == args.provider]
    if machine_of:  # a machine: its provider finds or makes its host
        provider = machine_of[0]
    elif args.host:
        host = _host_target(ctx, ctx.collect(), args.host)
        provider = host.provider
    else:
        provider = ctx.provider(args.provider)
    name = validate_name(args.name) if args.name else None
    plan = provider.plan_agent(args, name)
    view = provider.create_agent(plan, host)
    emit(ctx, agent_row(view, time.time()),
         f"created agent {view.record.name} ({view.state}) in {view.record.work_dir}")
    connect = args.connect if args.connect is not None else (sys.stdin.isatty() and sys.stdout.isatty())
    if connect and args.format is None:
        return provider.attach(view)
    return EXIT_OK


def host_decisions(ctx, hosts, now) -> dict:
    """Host id -> (Observation, Decision), for list and enforce."""
    result = {}
    for host in hosts:
        if host.record is None and not host.agents:
            continue
        obs = host.provider.observe(host, now)
        policy = host.record.policy if host.record else host.provider.default_policy()
        result[id(host)] = (obs, decide(obs, policy, now))
    return result


@command("list")
def cmd_list(args, ctx) -> int:
    import fnmatch

    now = time.time()
    filters = []
    for flag, keep in (("include", True), ("exclude", False)):
        for item in getattr(args, flag):
            key, sep, pattern = item.partition("=")
            if not sep or not key:
                raise UsageError(f"bad --{flag} {item!r}", "use FIELD=GLOB, e.g. state=running")
            filters.append((key, pattern, keep))
    hosts = ctx.collect()
    decisions = host_decisions(ctx, hosts, now)
    rows = []
    for host in hosts:
        info = host_info(host.record, host.provider.name) if host.record else None
        host_extra = plugin_fields(ctx, "host_fields", info) if info else {}
        for agent in host.agents:
            row = agent_row(agent, now, decisions.get(id(host)))
            row.update(host_extra)
            if info:
                row.update(plugin_fields(ctx, "agent_fields", agent_info(agent.record, info, agent.state)))
            if args.running and agent.state != "running":
                continue
            if args.stopped and agent.state not in ("stopped", "done"):
                continue
            for key, pattern, keep in filters:
                if key not in row:
                    raise UsageError(f"unknown field {key!r}", "fields: " + ", ".join(sorted(row)))
                if fnmatch.fnmatchcase(str(row[key]), pattern) != keep:
                    break
            else:
                rows.append(row)
    rows.sort(key=lambda r: (r["provider"], r["host"], r["name"]))
    columns = [("name", "name"), ("state", "state"), ("type", "type"), ("host", "host"),
               ("host state", "host_state"), ("idle mode", "idle_mode"), ("idle", "idle"),
               ("stops in", "stops_in"), ("age", "age"), ("work dir", "work_dir")]
    emit(ctx, rows, lambda: table(rows, columns) or "no agents")
    return EXIT_OK


def require_record(host) -> HostRecord:
    """A host's verified record, or a refusal: nothing is re-signed on top of a tampered one."""
    if host.record is None:
        raise TamperedStateError(f"host {host.name}'s record fails verification "
                                 f"({host.verification.reason})",
                                 "mngr enforce stops it; inspect its data.json")
    return host.record


def change_permissions(ctx, args, agents) -> list:
    """limit --grant/--revoke: check everything first, then re-sign and restart."""
    grant = validate_permissions(ctx, args.grant) if args.grant else ()
    plans = []
    for agent in agents:
        current = set(agent.record.permissions)
        missing = [p for p in args.revoke if p not in current]
        if missing:
            raise UsageError(f"{agent.record.name} was never granted {', '.join(missing)}",
                             "revoke exactly what was granted: see mngr list --json")
        new = tuple(sorted((current | set(grant)) - set(args.revoke)))
        host = agent.host
        require_record(host)
        others = [a.record.permissions for a in host.agents if a.record.id != agent.record.id]
        widening(host.name, host.record.permissions, bool(others), permission_union(others + [new]),
                 args.allow_widen)
        plans.append((agent, new))
    rows = []
    for agent, new in plans:
        rows.append({"agent": agent.record.name, "permissions": list(new), "dry_run": args.dry_run,
                     "restarted": False})
        if args.dry_run or new == agent.record.permissions:
            continue
        provider = agent.host.provider
        provider.update_agent(agent, permissions=new)
        if "net:egress" in set(new) - set(agent.record.permissions) and agent.host.provider.backend != "local":
            warn(f"{agent.host.name} gets a network only when its container is re-made: "
                 f"mngr snapshot create {agent.record.name}, then mngr start {agent.record.name} --snapshot ID")
        if args.no_restart:
            warn(f"{agent.record.name} keeps its old environment until its next start")
        elif agent.state == "running":
            provider.restart_agent(ctx.resolve([agent.record.id])[0])
            rows[-1]["restarted"] = True
    return rows


def plugin_fields(ctx, hook: str, subject) -> dict:
    """Extra list columns from plugins, namespaced plugin.<name>.<field>."""
    fields = {}
    for name, values in ctx.hook(hook, subject):
        for key, value in (values or {}).items():
            fields[f"plugin.{name}.{key}"] = value
    return fields


def _host_target(ctx, hosts, name):
    matches = [h for h in hosts if h.record and name in (h.record.name, h.record.id)]
    if not matches:
        raise NotFoundError(f"no host named {name}",
                            "known hosts: " + (", ".join(h.name for h in hosts) or "none"))
    return matches[0]


@command("limit")
def cmd_limit(args, ctx) -> int:
    if args.host and (args.agents or args.all or args.stdin):
        raise UsageError("give agents or --host, not both")
    if args.host:
        hosts = ctx.collect()
        targets = {id(h): h for h in (_host_target(ctx, hosts, n) for n in args.host)}
        agents = []
        if args.start_on_boot is not None:
            raise UsageError("--start-on-boot is per agent", "name the agents instead of --host")
    else:
        agents = ctx.resolve(args.agents, args.all, args.stdin)
        targets = {id(a.host): a.host for a in agents}
    rows = []
    if args.grant or args.revoke:  # checked in full before anything changes
        if args.host:
            raise UsageError("permissions are granted to agents", "name the agents instead of --host")
        rows += change_permissions(ctx, args, agents)
    for host in targets.values():
        if host.record is None:
            raise TamperedStateError(f"host {host.name}'s record fails verification "
                                     f"({host.verification.reason}); not re-signing it",
                                     "inspect it, or run mngr enforce to stop the host")
        new = apply_policy_flags(host.record.policy, args)
        changed = new != host.record.policy
        if changed and not args.dry_run:
            host.provider.update_policy(host, new)
        rows.append({"host": host.name, "host_id": host.record.id, "changed": changed,
                     "dry_run": args.dry_run, "policy": new.to_dict()})
    for agent in agents:
        if args.start_on_boot is not None and agent.record.start_on_boot != args.start_on_boot \
                and not args.dry_run:
            agent.host.provider.update_agent(agent, start_on_boot=args.start_on_boot)

    def human():
        lines = []
        for row in rows:
            if "agent" in row:
                verb = "would have" if args.dry_run else "has"
                lines.append(f"{row['agent']}: {verb} permissions {', '.join(row['permissions']) or '-'}"
                             + (" (restarted)" if row["restarted"] else ""))
                continue
            if not row["changed"] and (args.grant or args.revoke):
                continue
            p = row["policy"]
            verb = "would set" if args.dry_run else ("set" if row["changed"] else "unchanged")
            lines.append(f"{row['host']}: {verb} idle_mode={p['idle_mode']} "
                         f"sources={','.join(p['activity_sources']) or '-'} "
                         f"idle_timeout={format_duration(p['idle_timeout'])} "
                         f"max_lifetime={format_duration(p['max_lifetime'])} trust={p['trust']}")
        return "\n".join(lines)
    emit(ctx, rows, human)
    return EXIT_OK


ENFORCE_ACTIONS = {"stop": "stop_host", "mark_failed": "mark_failed", "force_stop": "force_stop_host"}


@command("enforce")
def cmd_enforce(args, ctx) -> int:
    lock = user_dir(ctx.env) / "enforce.lock"
    try:
        with FileLock(lock, blocking=False):
            while True:
                code = enforce_once(args, ctx)
                if not args.watch:
                    return code
                time.sleep(args.watch)
    except BlockingIOError:
        print(f"mngr: another mngr enforce is running (it holds {lock}); not acting twice",
              file=sys.stderr)
        return EXIT_OK


def enforce_once(args, ctx) -> int:
    """One pass over every host of every provider; returns the exit code."""
    audit = user_dir(ctx.env) / "audit.jsonl"
    try:  # acting without a record of it is not allowed: find out before acting at all
        audit.parent.mkdir(parents=True, exist_ok=True)
        with open(audit, "a"):
            pass
    except OSError as exc:
        raise RefusedError(f"cannot write the audit log {audit}: {exc.strerror or exc}",
                           "fix it (permissions, disk space); mngr enforce acts only when it can "
                           "record what it does") from None
    rows, code = [], EXIT_OK
    names = set(args.provider)
    providers = ctx.providers()
    unknown = names - {p.name for p in providers}
    if unknown:
        raise UsageError(f"no provider named {', '.join(sorted(unknown))}",
                         "known: " + ", ".join(p.name for p in providers))
    for provider in providers:
        if names and provider.name not in names:
            continue
        try:
            hosts = ctx.collect_from(provider)
        except PluginError:
            raise
        except Exception as exc:  # down, or a bug: the other providers are still checked
            line = exc.line() if isinstance(exc, MngrError) else f"internal error: {type(exc).__name__}: {exc}"
            row = {"provider": provider.name, "host": "", "action": "none", "result": "error",
                   "error": f"could not list hosts: {line}"}
            rows.append(row)
            _audit(audit, row, args.dry_run)
            code = max(code, EXIT_UNREACHABLE)
            continue
        for host in hosts:
            row = enforce_host(args, host, audit)
            if row["result"] == "error":
                code = max(code, EXIT_UNREACHABLE if row.get("unreachable") else EXIT_ERROR)
            rows.append(row)
    ctx.versions.save()
    shown = [r for r in rows if r["action"] != "none" or r["result"] == "error" or ctx.args.verbose]

    def human():
        return table([{**r, "why": r.get("error") or r.get("reason", "")} for r in shown],
                     [("host", "host"), ("provider", "provider"), ("action", "action"),
                      ("result", "result"), ("why", "why")]) or f"checked {len(rows)} hosts: nothing to do"
    emit(ctx, rows, human)
    return code


def enforce_host(args, host, audit) -> dict:
    """Decide for one host and, unless --dry-run, act after re-checking it."""
    provider = host.provider
    row = {"provider": provider.name, "host": host.name,
           "host_id": host.record.id if host.record else "", "action": "none", "result": "ok"}
    if not host.reachable:
        row.update(result="error", unreachable=True, error=f"unreachable: {host.error}")
        _audit(audit, row, args.dry_run)
        return row
    try:
        now = _now(args)
        obs = provider.observe(host, now)
        decision = _checked(decide(obs, _policy_of(host), now), args)
        row.update(state=obs.state, **decision.to_dict())
        if obs.state == "destroyed" and host.record is not None:
            row["result"] = "gone"  # removed behind mngr's back: nothing to do, but say so
            _audit(audit, row, args.dry_run)
            return row
        if decision.action == "none":
            return row
        if args.dry_run:
            row["result"] = "dry-run"
            _audit(audit, row, True)
            return row
        fresh = provider.refresh(host)
        if fresh is None:
            row["result"] = "vanished"
        else:
            now = _now(args)
            again = _checked(decide(provider.observe(fresh, now), _policy_of(fresh), now), args)
            if again.action != decision.action:
                row.update(result="changed", reason=f"re-checked: {again.reason}")
            else:
                try:  # written before acting, or not done
                    _audit(audit, {**row, "result": "acting"}, False)
                except OSError as exc:
                    raise RefusedError(f"cannot write the audit log {audit}: {exc.strerror or exc}; "
                                       f"not acting on {host.name}") from None
                getattr(provider, ENFORCE_ACTIONS[again.action])(fresh)
                row["result"] = "done"
    except PluginError:
        raise
    except MngrError as exc:
        row.update(result="error", error=exc.line(), unreachable=exc.exit_code == EXIT_UNREACHABLE)
    except Exception as exc:  # a bug must not stop the backstop from checking the other hosts
        row.update(result="error", error=f"internal error: {type(exc).__name__}: {exc}",
                   detail=_traceback(exc))
    _audit(audit, row, args.dry_run)
    return row


def _now(args) -> float:
    """The time decisions are made at: the clock, unless --at says otherwise."""
    return time.time() if getattr(args, "at", None) is None else args.at


def _policy_of(host) -> IdlePolicy:
    return host.record.policy if host.record else host.provider.default_policy()


def _checked(decision: Decision, args) -> Decision:
    """Drop the decisions that --no-check-idle or --no-check-timeouts turned off."""
    if decision.cause in ("idle", "lifetime") and not args.check_idle \
            or decision.cause == "timeout" and not args.check_timeouts:
        return decision._replace(action="none", reason=f"{decision.reason} (not checked)")
    return decision


def _audit(path: Path, row: dict, dry_run: bool) -> None:
    append_jsonl(path, {"at": time.time(), "dry_run": dry_run, **row})


@command("connect")
def cmd_connect(args, ctx) -> int:
    (agent,) = ctx.resolve([args.agent])[:1]
    provider = agent.host.provider
    if agent.state != "running":
        if args.no_start:
            raise RefusedError(f"agent {agent.record.name} is {agent.state}",
                               f"start it: mngr start {agent.record.name}")
        agent = provider.start_agent(agent)
    return provider.attach(agent)


@command("message")
def cmd_message(args, ctx) -> int:
    agents = ctx.resolve(args.agents, args.all, args.stdin)
    text = args.message
    if text is None:
        if args.stdin:
            raise UsageError("--stdin reads agent names, so give the message with -m")
        text = sys.stdin.read().rstrip("\n")
    if not text:
        raise UsageError("empty message", "give it with -m TEXT or on stdin")

    def send(agent):
        if agent.state != "running":
            raise RefusedError(f"agent is {agent.state}", f"start it: mngr start {agent.record.name}")
        agent.host.provider.send_message(agent, text)
        return "sent to"
    return run_on_targets(ctx, agents, send, "sent to")


@command("exec")
def cmd_exec(args, ctx) -> int:
    words = list(args.shell_command) + list(args.extra)
    if not words:
        raise UsageError("no command given", f"e.g. mngr exec {args.agent} -- git status")
    (agent,) = ctx.resolve([args.agent])[:1]
    return agent.host.provider.exec_in(agent, " ".join(words), args.timeout)


@command("logs")
def cmd_logs(args, ctx) -> int:
    (agent,) = ctx.resolve([args.agent])[:1]
    text = agent.host.provider.output(agent, args.lines)
    emit(ctx, {"name": agent.record.name, "state": agent.state, "output": text}, text.rstrip("\n"))
    return EXIT_OK


@command("stop")
def cmd_stop(args, ctx) -> int:
    agents = ctx.resolve(args.agents, args.all, args.stdin)

    def stop(agent):
        if agent.state == "stopped":
            return "already stopped:"
        agent.host.provider.stop_agent(agent, snapshot_mode=args.snapshot_mode)
        return "stopped"
    return run_on_targets(ctx, agents, stop, "stopped")


@command("start")
def cmd_start(args, ctx) -> int:
    agents = ctx.resolve(args.agents, args.all, args.stdin)

    if args.snapshot and len(agents) != 1:
        raise UsageError("--snapshot starts one host", "name one agent")

    def start(agent):
        if args.snapshot:
            agent.host.provider.start_from_snapshot(agent, args.snapshot)
            return "started from snapshot:"
        if agent.state == "running":
            return "already running:"
        agent.host.provider.start_agent(agent)
        return "started"
    return run_on_targets(ctx, agents, start, "started")


@command("plugin")
def cmd_plugin(args, ctx) -> int:
    """Every plugin and provider found, loaded where enabled; load errors are shown, not fatal."""
    rows = []
    for group, plugins in ctx.plugins.found().items():
        for plugin in plugins.values():
            row = {"name": plugin.name, "kind": "provider" if group == "mngr.providers" else "plugin",
                   "distribution": plugin.dist, "version": plugin.version or __version__
                   if plugin.dist.startswith("mngr (") else plugin.version,
                   "entry_point": plugin.entry.value, "enabled": plugin.enabled, "hooks": [],
                   "agent_types": [], "permissions": [], "error": ""}
            if plugin.enabled:
                try:
                    target = load_entry(plugin)
                    obj = target() if isinstance(target, type) and group == "mngr.plugins" else target
                    plugin.obj = obj
                    row["hooks"] = plugin.hooks()
                    if group == "mngr.plugins":
                        row["agent_types"] = sorted((getattr(obj, "agent_types", None) or dict)() or {})
                        row["permissions"] = sorted((getattr(obj, "permissions", None) or dict)() or {})
                except Exception as exc:
                    row["error"] = exc.line() if isinstance(exc, MngrError) else f"{type(exc).__name__}: {exc}"
            rows.append(row)

    def human():
        return table([{**r, "state": "error" if r["error"] else ("enabled" if r["enabled"] else "disabled"),
                       "hooks": ",".join(r["hooks"]) or "-", "types": ",".join(r["agent_types"]) or "-"}
                      for r in rows],
                     [("name", "name"), ("kind", "kind"), ("state", "state"),
                      ("distribution", "distribution"), ("version", "version"), ("hooks", "hooks"),
                      ("agent types", "types")])
    emit(ctx, rows, human)
    return EXIT_OK


def _machine_providers(ctx, name=None) -> list:
    """The provider instances whose hosts are machines (they list them without connecting)."""
    found = [p for p in ctx.providers() if getattr(p, "has_machines", False)]
    if name is not None:
        found = [p for p in found if p.name == name]
        if not found:
            raise NotFoundError(f"no ssh provider named {name!r}",
                                "known: " + (", ".join(p.name for p in _machine_providers(ctx)) or "none"))
    return found


def _machine_named(ctx, name: str, provider=None):
    matches = [(p, p.machines()[name]) for p in _machine_providers(ctx, provider) if name in p.machines()]
    if not matches:
        raise NotFoundError(f"no machine named {name}", "see mngr host list")
    if len(matches) > 1:
        raise UsageError(f"machine {name} is in several providers: "
                         + ", ".join(p.name for p, _ in matches), "pick one with --in PROVIDER")
    return matches[0]


@command("host")
def cmd_host(args, ctx) -> int:
    action = args.host_command
    if action == "list":
        rows = []
        for provider in _machine_providers(ctx, args.provider):
            hosts = {record.name: record for _, record in provider._records()}
            for name, machine in sorted(provider.machines().items()):
                record = hosts.get(name)
                rows.append({"name": name, "provider": provider.name, "address": machine.where,
                             "identity": machine.identity, "host_dir": machine.host_dir,
                             "work_root": machine.work_root, "agent_user": machine.agent_user,
                             "allow_shutdown": machine.allow_shutdown, "source": machine.source,
                             "agents": len(record.agents) if record else 0,
                             "host_state": record.lifecycle.state if record else "-"})
        emit(ctx, rows, lambda: table(rows, [("name", "name"), ("provider", "provider"),
                                             ("address", "address"), ("agents", "agents"),
                                             ("host state", "host_state"), ("source", "source")])
             or "no machines (add one: mngr host add NAME --ssh user@host)")
        return EXIT_OK
    if action == "add":
        validate_name(args.name, "machine name")
        provider = _machine_providers(ctx, args.provider)[0]
        conf = {}
        for key in ("identity", "host_dir", "work_root", "agent_user"):
            if getattr(args, key):
                conf[key] = getattr(args, key)
        if args.identity:  # cron runs enforce elsewhere: the key's path must not depend on cwd
            conf["identity"] = str(Path(args.identity).expanduser().resolve())
        if args.identity and not Path(args.identity).expanduser().is_file():
            raise UsageError(f"no identity file at {args.identity}", "give the private key's path")
        conf["allow_shutdown"] = args.allow_shutdown
        machine = provider.new_machine(args.name, args.ssh, conf)
        if args.name in provider.machines():
            provider.add_machine(machine)  # refuses, saying why
        row = {"machine": machine.name, "provider": provider.name, "address": machine.where,
               "checked": False}
        if not args.no_check:
            try:
                row.update(provider.check_machine(machine, args.accept_host_key), checked=True)
            except RefusedError as exc:
                if "host key" in exc.message and "unknown" in exc.message:
                    exc.hint = "if that is the machine's key, run this again with --accept-host-key"
                raise
        provider.add_machine(machine)
        emit(ctx, row, f"added machine {machine.name} ({machine.where})"
             + (f": {row['system']}, python {row['python']}" if row["checked"] else ", not checked"))
        return EXIT_OK
    provider, machine = _machine_named(ctx, args.name, args.provider)
    if action == "check":
        row = provider.check_machine(machine, args.accept_host_key)
        emit(ctx, row, f"{machine.name} ({machine.where}): ok, {row['system']}, python {row['python']}")
        return EXIT_OK
    provider.remove_machine(machine.name)
    emit(ctx, {"machine": machine.name, "provider": provider.name, "removed": True},
         f"removed machine {machine.name}")
    return EXIT_OK


@command("gc")
def cmd_gc(args, ctx) -> int:
    """Remove what mngr made and nothing needs any more, older than the retention:
    failed and destroyed hosts (with their records), containers or instances tagged
    as mngr's that no record claims, orphaned worktrees (only clean ones: their
    branches keep the commits), and snapshots whose host is gone."""
    now = time.time()
    cutoff = now - args.older_than
    rows, code = [], EXIT_OK
    providers = [p for p in ctx.providers() if not args.provider or p.name in args.provider]

    def act(row, remove) -> None:
        rows.append(row)
        if args.dry_run:
            row["result"] = "would remove"
            return
        try:
            remove()
            row["result"] = "removed"
        except MngrError as exc:
            row.update(result="error", error=exc.line())

    for provider in providers:
        try:
            hosts = ctx.collect_from(provider)
        except MngrError as exc:
            rows.append({"provider": provider.name, "kind": "provider", "name": "", "result": "error",
                         "error": f"could not list hosts: {exc.line()}"})
            code = max(code, exc.exit_code if exc.exit_code == EXIT_UNREACHABLE else EXIT_ERROR)
            continue
        claimed = set()
        for host in hosts:
            if host.record is None:
                since = host.facts.get("created") or now
                if not host.facts.get("running") and since < cutoff and hasattr(provider, "forget_host"):
                    act({"provider": provider.name, "kind": "host", "name": host.facts.get("id", "?"),
                         "reason": "tagged as mngr's, with no record, not running"},
                        lambda h=host: h.provider.forget_host(h))
                continue
            claimed.add(host.record.id)
            if not host.reachable:
                continue
            state = provider.observe(host, now).state
            if state not in ("failed", "destroyed") or host.record.lifecycle.since >= cutoff:
                continue
            row = {"provider": provider.name, "kind": "host", "name": host.name, "id": host.record.id,
                   "reason": f"{state} since {iso(host.record.lifecycle.since)}"}

            def remove(h=host):
                for agent in list(h.agents):
                    h.provider.destroy_agent(agent, remove_work=True, discard_changes=True)
                if not h.agents and hasattr(h.provider, "forget_host"):
                    h.provider.forget_host(h)
            act(row, remove)
        if hasattr(provider, "orphans"):
            for orphan in provider.orphans(cutoff):
                row = {"provider": provider.name, **orphan}
                if orphan.get("keep"):
                    rows.append({**row, "result": "kept"})
                else:
                    act(row, lambda o=orphan, p=provider: p.remove_orphan(o))
        try:
            snapshots = provider.snapshot_list() if hasattr(provider, "snapshot_list") else []
        except MngrError:
            snapshots = []
        known = claimed | {h.record.id for h in hosts if h.record}
        for snap in snapshots:
            created = snap.get("created")
            if snap.get("host_id") in known or created is None or created >= cutoff:
                continue
            act({"provider": provider.name, "kind": "snapshot", "name": snap["id"], "id": snap.get("image", ""),
                 "reason": f"its host {snap.get('host') or snap.get('host_id')} is gone"},
                lambda sid=snap["id"], p=provider: p.snapshot_destroy(sid))
    if any(r.get("result") == "error" for r in rows):
        code = max(code, EXIT_ERROR)
    emit(ctx, rows, lambda: table(rows, [("kind", "kind"), ("name", "name"), ("provider", "provider"),
                                         ("result", "result"), ("why", "reason")])
         or "nothing to remove")
    return code


@command("snapshot")
def cmd_snapshot(args, ctx) -> int:
    if args.snapshot_command == "create":
        (agent,) = ctx.resolve([args.agent])[:1]
        row = agent.host.provider.snapshot_create(agent.host)
        emit(ctx, row, f"snapshot {row['id']} of host {row['host']}")
        return EXIT_OK
    snapshots = []
    for provider in ctx.providers():
        if hasattr(provider, "snapshot_list"):
            snapshots += [(provider, row) for row in provider.snapshot_list()]
    if args.snapshot_command == "list":
        rows = [row for _, row in snapshots]
        emit(ctx, rows, lambda: table(rows, [("id", "id"), ("host", "host"), ("provider", "provider"),
                                             ("created", "created_at"), ("size", "size")])
             or "no snapshots")
        return EXIT_OK
    known = {row["id"]: provider for provider, row in snapshots}
    missing = [s for s in args.snapshots if s not in known]
    if missing:
        raise NotFoundError(f"no snapshot {', '.join(missing)}", "see mngr snapshot list")
    for snapshot in args.snapshots:
        known[snapshot].snapshot_destroy(snapshot)
    emit(ctx, [{"id": s, "destroyed": True} for s in args.snapshots],
         "\n".join(f"destroyed snapshot {s}" for s in args.snapshots))
    return EXIT_OK


@command("destroy")
def cmd_destroy(args, ctx) -> int:
    agents = ctx.resolve(args.agents, args.all, args.stdin)
    if not args.force:
        running = [a.record.name for a in agents if a.state in ("running", "replaced")]
        if running:
            raise RefusedError(f"{', '.join(running)} still running",
                               "stop first, or pass -f to destroy anyway")
        names = ", ".join(a.record.name for a in agents)
        if not sys.stdin.isatty():
            raise RefusedError(f"not destroying {names} without confirmation",
                               "pass -f to destroy without asking")
        print(f"destroy {names}? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing destroyed", file=sys.stderr)
            return EXIT_ERROR

    def destroy(agent):
        require_record(agent.host)
        agent.host.provider.destroy_agent(agent, remove_work=args.remove_branch,
                                                discard_changes=args.discard_changes)
        return "destroyed"
    return run_on_targets(ctx, agents, destroy, "destroyed")


@command("config")
def cmd_config(args, ctx) -> int:
    action = args.config_command
    if action == "path":
        rows = [{"scope": scope, "path": str(path), "exists": path.exists()}
                for scope, path in _scoped_paths(ctx, args.scope)]
        emit(ctx, rows, lambda: "\n".join(f"{r['scope']}: {r['path']}" for r in rows))
        return EXIT_OK
    if action == "list":
        flat = _flatten(ctx.settings)
        emit(ctx, flat, lambda: "\n".join(f"{k} = {json.dumps(v)}" for k, v in sorted(flat.items())))
        return EXIT_OK
    if action == "get":
        value = ctx.settings
        for part in args.key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise NotFoundError(f"no setting {args.key!r}", "see mngr config list")
            value = value[part]
        emit(ctx, value, value if isinstance(value, str) else json.dumps(value))
        return EXIT_OK
    (scope, path), = _scoped_paths(ctx, args.scope)
    set_setting(path, args.key, args.value)
    emit(ctx, {"scope": scope, "path": str(path), "key": args.key},
         f"set {args.key} in {path}")
    return EXIT_OK


def _scoped_paths(ctx, scope):
    paths = settings_files(ctx.env, ctx.cwd)
    if scope is None:
        return paths
    for name, path in paths:
        if name == scope:
            return [(name, path)]
    base = ctx.cwd
    return [(scope, base / ".mngr" / ("settings.toml" if scope == "project" else "settings.local.toml"))]


def _flatten(data, prefix=""):
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat




def set_setting(path: Path, key: str, raw_value: str) -> None:
    """Change one key in a TOML file in place, keeping comments and order."""
    parts = key.split(".")
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts):
        raise UsageError(f"bad setting key {key!r}", "use dotted words, e.g. commands.create.agent_type")
    value = _toml_value(raw_value)
    table_name, leaf = ".".join(parts[:-1]), parts[-1]
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    _load_toml(path)  # refuse to edit a file that is already broken
    header = f"[{table_name}]" if table_name else None
    start = 0 if header is None else next(
        (i + 1 for i, line in enumerate(lines) if line.strip() == header), None)
    new_line = f"{leaf} = {value}"
    if start is None:
        lines += ([""] if lines else []) + [header, new_line]
    else:
        end = next((i for i in range(start, len(lines)) if lines[i].lstrip().startswith("[")),
                   len(lines))
        for i in range(start, end):
            if re.match(rf"^\s*{re.escape(leaf)}\s*=", lines[i]):
                lines[i] = new_line
                break
        else:
            while end > start and not lines[end - 1].strip():
                end -= 1
            lines.insert(end, new_line)
    text = "\n".join(lines) + "\n"
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"setting {key} would break {path}: {exc}",
                          "a dotted key may clash with an inline table; edit the file by hand")
    atomic_write(path, text.encode())


def _toml_value(raw: str) -> str:
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    try:
        tomllib.loads(f"v = {raw}")
        return raw
    except tomllib.TOMLDecodeError:
        return json.dumps(raw)


@command("keys")
def cmd_keys(args, ctx) -> int:
    if args.keys_command == "list":
        keyring = ctx.keyring
        rows = [{"id": k.id, "created_at": iso(k.created_at),
                 "signing": k is keyring.signer()} for k in keyring.keys]
        emit(ctx, rows, lambda: table(rows, [("id", "id"), ("created", "created_at"),
                                             ("signing", "signing")]))
        return EXIT_OK
    path = config_dir(ctx.env) / "keys.json"
    load_keyring(ctx.env)  # made on first use, so there is one to add to
    with FileLock(path.with_name(".keys.lock")):
        data = read_json(path)
        data["keys"].append(_new_key_entry())
        write_json(path, data, mode=0o600)
    ctx._keyring = None
    resigned = 0
    for provider in ctx.providers():
        resigned += provider.resign(ctx.keyring)
    ctx.versions.save()
    if args.retire_old:
        with FileLock(path.with_name(".keys.lock")):
            data = read_json(path)
            data["keys"] = data["keys"][-1:]
            write_json(path, data, mode=0o600)
    new = load_keyring(ctx.env).signer()
    emit(ctx, {"signing_key": new.id, "resigned": resigned},
         f"new signing key {new.id}; re-signed {resigned} records")
    return EXIT_OK


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in HOST_COMMANDS:
        return host_main(argv)
    _VERBOSITY[0] = 0
    try:
        name = _command_name(argv)
        parser = build_parser(only=name)
        argv, extra = _split_after_dashes(argv) if name in ("create", "exec") else (argv, [])
        env = dict(os.environ)
        settings = {}
        if name:
            settings = load_settings(env, Path(os.getcwd()))
            apply_command_settings(parser, name, settings, env)
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help, --version: printed, nothing more to do
            return done.code or EXIT_OK
        args.extra = extra
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        _VERBOSITY[0] = args.verbose - args.quiet
        plugins = Plugins(settings, env, args.enable_plugin, args.disable_plugin)
        ctx = Context(args, env=env, settings=settings, plugins=plugins)
        return run_command(args, ctx)
    except BrokenPipeError:
        return EXIT_OK
    except MngrError as exc:
        return report_error(exc)
    except OSError as exc:  # a file or dir we needed: say which, never a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mngr: error: {exc.strerror or exc}{where} (check the path and its permissions)",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mngr: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of mngr's: one line, the traceback only with -v
        if _VERBOSITY[0] > 0:
            import traceback
            traceback.print_exc()
        print(f"mngr: internal error: {type(exc).__name__}: {exc} (run again with -v, and "
              "report it)", file=sys.stderr)
        return EXIT_ERROR


def report_error(exc: MngrError) -> int:
    print(f"mngr: error: {exc.line()}", file=sys.stderr)
    if exc.detail and _VERBOSITY[0] > 0:
        print(exc.detail.rstrip(), file=sys.stderr)
    return exc.exit_code


def run_command(args, ctx) -> int:
    """A command between the program hooks; on_shutdown always runs once plugins loaded."""
    command = args.command
    if command == "plugin":  # it reports broken plugins, so it must not need them to work
        return COMMANDS[command](args, ctx)
    plugins = ctx.plugins
    outcome = [EXIT_ERROR]
    try:
        plugins.call("on_startup", CommandCall(command, args))
        for _name, changed in plugins.call("on_load_config", ctx.settings):
            if isinstance(changed, dict):
                ctx.settings = changed
        call = CommandCall(command, args)
        plugins.call("on_before_command", call)
        code = outcome[0] = COMMANDS[command](call.args, ctx)
        plugins.call("on_after_command", CommandOutcome(command, code))
        return code
    except MngrError as exc:
        outcome[0] = exc.exit_code
        if plugins._loaded is not None and not isinstance(exc, PluginError):
            try:
                plugins.call("on_error", CommandOutcome(command, exc.exit_code, exc.line()))
            except PluginError as hook_error:
                report_error(hook_error)
        raise
    finally:
        if plugins._loaded is not None:
            try:
                plugins.call("on_shutdown", CommandOutcome(command, outcome[0]))
            except PluginError as hook_error:
                report_error(hook_error)


def exit_quickly(code: int) -> None:
    """End the process once the command is done: flush what it printed, then leave
    without the interpreter's teardown, which for a command that lasts a moment costs
    as much as the command (a full collection and clearing every module). Nothing
    mngr needs runs at teardown: files are written atomically before this point."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else EXIT_ERROR)


def console_main() -> None:
    exit_quickly(main())


if __name__ == "__main__":
    sys.modules.setdefault("mngr", sys.modules["__main__"])
    exit_quickly(main())
