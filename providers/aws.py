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
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import mngr

from .remote import one_at_a_time
from .ssh import Machine, SshPlan, SshProvider

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
RETRIES = 3


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
        super().__init__(name, conf, ctx)
        self.region = str(conf.get("region") or ctx.env.get("AWS_REGION")
                          or ctx.env.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.profile = str(conf.get("profile") or "")
        self.endpoint = str(conf.get("endpoint_url") or "")
        self.ready_timeout = float(conf.get("ready_timeout", 300))
        self.calls = 0

    def machines(self) -> dict:
        return {}

    # Calling aws -----------------------------------------------------------------

    def aws(self, *args, timeout=None):
        """One `aws ec2` call, as JSON. Throttling and an endpoint that does not answer
        are retried with backoff, then exit 75; refused credentials and quotas say so."""
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
                time.sleep(0.5 * 2 ** (attempt - 1))
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
                older, latest[host_id] = sorted([latest[host_id], inst], key=lambda i: i.get("LaunchTime", ""))
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
                 "started": launched if status == "running" else None,
                 "created": record.created_at if record else launched}
        if status == "running" and record is not None:
            facts["machine"] = self._machine(record, inst, store)
        return facts

    def _machine(self, record, inst, store, fresh_key: bool = False) -> Machine:
        """How to reach a host's instance: the address override, else its public or
        private address; its own known_hosts file, learnt on first contact."""
        override = str(self.conf.get("address_override") or "")
        if override:
            address, _, port = override.rpartition(":") if ":" in override else (override, "", "22")
        else:
            address, port = inst.get("PublicIpAddress") or inst.get("PrivateIpAddress") or "", "22"
        if not address:
            raise mngr.UnreachableError(f"instance {inst['InstanceId']} of {record.name} has no address yet",
                                        "wait for it, or set address_override")
        def setting(key, default):  # "{host}" in a setting is the host's name
            return str(self.conf.get(key) or default).replace("{host}", record.name)
        return Machine(name=record.name, address=address, port=int(port),
                       user=setting("ssh_user", "admin"), identity=self._identity(record.id),
                       tmux_socket=setting("tmux_socket", mngr.DEFAULT_ROOT_NAME),
                       host_dir=setting("host_dir", "~/.mngr-host"),
                       work_root=setting("work_root", "~/mngr-work"),
                       allow_shutdown=True, shutdown_command=setting("shutdown_command", ""),
                       proxy_jump=str(self.conf.get("ssh_proxy_jump") or ""), source="aws",
                       known_hosts=str(store.host_dir.root / "known_hosts"))

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
        obs = super().observe(host, now)
        status = host.facts.get("status")
        if obs.state != "failed" and status == "pending":
            obs = replace(obs, state="starting")
        elif obs.state != "failed" and status == "stopping":
            obs = replace(obs, state="stopping")
        return obs

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
            mngr.warn(f"could not delete key pair mngr-{host_id}: {exc.line()}")
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
        return self.aws(*argv, timeout=120)["Instances"][0]["InstanceId"]

    def _ready(self, record, instance_id: str, store) -> Machine:
        """Wait (bounded) for the instance to run and answer ssh; learn its host key on
        this first contact. Progress on stderr when it is a terminal."""
        deadline = time.monotonic() + self.ready_timeout
        shown = ""
        while True:
            try:
                inst = self._describe(instance_id)[0]
            except mngr.CommandFailedError as exc:  # a new instance may not be visible at once
                if "InvalidInstanceID.NotFound" not in exc.message or time.monotonic() > deadline:
                    raise
                time.sleep(2)
                continue
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
        (store.host_dir.root / "known_hosts").unlink(missing_ok=True)  # a new instance, a new key
        while True:
            try:
                self.ssh.run(machine, "true", accept_new=True, timeout=self.ssh.connect_timeout + 10)
                return machine
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

    def _boot(self, view, store, record, launch):
        """starting -> running: launch (returns the instance id), wait until it answers, send
        the records and start the agent; failed if any of it fails."""
        try:
            instance_id = launch()
            machine = self._ready(record, instance_id, store)
            running = self._set_state(store, record, "running", write=False)
            self._deploy(machine, store, start=[view.record.id], records=[running], new_host=True)
        except BaseException:
            self._set_state(store, store.read_host()[0], "failed")
            raise
        self.ctx.state_changed(record, running, self.name)
        return self._fresh_view(running, view.record, {"id": instance_id, "status": "running",
                                                       "machine": machine, "reachable": True})

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
        if host.record is None:
            self.aws("stop-instances", "--instance-ids", instance_id, *(["--force"] if kill_all else []))
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
        self.aws("stop-instances", "--instance-ids", instance_id, *(["--force"] if kill_all else []))
        if record.lifecycle.state != "failed":
            self._set_state(store, record, "stopped")

    @one_at_a_time
    def mark_failed(self, host) -> None:
        store = self.store(host.record.id)
        record, _ = store.read_host()
        if host.facts.get("exists") and host.facts.get("status") != "stopped":
            self.aws("stop-instances", "--instance-ids", host.facts["id"], "--force")
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
        """A new instance from the image, under the same host id; the old one goes."""
        image = self._snapshot_image(snapshot_id)["ImageId"]
        host = view.host
        store = self.store(host.record.id)
        if host.facts.get("exists"):
            self.aws("terminate-instances", "--instance-ids", host.facts["id"])
        record, _ = store.read_host()
        record = self._set_state(store, self._now_stopped(store, record), "starting")
        return self._boot(view, store, record,
                          lambda: self._run_instance(record, image, self._key_name(record.id)))

    def _key_name(self, host_id: str) -> str:
        return str(self.conf["key_name"]) if self.conf.get("key_name") else f"mngr-{host_id}"


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
