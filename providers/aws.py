"""The AWS EC2 provider: each host is an instance, made and stopped through the
`aws` CLI and reached over ssh like a machine.

Trust: an instance may run untrusted code, so its hosts default to
`trust = untrusted`. What this module believes comes from
`aws ec2 describe-instances` (certified: state, LaunchTime as the boot) and
from the signed records the controller keeps under ~/.mngr/hosts/<host-id>/;
what the instance says about itself over ssh is reported. Stopping goes
through the EC2 API, so nothing inside an instance can prevent it.

Calls per `list`: one `aws ec2 describe-instances` (the CLI pages through the
results itself), then one ssh per running instance, in parallel.

Host keys: an instance's key is learnt on first contact and pinned under its
instance id (ssh HostKeyAlias) in the host's own known_hosts file, so a new
address after a restart does not make ssh learn a key again: a changed key is
refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mngr

from .remote import one_at_a_time
from .ssh import Machine, Ssh, SshPlan, SshProvider

TAG = "mngr"
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
TRANSIENT = ("RequestLimitExceeded", "Throttling", "Could not connect to the endpoint URL",
             "Connect timeout", "Read timeout", "ServiceUnavailable", "InternalError",
             "Unavailable", "Connection was closed", "timed out")
REFUSED = ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
           "ExpiredToken", "AccessDenied")
QUOTA = ("InstanceLimitExceeded", "VcpuLimitExceeded", "InsufficientInstanceCapacity",
         "MaxSpotInstanceCountExceeded")
CONF_KEYS = {"backend", "region", "profile", "endpoint_url", "ami", "instance_type", "key_name",
             "identity", "security_group_ids", "subnet_id", "ssh_user", "ssh_proxy_jump",
             "address_override", "host_dir", "work_root", "tmux_socket", "shutdown_command",
             "policy", "trust", "timeout", "connect_timeout", "ready_timeout"}
RETRIES = 5                 # tries of one aws call on throttling or a transient failure
BACKOFF_BASE = 1.0          # seconds: the first retry waits up to this, each next one twice as long
BACKOFF_CAP = 20.0          # and no retry waits longer than this
PENDING_WAIT = 60           # seconds a stop waits for a pending instance to run (EC2 cannot stop it)
EC2_TRANSITIONAL = ("pending", "stopping", "shutting-down")
STATUS_FILE = "ec2-status.json"     # in a host's record dir: when mngr first saw its EC2 state


def backoff_delay(attempt: int, rand=None) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): full jitter under a ceiling
    that doubles each time and never passes BACKOFF_CAP, so many controllers throttled
    at once do not all come back at the same moment."""
    return (rand or random.random)() * min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))


def transition_since(status: str, launched, first_seen, signed_since, now: float) -> float:
    """When an instance entered the EC2 state `status` (pending, stopping, shutting-down),
    as far as mngr can tell: pending from its LaunchTime (set at every start), when that
    is not older than the signed record's date; otherwise from when mngr first saw the
    state, else now. Never earlier than the signed record's date, never later than now:
    a stale record must not make a fresh transition look stuck."""
    since = launched if status == "pending" and launched is not None else None
    if since is None or signed_since is not None and since < signed_since:
        since = first_seen if first_seen is not None else now
    if signed_since is not None:
        since = max(since, signed_since)
    return min(since, now)


def parse_address_override(value, name: str):
    """address_override: "host", "host:port", "[v6]" or "[v6]:port" (or a bare IPv6
    address) to (address, port), or None when unset. Anything else is a ConfigError."""
    if value is None or value == "":
        return None
    bad = mngr.ConfigError(f"settings [providers.{name}]: bad address_override {value!r}",
                           "use host or host:port (port 1-65535), [v6]:port for IPv6")
    if not isinstance(value, str):
        raise bad
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([^\s:\[\]@/]+)(?::([0-9]{1,5}))?", value)
    if match:
        address, port = match.group(1) or match.group(3), match.group(2) or match.group(4) or "22"
    elif re.fullmatch(r"[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*", value):
        address, port = value, "22"
    else:
        raise bad
    if not 0 < int(port) < 65536:
        raise bad
    return address, int(port)


def positive_seconds(value, key: str, name: str) -> float:
    """A timeout setting: a positive number of seconds, or a duration like "5m"."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(mngr.parse_duration(value))
        except mngr.MngrError:
            seconds = None
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise mngr.ConfigError(f"settings [providers.{name}]: {key} must be a positive number of seconds, "
                               f"not {value!r}", f"like {key} = 300 or {key} = \"5m\"")
    return seconds


class HostKeyChangedError(mngr.RefusedError):
    """An instance offered a host key other than the one pinned for it."""


@dataclass(frozen=True)
class InstanceMachine(Machine):
    """A machine that is an EC2 instance: its host key is pinned under its instance id."""

    instance_id: str = ""
    fresh: str = ""         # set: a control master of its own, so its key is checked now


class InstanceSsh(Ssh):
    """ssh to instances: the host key is looked up and learnt under the instance id
    (HostKeyAlias), not the address, which changes at every start. A key never seen for
    that instance is learnt (its first contact); a different one is refused. Control
    masters are per instance and address, so none is shared between instances."""

    def argv(self, machine, remote, tty=False, accept_new=False):
        argv = super().argv(machine, remote, tty, accept_new)
        alias = getattr(machine, "instance_id", "")
        if not alias:
            return argv
        # ssh takes the first value given for an option: these go before mngr's usual ones
        pinned = ["-o", f"HostKeyAlias={alias}", "-o", "StrictHostKeyChecking=accept-new"]
        shared = next((o for o in argv if o.startswith("ControlPath=")), "")
        if shared:
            digest = hashlib.sha256(f"{alias} {machine.user}@{machine.address}:{machine.port} "
                                    f"{getattr(machine, 'fresh', '')}".encode()).hexdigest()[:32]
            pinned += ["-o", f"ControlPath={shared[len('ControlPath='):].rsplit('/', 1)[0]}/{digest}"]
        return argv[:1] + pinned + argv[1:]

    def failure(self, machine, stderr: str) -> mngr.MngrError:
        alias = getattr(machine, "instance_id", "")
        if alias and ("REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
                      or "Host key verification failed" in stderr):
            return HostKeyChangedError(
                f"the host key of {machine.name}'s instance {alias} ({machine.where}) is not the one "
                "mngr pinned when it first reached it: refusing to connect",
                f"if the instance's host keys were replaced on purpose, delete the line for {alias} "
                f"from {machine.known_hosts}; otherwise treat the instance as compromised")
        return super().failure(machine, stderr)


def tags_of(item) -> dict:
    return {t.get("Key"): t.get("Value") for t in item.get("Tags") or []}


def tag_spec(kind: str, tags: dict) -> str:
    """--tag-specifications shorthand for one resource type."""
    inner = ",".join(f"{{Key={k},Value={v}}}" for k, v in tags.items())
    return f"ResourceType={kind},Tags=[{inner}]"


class AwsProvider(SshProvider):
    backend = "aws"
    has_machines = False        # its hosts are instances it makes
    default_trust = "untrusted"

    def __init__(self, name: str, conf: dict, ctx):
        unknown = set(conf) - CONF_KEYS - {"implicit"}
        if unknown:
            raise mngr.ConfigError(f"settings [providers.{name}]: unknown key {sorted(unknown)[0]!r}",
                                   "known: " + ", ".join(sorted(CONF_KEYS - {"backend"})))
        groups = conf.get("security_group_ids", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) and g.strip() for g in groups):
            raise mngr.ConfigError(f"settings [providers.{name}]: security_group_ids must be a list "
                                   f"of strings, not {groups!r}", 'like security_group_ids = ["sg-0123"]')
        self.address_override = parse_address_override(conf.get("address_override"), name)
        self.ready_timeout = positive_seconds(conf.get("ready_timeout", 300), "ready_timeout", name)
        super().__init__(name, conf, ctx)
        self.ssh = InstanceSsh(ctx, self.ssh.connect_timeout, self.ssh.timeout)
        self.region = str(conf.get("region") or ctx.env.get("AWS_REGION")
                          or ctx.env.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.profile = str(conf.get("profile") or "")
        self.endpoint = str(conf.get("endpoint_url") or "")
        self.calls = 0

    def machines(self) -> dict:
        return {}

    # Calling aws -----------------------------------------------------------------

    def aws(self, *args, timeout=None):
        """One `aws ec2` call, as JSON. Throttling and an endpoint that does not answer
        are retried with bounded exponential backoff and jitter, then exit 75; refused
        credentials and quotas say so."""
        argv = ["aws", "--output", "json", "--region", self.region, "--cli-connect-timeout", "10"]
        if self.profile:
            argv += ["--profile", self.profile]
        if self.endpoint:
            argv += ["--endpoint-url", self.endpoint]
        argv += ["ec2", *args]
        env = {**self.ctx.env, "AWS_MAX_ATTEMPTS": "1", "AWS_PAGER": ""}
        tail = ""
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(backoff_delay(attempt))
            self.calls += 1
            try:
                result = mngr.run(argv, check=False, env=env, timeout=timeout or self.ssh.timeout,
                                  what=f"aws ec2 {args[0]}")
            except mngr.CommandTimedOutError as exc:
                tail = exc.message
                continue
            if result.returncode == 0:
                return json.loads(result.stdout) if result.stdout.strip() else {}
            err = result.stderr.strip()
            tail = (err.splitlines() or [f"exit {result.returncode}"])[-1]
            profile = self.profile or self.ctx.env.get("AWS_PROFILE") or "default"
            if "Unable to locate credentials" in err or "could not be found" in err and "profile" in err:
                raise mngr.ConfigError(f"no AWS credentials for profile {profile}: {tail}",
                                       f"run aws configure --profile {profile}, or set "
                                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
            if any(code in err for code in REFUSED):
                raise mngr.RefusedError(f"AWS refused the request (profile {profile}): {tail}",
                                        "check the profile's credentials and permissions")
            if any(code in err for code in QUOTA):
                raise mngr.RefusedError(f"AWS quota exceeded: {tail}",
                                        "ask AWS for a higher limit, or use another instance type "
                                        "or region")
            if not any(code in err for code in TRANSIENT):
                raise mngr.CommandFailedError(f"aws ec2 {args[0]} failed: {tail}", detail=err)
        where = self.endpoint or f"region {self.region}"
        raise mngr.UnreachableError(f"cannot reach AWS EC2 at {where} after {RETRIES} tries: {tail}",
                                    "retry later; mngr enforce tries again on its next run")

    def _describe(self, *instance_ids) -> list:
        if instance_ids:
            data = self.aws("describe-instances", "--instance-ids", *instance_ids)
        else:
            data = self.aws("describe-instances", "--filters",
                            f"Name=tag:{TAG}:provider,Values={self.name}",
                            f"Name=instance-state-name,Values={','.join(LIVE_STATES)}")
        return [inst for reservation in data.get("Reservations") or []
                for inst in reservation.get("Instances") or []]

    # Reading ------------------------------------------------------------------------

    def collect(self) -> list:
        records = self._records()
        latest, extra = {}, []
        for inst in self._describe():
            if not self.ours(tags_of(inst).get(f"{TAG}:controller", "")):
                continue  # another controller's, on the same account
            host_id = tags_of(inst).get(f"{TAG}:host-id", "")
            if host_id in latest:  # two live instances for one host: the older one is a stray
                older, latest[host_id] = sorted([latest[host_id], inst], key=_newest_live)
                extra.append(older)
            else:
                latest[host_id] = inst
        pairs = [(store, record, self._facts(latest.pop(record.id, None), record, store))
                 for store, record in records]
        running = [facts["machine"] for _, _, facts in pairs if facts.get("machine")]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            reports = dict(zip([m.name for m in running], pool.map(self._report, running)))
        hosts = []
        for store, record, facts in pairs:
            seen, report = reports.get(record.name, ({}, None))
            if seen and not seen.get("reachable"):
                facts["ssh_error"] = seen.get("error", "")
            host = self._view(store, record, facts, report,
                              unreported="unknown" if facts.get("running") else "stopped")
            if facts.get("ssh_error") and host.record.policy.trust == "trusted":
                host.reachable, host.error = False, facts["ssh_error"]
            hosts.append(host)
        for inst in list(latest.values()) + extra:  # ours, claimed by no record: fails closed
            hosts.append(mngr.HostView(self, None, mngr.Verification(False, "missing"),
                                       facts=self._facts(inst, None, None)))
        return hosts

    def _facts(self, inst, record, store) -> dict:
        if inst is None:
            return {"exists": False, "reachable": True}
        status = inst["State"]["Name"]
        launched = _epoch(inst.get("LaunchTime"))
        facts = {"exists": status not in ("shutting-down", "terminated"), "running": status == "running",
                 "status": status, "id": inst["InstanceId"], "reachable": True,
                 "started": launched if status == "running" else None, "launched": launched,
                 "created": record.created_at if record else launched,
                 "status_seen": self._status_seen(store, inst["InstanceId"], status)}
        if status == "running" and record is not None:
            facts["machine"] = self._machine(record, inst, store)
        return facts

    def _status_seen(self, store, instance_id: str, status: str):
        """When mngr first saw this instance in this EC2 state (kept in the host's record
        dir, on the controller); None when it cannot tell."""
        if store is None:
            return None
        path = store.host_dir.root / STATUS_FILE
        try:
            seen = json.loads(path.read_text())
            if seen.get("instance") == instance_id and seen.get("status") == status:
                return float(seen["since"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        now = time.time()
        try:
            mngr.atomic_write(path, json.dumps({"instance": instance_id, "status": status,
                                                "since": now}).encode(), mode=0o600)
        except OSError as exc:
            mngr.warn(f"could not note the EC2 state of {instance_id} in {path}: {exc}")
        return now

    def _machine(self, record, inst, store) -> Machine:
        """How to reach a host's instance: the address override, else its public or
        private address; its host key pinned under its instance id in the host's own
        known_hosts file."""
        if self.address_override:
            address, port = self.address_override
        else:
            address, port = inst.get("PublicIpAddress") or inst.get("PrivateIpAddress") or "", 22
        if not address:
            raise mngr.UnreachableError(f"instance {inst['InstanceId']} of {record.name} has no address yet",
                                        "wait for it, or set address_override")
        def setting(key, default):  # "{host}" in a setting is the host's name
            return str(self.conf.get(key) or default).replace("{host}", record.name)
        return InstanceMachine(name=record.name, address=address, port=int(port),
                       user=setting("ssh_user", "admin"), identity=self._identity(record.id),
                       tmux_socket=setting("tmux_socket", mngr.DEFAULT_ROOT_NAME),
                       host_dir=setting("host_dir", "~/.mngr-host"),
                       work_root=setting("work_root", "~/mngr-work"),
                       allow_shutdown=True, shutdown_command=setting("shutdown_command", ""),
                       proxy_jump=str(self.conf.get("ssh_proxy_jump") or ""), source="aws",
                       known_hosts=str(store.host_dir.root / "known_hosts"),
                       instance_id=inst["InstanceId"])

    def _known_machine(self, host):
        return host.facts.get("machine")

    def _push(self, host, store, records=()) -> None:
        """Into a running instance; a stopped one gets them when it starts."""
        if host.facts.get("machine") and host.reachable:
            self._deploy(host.facts["machine"], store, records=records)
        else:
            self._keep(store, records)

    def _machine_of(self, host) -> Machine:
        machine = host.facts.get("machine")
        if machine is None:
            raise mngr.RefusedError(f"host {host.name}'s instance is not running",
                                    "start it first: mngr start AGENT")
        return machine

    def observe(self, host, now: float) -> mngr.Observation:
        """EC2's pending and stopping are starting and stopping, dated from the instance's
        launch or from when mngr first saw them, not from the signed record's date: a host
        started after a week stopped is not a week into starting."""
        obs = super().observe(host, now)
        status = host.facts.get("status")
        if obs.state == "failed" or status not in ("pending", "stopping"):
            return obs
        since = transition_since(status, host.facts.get("launched"), host.facts.get("status_seen"),
                                 host.record.lifecycle.since if host.record else None, now)
        return replace(obs, state="starting" if status == "pending" else "stopping", state_since=since)

    # Keys -----------------------------------------------------------------------------

    def _key_path(self, host_id: str) -> Path:
        return Path(self.ctx.env.get("HOME") or Path.home()) / ".ssh" / "mngr" / host_id

    def _identity(self, host_id: str) -> str:
        if self.conf.get("key_name"):
            return str(self.conf.get("identity") or "")
        return str(self._key_path(host_id))

    def _key_pair(self, host_id: str) -> str:
        """The key pair to launch with: the configured one, or a new one for this host
        (private key under ~/.ssh/mngr/HOST-ID, 0600, imported as mngr-HOST-ID)."""
        if self.conf.get("key_name"):
            return str(self.conf["key_name"])
        path = self._key_path(host_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mngr.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mngr-{host_id}", "-f", path],
                 what="ssh-keygen")
        os.chmod(path, 0o600)
        self.aws("import-key-pair", "--key-name", f"mngr-{host_id}",
                 "--public-key-material", f"fileb://{path}.pub",
                 "--tag-specifications", tag_spec("key-pair", {f"{TAG}:host-id": host_id,
                                                               f"{TAG}:provider": self.name}))
        return f"mngr-{host_id}"

    def _forget_key(self, host_id: str) -> None:
        if self.conf.get("key_name"):
            return
        try:
            self.aws("delete-key-pair", "--key-name", f"mngr-{host_id}")
        except mngr.MngrError as exc:
            if "InvalidKeyPair.NotFound" not in exc.line():  # still in AWS: keep its private key
                mngr.warn(f"could not delete key pair mngr-{host_id}: {exc.line()}; its private key "
                          f"stays at {self._key_path(host_id)} (delete both by hand: aws ec2 "
                          f"delete-key-pair --key-name mngr-{host_id})")
                return
        for suffix in ("", ".pub"):
            try:
                os.unlink(f"{self._key_path(host_id)}{suffix}")
            except FileNotFoundError:
                pass

    # Creating -------------------------------------------------------------------------

    def plan_agent(self, args, name) -> SshPlan:
        if not self.conf.get("ami") and not args.snapshot:
            raise mngr.ConfigError(f"settings [providers.{self.name}] needs ami = \"ami-...\"",
                                   "the image new instances boot from")
        if self.conf.get("key_name") and not self.conf.get("identity"):
            raise mngr.ConfigError(f"settings [providers.{self.name}]: key_name needs identity",
                                   "the private key file of that key pair")
        name, agent_type, command, env, permissions, source, _ = self._copy_basics(
            args, name, f"an instance of {self.name}")
        return SshPlan(name, agent_type, command, env, source, tuple(args.exclude), args, permissions)

    def create_agent(self, plan: SshPlan, host=None):
        if host is not None:
            return self._add_agent(host, replace(plan, machine=self._machine_of(host)))
        for _, record in self._records():
            if record.name == plan.name:
                raise mngr.RefusedError(f"an aws host named {plan.name} already exists",
                                        f"pick another name, or add to it: --host {plan.name}")
        args = plan.args
        record, store = self._new_host(plan.name, args, plan.permissions)
        host_id, now = record.id, record.created_at
        self._begin_host(record, store)
        instance_id = ""
        try:
            image = self._snapshot_image(args.snapshot)["ImageId"] if args.snapshot else self.conf["ami"]
            key_name = self._key_pair(host_id)
            instance_id = self._run_instance(record, image, key_name)
            machine = self._ready(record, instance_id, store)
            self.ctx.hook("on_after_host_create", mngr.host_info(record, self.name))
            home = self._install(machine)
            agent = self._agent_record(plan, host_id, now, home["work_root"])
            self.ctx.hook("on_before_agent_create",
                          mngr.agent_info(agent, mngr.host_info(record, self.name)))
            self._copy_work(machine, plan, agent.work_dir)
            store.write_agent(agent)
            mngr.atomic_write(store.host_dir.agent_dir(agent.id) / "env",
                              mngr.format_env_file(plan.env), mode=0o600)
            record = replace(record, agents=(agent.id,), version=store.next_version(host_id, record.version))
            running = self._set_state(store, record, "running", write=False)
            self._deploy(machine, store, start=[agent.id], records=[agent, running], new_host=True)
            self._start_at_boot(machine, host_id)
        except BaseException as exc:
            # nothing orphaned: the instance is terminated, the key pair and records go
            if instance_id:
                try:
                    self.aws("terminate-instances", "--instance-ids", instance_id)
                except mngr.MngrError as cleanup:
                    mngr.warn(f"could not terminate {instance_id} (it is tagged mngr:host-id="
                              f"{host_id}; mngr enforce stops it): {cleanup.line()}")
            self._forget_key(host_id)
            self._drop_records(record)
            if isinstance(exc, mngr.MngrError) and not exc.hint:
                exc.hint = "its instance was terminated; fix the cause and create again"
            raise
        self.ctx.state_changed(record, running, self.name)
        view = self._fresh_view(running, agent, {"id": instance_id, "status": "running",
                                                 "machine": machine, "reachable": True})
        self.ctx.hook("on_after_agent_create", mngr.agent_info(agent, mngr.host_info(running, self.name),
                                                               view.state))
        return view

    def _run_instance(self, record, image: str, key_name: str) -> str:
        """One instance, tagged at launch (never an untagged one), stopping, not
        terminating, when it shuts itself down; IMDSv2 required."""
        import getpass
        import socket

        tags = {f"{TAG}:host-id": record.id, f"{TAG}:host-name": record.name, f"{TAG}:provider": self.name,
                f"{TAG}:created-by": f"{getpass.getuser()}@{socket.gethostname()}",
                f"{TAG}:controller": self.controller, "Name": f"mngr-{record.name}"}
        token = f"{record.id[:20]}-{os.urandom(6).hex()}"   # retries of this launch: one instance
        argv = ["run-instances", "--image-id", image, "--count", "1", "--client-token", token,
                "--instance-type", str(self.conf.get("instance_type") or "t3.small"),
                "--key-name", key_name, "--instance-initiated-shutdown-behavior", "stop",
                "--metadata-options", "HttpTokens=required,HttpEndpoint=enabled",
                "--tag-specifications", tag_spec("instance", tags), tag_spec("volume", tags)]
        groups = self.conf.get("security_group_ids") or []
        if groups:
            argv += ["--security-group-ids", *[str(g) for g in groups]]
        if self.conf.get("subnet_id"):
            argv += ["--subnet-id", str(self.conf["subnet_id"])]
        instances = self.aws(*argv, timeout=120).get("Instances") or []
        if not instances or not instances[0].get("InstanceId"):
            raise mngr.CommandFailedError(f"aws ec2 run-instances returned no instance for {record.name}",
                                          f"look for instances tagged mngr:host-id={record.id}")
        return instances[0]["InstanceId"]

    def _ready(self, record, instance_id: str, store) -> Machine:
        """Wait (bounded) for the instance to run and answer ssh; its host key is learnt on
        its first contact, and checked against the pinned one at every later start.
        Progress on stderr when it is a terminal."""
        deadline = time.monotonic() + self.ready_timeout
        shown = ""
        while True:
            try:
                found = self._describe(instance_id)
            except mngr.CommandFailedError as exc:  # a new instance may not be visible at once
                if "InvalidInstanceID.NotFound" not in exc.message or time.monotonic() > deadline:
                    raise
                time.sleep(2)
                continue
            if not found:  # nor listed, at first
                if time.monotonic() > deadline:
                    raise mngr.CommandFailedError(
                        f"instance {instance_id} of {record.name} is not in aws ec2 describe-instances "
                        f"after {self.ready_timeout:g}s", f"see aws ec2 describe-instances --instance-ids "
                        f"{instance_id}; a slow region may need a larger ready_timeout")
                time.sleep(2)
                continue
            inst = found[0]
            status = inst["State"]["Name"]
            if status != shown and sys.stderr.isatty():
                print(f"mngr: {instance_id}: {status}", file=sys.stderr)
                shown = status
            if status == "running":
                break
            if status not in ("pending",) or time.monotonic() > deadline:
                raise mngr.CommandFailedError(f"instance {instance_id} is {status}, not running",
                                              f"see aws ec2 describe-instances --instance-ids {instance_id}")
            time.sleep(2)
        machine = self._machine(record, inst, store)
        fresh = replace(machine, fresh=os.urandom(6).hex())
        while True:
            try:  # a new connection, so the key is checked now, not an old master's reused
                self.ssh.run(fresh, "true", timeout=self.ssh.connect_timeout + 10)
                return machine
            except HostKeyChangedError:
                raise
            except (mngr.UnreachableError, mngr.RefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def _start_at_boot(self, machine: Machine, host_id: str) -> str:
        """Make the instance start its watcher at every boot: a script in its host dir, run
        by a systemd unit where systemd runs, by an @reboot crontab line otherwise. Says
        which ("systemd", "cron"), or warns that it could not ("none")."""
        from .ssh import in_host, prelude

        boot = prelude(machine) + in_host(
            machine, "watch", "--on-stop", "shutdown", "--interval", self.interval,
            "--tmux-socket", machine.tmux_socket,
            *(["--shutdown-command", machine.shutdown_command] if machine.shutdown_command else [])) + "\n"
        unit = f"mngr-watcher-{host_id}"
        script = (prelude(machine) + '$AS sh -c \'cat > "$1/bin/boot.sh"\' sh "$D" && B="$D/bin/boot.sh" && '
                  'if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then '
                  'S=; [ "$(id -u)" = 0 ] || S="sudo -n"; '
                  'printf "[Unit]\\nDescription=mngr idle watcher\\n[Service]\\nUser=%s\\n'
                  'ExecStart=/bin/sh %s\\n[Install]\\nWantedBy=multi-user.target\\n" "$(id -un)" "$B" '
                  f'| $S tee /etc/systemd/system/{unit}.service >/dev/null && $S systemctl daemon-reload '
                  f'&& $S systemctl enable {unit} >/dev/null 2>&1 && echo systemd; '
                  'elif command -v crontab >/dev/null; then '
                  f'{{ crontab -l 2>/dev/null | grep -v "# {unit}$"; echo "@reboot /bin/sh $B # {unit}"; }} '
                  '| crontab - && echo cron; else echo none; fi')
        result = self.ssh.run(machine, script, input=boot)
        how = (result.stdout.strip().splitlines() or ["none"])[-1]
        if result.returncode != 0 or how not in ("systemd", "cron"):
            mngr.warn(f"{machine.name} has neither systemd nor cron: its watcher will not start "
                      "after a reboot (mngr enforce still stops it)")
            return "none"
        return how

    def _stop_at_boot(self, machine: Machine, host_id: str) -> None:
        unit = f"mngr-watcher-{host_id}"
        script = ('if [ -f /etc/systemd/system/' + unit + '.service ]; then S=; [ "$(id -u)" = 0 ] '
                  '|| S="sudo -n"; $S systemctl disable ' + unit + ' >/dev/null 2>&1; '
                  '$S rm -f /etc/systemd/system/' + unit + '.service; fi; '
                  'if command -v crontab >/dev/null && crontab -l 2>/dev/null | grep -q "# ' + unit
                  + '$"; then crontab -l | grep -v "# ' + unit + '$" | crontab -; fi; true')
        try:
            self.ssh.run(machine, script)
        except mngr.MngrError:
            pass  # the instance is being terminated: its boot entries go with it

    # Acting -------------------------------------------------------------------------------

    def _instance(self, host) -> str:
        if not host.facts.get("exists"):
            raise mngr.RefusedError(f"host {host.name}'s instance is gone",
                                    "remove what is left: mngr destroy -f AGENT")
        return host.facts["id"]

    @one_at_a_time
    def start_agent(self, view):
        host = view.host
        store = self.store(host.record.id)
        if host.facts.get("running"):
            machine = self._machine_of(host)
            record, _ = store.read_host()
            self._deploy(machine, store, start=[view.record.id])
            return self._fresh_view(record, view.record, dict(host.facts))
        instance_id = self._instance(host)
        record, _ = store.read_host()
        record = self._now_stopped(store, record)
        record = self._set_state(store, record, "starting")

        def start() -> str:
            self.aws("start-instances", "--instance-ids", instance_id)
            return instance_id
        return self._boot(view, store, record, start)

    def _boot(self, view, store, record, launch, replacing: str = ""):
        """starting -> running: launch (returns the instance id), wait until it answers, send
        the records and start the agent. If any of it fails the instance is not left
        running: stopped, and the host failed; or, when it was a new instance replacing
        the instance `replacing`, terminated, and the host stopped on its old instance."""
        instance_id = ""
        try:
            instance_id = launch()
            machine = self._ready(record, instance_id, store)
            running = self._set_state(store, record, "running", write=False)
            self._deploy(machine, store, start=[view.record.id], records=[running], new_host=True)
        except BaseException as exc:
            self._failed_boot(store, instance_id, replacing, exc)
            raise
        self.ctx.state_changed(record, running, self.name)
        return self._fresh_view(running, view.record, {"id": instance_id, "status": "running",
                                                       "machine": machine, "reachable": True})

    def _failed_boot(self, store, instance_id: str, replacing: str, exc: BaseException) -> None:
        if instance_id:
            action = "terminate-instances" if replacing else "stop-instances"
            try:
                self.aws(action, "--instance-ids", instance_id)
            except mngr.MngrError as cleanup:
                mngr.warn(f"could not {action.split('-')[0]} {instance_id}: {cleanup.line()}")
        if replacing:
            self._set_state(store, store.read_host()[0], "stopped")
            if isinstance(exc, mngr.MngrError):
                exc.hint = (f"{exc.hint}; " if exc.hint else "") + (
                    f"the host keeps its old instance {replacing}, stopped: mngr start AGENT starts it")
        else:
            self._set_state(store, store.read_host()[0], "failed")

    def _stop_instance(self, instance_id: str, force: bool, status: str = "") -> None:
        """stop-instances. EC2 refuses to stop a pending instance: wait (bounded) for it to
        run, then stop it; still pending after that is a clear error, and mngr enforce
        tries again on its next run. Never terminated instead: its disk holds the work."""
        waited = min(self.ready_timeout, PENDING_WAIT)
        deadline = time.monotonic() + waited
        while True:
            if status != "pending":
                try:
                    self.aws("stop-instances", "--instance-ids", instance_id, *(["--force"] if force else []))
                    return
                except mngr.CommandFailedError as exc:
                    if "IncorrectInstanceState" not in exc.message:
                        raise
            if time.monotonic() >= deadline:
                raise mngr.CommandFailedError(
                    f"instance {instance_id} is still {status or 'not stoppable'} after {waited:g}s: "
                    "EC2 stops an instance only once it runs",
                    "mngr enforce tries again on its next run; see aws ec2 describe-instances "
                    f"--instance-ids {instance_id}")
            time.sleep(2)
            found = self._describe(instance_id)
            status = found[0]["State"]["Name"] if found else "terminated"
            if status in ("stopped", "shutting-down", "terminated"):
                return

    def stop_agent(self, view, snapshot_mode: str = "auto") -> None:
        others = [a for a in view.host.agents if a.record.id != view.record.id and a.state == "running"]
        if others:
            self.tmux(self._machine_of(view.host)).kill(view.record.session)
            return
        if snapshot_mode == "always":
            self.snapshot_create(view.host)
        self._stop(view.host, power_off=True)

    @one_at_a_time
    def _stop(self, host, power_off: bool = True, kill_all: bool = False) -> None:
        """Stop hooks over ssh when it answers (best effort), then the EC2 API stops the
        instance, which nothing inside it can refuse."""
        instance_id = self._instance(host)
        status = host.facts.get("status", "")
        if host.record is None:
            self._stop_instance(instance_id, kill_all, status)
            return
        store = self.store(host.record.id)
        record, _ = store.read_host()
        if record.lifecycle.state == "running":
            record = self._set_state(store, record, "stopping")
        if host.facts.get("machine") and not kill_all:
            machine = host.facts["machine"]
            try:
                self.ssh.run(machine, self._stop_script(machine, False, False),
                             timeout=mngr.HOOK_TIMEOUT + 30)
            except mngr.MngrError as exc:
                mngr.warn(f"stop hooks on {host.name} did not run: {exc.line()}")
        self._stop_instance(instance_id, kill_all, status)
        if record.lifecycle.state != "failed":
            self._set_state(store, record, "stopped")

    @one_at_a_time
    def mark_failed(self, host) -> None:
        store = self.store(host.record.id)
        record, _ = store.read_host()
        if host.facts.get("exists") and host.facts.get("status") != "stopped":
            self._stop_instance(host.facts["id"], True, host.facts.get("status", ""))
        self._set_state(store, record, "failed")

    @one_at_a_time
    def destroy_agent(self, view, remove_work: bool, discard_changes: bool) -> None:
        host = view.host
        if len(self.store(host.record.id).read_host()[0].agents) > 1:
            return SshProvider.destroy_agent(self, view, remove_work, discard_changes)
        store, record, info, agent, _ = self._destroying(view)
        self.ctx.hook("on_before_host_destroy", info)
        if host.facts.get("machine") and host.reachable:  # an instance may be a machine kept
            self._stop_at_boot(host.facts["machine"], record.id)  # after it: say nothing more
        if host.facts.get("exists"):
            self.aws("terminate-instances", "--instance-ids", host.facts["id"])
        self._forget_key(record.id)
        self._host_destroyed(record, agent)

    def _remove_resource(self, host) -> None:
        if host.facts.get("exists"):
            self.aws("terminate-instances", "--instance-ids", host.facts["id"])
        if host.record is not None:
            self._forget_key(host.record.id)

    # Snapshots: images ----------------------------------------------------------------------

    def snapshot_create(self, host) -> dict:
        snapshot_id = os.urandom(6).hex()
        tags = {f"{TAG}:host-id": host.record.id, f"{TAG}:host-name": host.record.name,
                f"{TAG}:provider": self.name, f"{TAG}:snapshot-id": snapshot_id}
        image = self.aws("create-image", "--instance-id", self._instance(host), "--no-reboot",
                         "--name", f"mngr-{host.record.id}-{snapshot_id}",
                         "--tag-specifications", tag_spec("image", tags), timeout=300)["ImageId"]
        return {"id": snapshot_id, "host": host.record.name, "host_id": host.record.id,
                "provider": self.name, "image": image, "created_at": mngr.iso(time.time())}

    def _images(self) -> list:
        return self.aws("describe-images", "--owners", "self", "--filters",
                        f"Name=tag:{TAG}:provider,Values={self.name}").get("Images") or []

    def snapshot_list(self) -> list:
        names = {record.id: record.name for _, record in self._records()}
        rows = []
        for image in self._images():
            tags = tags_of(image)
            host_id = tags.get(f"{TAG}:host-id", "")
            rows.append({"id": tags.get(f"{TAG}:snapshot-id", ""), "host": names.get(host_id, host_id),
                         "host_id": host_id, "provider": self.name, "image": image["ImageId"],
                         "created_at": image.get("CreationDate", ""),
                         "created": _epoch(image.get("CreationDate"))})
        return rows

    def _snapshot_image(self, snapshot_id: str) -> dict:
        for image in self._images():
            if tags_of(image).get(f"{TAG}:snapshot-id") == snapshot_id:
                return image
        raise mngr.NotFoundError(f"no snapshot {snapshot_id} in provider {self.name}",
                                 "see mngr snapshot list")

    def snapshot_destroy(self, snapshot_id: str) -> None:
        """The image, then the EBS snapshots behind it (deregistering leaves them, and
        they cost money)."""
        image = self._snapshot_image(snapshot_id)
        self.aws("deregister-image", "--image-id", image["ImageId"])
        for mapping in image.get("BlockDeviceMappings") or []:
            snapshot = (mapping.get("Ebs") or {}).get("SnapshotId")
            if snapshot:
                self.aws("delete-snapshot", "--snapshot-id", snapshot)

    @one_at_a_time
    def start_from_snapshot(self, view, snapshot_id: str):
        """A new instance from the image, under the same host id. The old one is kept,
        stopped, until the new one runs and the record says so; only then terminated."""
        image = self._snapshot_image(snapshot_id)["ImageId"]
        host = view.host
        store = self.store(host.record.id)
        old = host.facts["id"] if host.facts.get("exists") else ""
        if old and host.facts.get("status") in ("pending", "running"):
            self._stop_instance(old, False, host.facts["status"])   # one instance of a host runs
        record, _ = store.read_host()
        record = self._set_state(store, self._now_stopped(store, record), "starting")
        started = self._boot(view, store, record,
                             lambda: self._run_instance(record, image, self._key_name(record.id)),
                             replacing=old)
        if old:
            try:
                self.aws("terminate-instances", "--instance-ids", old)
            except mngr.MngrError as exc:
                mngr.warn(f"the old instance {old} of {record.name} is still there, stopped "
                          f"(terminate it by hand: aws ec2 terminate-instances --instance-ids {old}): "
                          f"{exc.line()}")
        return started

    def _key_name(self, host_id: str) -> str:
        return str(self.conf["key_name"]) if self.conf.get("key_name") else f"mngr-{host_id}"


def _newest_live(inst) -> tuple:
    """Sort key among one host's instances: the newest launch wins, but never one
    shutting down over one that is not."""
    return inst.get("State", {}).get("Name") != "shutting-down", inst.get("LaunchTime", "")


def _epoch(text):
    """EC2's ISO timestamps (2026-12-03T19:18:50.000Z or +00:00) to epoch seconds."""
    if not text:
        return None
    from datetime import datetime, timezone

    try:
        stamp = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()
