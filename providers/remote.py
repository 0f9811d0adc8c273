"""What the providers whose hosts cannot be trusted share: the controller's signed
records under ~/.mngr/hosts/<host-id>/ (the truth), host reports read as
reported data and checked against them, and the one lock per host.

A backend subclasses RecordKeeper and supplies its transport: collect(),
_push() (new records into the host first, then kept here) and the actions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mngr


def one_at_a_time(method):
    """Hold the host's lock (a file in its record dir) for the call: two mngr processes
    never interleave read, sign and push on one host. Re-entrant within a process."""
    @functools.wraps(method)
    def locked(self, target, *args, **kwargs):
        host = target.host if isinstance(target, mngr.AgentView) else target
        if host.record is None or host.record.id in self._held:
            return method(self, target, *args, **kwargs)
        self._held.add(host.record.id)
        try:
            with mngr.FileLock(self.records_root / host.record.id / ".lock"):
                return method(self, target, *args, **kwargs)
        finally:
            self._held.discard(host.record.id)
    return locked


@dataclass(frozen=True)
class CopyPlan:
    """An agent to make on a host that gets a copy of its source dir."""

    name: str
    agent_type: str
    command: str
    env: dict
    source_dir: Path
    excludes: tuple
    args: object
    permissions: tuple = ()


class RecordKeeper:
    """The controller's side of hosts whose state it signs and keeps."""

    trusted_by_default = False

    def __init__(self, name: str, conf: dict, ctx):
        self.name = name
        self.conf = conf
        self.ctx = ctx
        self.records_root = mngr.user_dir(ctx.env) / "hosts"
        self.interval = mngr.parse_duration(ctx.setting("watch_interval", 10))
        self._held = set()

    def default_policy(self) -> mngr.IdlePolicy:
        return mngr.default_policy(self.ctx.settings, self.name, trusted=False)

    def _new_host(self, name: str, args, permissions, state: str = "starting"):
        """A new host's record and store: its policy from settings and the flags, announced
        to plugins (on_before_host_create) but not yet written."""
        now = time.time()
        host_id = mngr.new_id()
        record = mngr.HostRecord(id=host_id, name=name, provider=self.name,
                                 lifecycle=mngr.Lifecycle(state, now),
                                 policy=mngr.apply_policy_flags(self.default_policy(), args),
                                 created_at=now, permissions=permissions)
        self.ctx.hook("on_before_host_create", mngr.host_info(record, self.name))
        return record, self.store(host_id)

    def _begin_host(self, record, store) -> None:
        """The new host's record, written: from here on it is visible."""
        store.host_dir.skeleton()
        store.write_host(record)
        store.versions.save()
        self.ctx.state_changed(None, record, self.name)

    def _destroying(self, view):
        """The start of destroying an agent: (store, host record, host info, agent info, the
        host's other agents), with on_before_agent_destroy called."""
        store = self.store(view.host.record.id)
        record, _ = store.read_host()
        info = mngr.host_info(record, self.name)
        agent = mngr.agent_info(view.record, info, view.state)
        self.ctx.hook("on_before_agent_destroy", agent)
        return store, record, info, agent, tuple(a for a in record.agents if a != view.record.id)

    def _host_destroyed(self, record, agent) -> None:
        """The end of destroying a host with its last agent: the records go, and plugins hear."""
        import shutil

        shutil.rmtree(self.records_root / record.id, ignore_errors=True)
        self.ctx.hook("on_after_agent_destroy", agent)
        gone = replace(record, lifecycle=mngr.Lifecycle("destroyed", time.time()))
        self.ctx.state_changed(record, gone, self.name)
        self.ctx.hook("on_after_host_destroy", mngr.host_info(gone, self.name))

    def _now_stopped(self, store, record):
        """A host found not running while its record says running or stopping (its watcher
        powered it off, someone stopped it outside mngr, or a stop never finished): the
        record says stopped now, so it can be started again."""
        if record.lifecycle.state in ("running", "stopping"):
            return self._set_state(store, record, "stopped")
        return record

    def _drop_records(self, record) -> None:
        """mngr's records of a host, gone (the host with them)."""
        import shutil

        shutil.rmtree(self.records_root / record.id, ignore_errors=True)
        self.ctx.state_changed(record, replace(record, lifecycle=mngr.Lifecycle("destroyed", time.time())),
                               self.name)

    @property
    def controller(self) -> str:
        return mngr.controller_id(self.ctx.env)

    def ours(self, marked: str) -> bool:
        """A resource's controller mark is ours, or absent (made before marks existed)."""
        return not marked or marked == self.controller

    def forget_host(self, host) -> None:
        """For gc: what is left of a host with no agents, or of a resource of ours that no
        record claims: the resource (when the backend has one) and the records."""
        self._remove_resource(host)
        if host.record is not None:
            self._drop_records(host.record)

    def _remove_resource(self, host) -> None:
        """The container or instance behind a host, if the backend has one."""

    def store(self, host_id: str) -> mngr.Store:
        return mngr.Store(mngr.HostDir(self.records_root / host_id), self.ctx.keyring,
                          self.ctx.versions)

    def _records(self) -> list:
        """(store, host record) for every host of this provider instance."""
        found = []
        try:
            dirs = sorted(p for p in self.records_root.iterdir() if mngr.is_id(p.name))
        except FileNotFoundError:
            return found
        for path in dirs:
            store = self.store(path.name)
            record, _ = store.read_host()
            if record is not None and record.provider == self.name:
                found.append((store, record))
        return found

    def _set_state(self, store, record, new_state: str, write: bool = True):
        lifecycle = mngr.transition(record.lifecycle, new_state, time.time())
        new = replace(record, lifecycle=lifecycle, version=store.next_version(record.id, record.version))
        if write:
            store.write_host(new)
            store.versions.save()
            self.ctx.state_changed(record, new, self.name)
        return new

    def _view(self, store, record, facts, report, unreported="stopped"):
        """A host with a controller record, its agents' states from what it reported
        (unreported: the agents' state when it reported nothing)."""
        agents = []
        for agent_id in record.agents:
            agent, check = store.read_agent(agent_id)
            if agent is not None:
                agents.append((agent, check))
        verification = mngr.Verification(True)
        host = mngr.HostView(self, record, verification, facts=facts)
        if report and "error" in report:  # a running host that will not say: treat as tampered
            host.problems.append(f"host report: {report['error']}")
            report = None
        elif report and record.lifecycle.state in ("starting", "stopping"):
            # mngr is starting or stopping it: the host's copy of the records may lag behind
            # (a host being stopped is not sent the record that says so), and the timeouts of
            # these states bound them; its copy is checked again once it runs
            pass
        elif report:
            host.verification = mngr.verify_document(
                report.get("document"), self.ctx.keyring, "host", record.id,
                self.ctx.versions.minimum(record.id))
            for agent, _ in agents:
                seen = report.get("agents", {}).get(agent.id, {})
                check = mngr.verify_document(seen.get("document"), self.ctx.keyring, "agent",
                                             agent.id, self.ctx.versions.minimum(agent.id))
                if not check.ok:
                    host.problems.append(f"agent {agent.name}: {check.reason}")
        facts["report"] = report
        panes = (report or {}).get("panes") or {}
        for agent, check in agents:
            pane = panes.get(agent.session, False)
            if pane:
                pane = mngr.PaneInfo(**pane)
            status = ((report or {}).get("agents", {}).get(agent.id) or {}).get("status") or {}
            state = mngr.agent_state(status.get("pane_pid", 0), pane) if report else unreported
            agents_view = mngr.AgentView(agent, host, state, check,
                                         exit_status=pane.dead_status if pane and pane.dead else None,
                                         attached=bool(pane and pane.attached))
            host.agents.append(agents_view)
        return host

    def refresh(self, host):
        for fresh in self.collect():
            if host.record is not None and fresh.record and fresh.record.id == host.record.id:
                return fresh
            if host.record is None and fresh.facts.get("id") == host.facts.get("id"):
                return fresh
        return None


    def observe(self, host, now: float) -> mngr.Observation:
        facts = host.facts
        record = host.record
        policy = record.policy if record else self.default_policy()
        believe = policy.trust == "trusted" or policy.trust_reported
        report = facts.get("report") or {}
        reported = []
        for agent in host.agents:
            seen = (report.get("agents") or {}).get(agent.record.id) or {}
            started = (seen.get("status") or {}).get("started_at")
            if isinstance(started, (int, float)):
                reported.append(("start", float(started)))
            if isinstance(seen.get("output_mtime"), (int, float)):
                reported.append(("agent", float(seen["output_mtime"])))
        for pane in (report.get("panes") or {}).values():
            if pane and pane.get("window_activity"):
                reported.append(("agent", float(pane["window_activity"])))
            if pane and pane.get("client_activity"):
                reported.append(("user", float(pane["client_activity"])))
        for source, stamp in (report.get("activity") or {}).items():
            if isinstance(stamp, (int, float)):
                reported.append((source, float(stamp)))
        if report.get("ssh_open"):
            reported.append(("ssh", now))
        exists = bool(facts.get("exists"))
        running = bool(facts.get("running"))
        signed_state = record.lifecycle.state if record else "running"
        created = [a.record.created_at for a in host.agents]
        return mngr.Observation(
            exists=exists, running=running,
            state=mngr.derive_state(exists, running, signed_state),
            state_since=record.lifecycle.since if record else (facts.get("created") or now),
            verify_error=host.verify_error if running else "",
            certified_created_at=facts.get("created"),
            certified_boot_time=facts.get("started"),
            signed_created_at=max(created) if created else None,
            process_alive=believe and any(a.state == "running" for a in host.agents),
            reported=tuple(sorted(reported)),
            deploy_lock_since=report.get("deploy_lock_since"))


    def _fresh_view(self, record, agent, facts: dict):
        """The view of an agent just started, without listing everything again."""
        host = mngr.HostView(self, record, mngr.Verification(True),
                             facts={"exists": True, "running": True, **facts})
        view = mngr.AgentView(agent, host, "running", mngr.Verification(True))
        host.agents.append(view)
        return view


    def _files(self, store: mngr.Store, skeleton: bool = False, records=()) -> dict:
        """The controller's signed records (and, for a new host, mngr.py and env), as
        {path in the host dir: bytes}; records: new versions to sign and send instead."""
        root = store.host_dir
        files = {"data.json": root.data.read_bytes()}
        host = next((r for r in records if isinstance(r, mngr.HostRecord)), None)
        agent_ids = list(host.agents) if host else record_agents(root)
        for agent_id in agent_ids:
            for name in ("data.json", "env"):
                path = root.agent_dir(agent_id) / name
                if path.exists():
                    files[f"agents/{agent_id}/{name}"] = path.read_bytes()
        for record in records:
            rel = "data.json" if isinstance(record, mngr.HostRecord) else f"agents/{record.id}/data.json"
            files[rel] = (json.dumps(mngr.sign_payload(store.keyring, record.to_dict()), indent=2,
                                     sort_keys=True) + "\n").encode()
        if skeleton:
            files["bin/mngr.py"] = Path(mngr.__file__).resolve().read_bytes()
            path, code = mngr.host_bytecode()   # a host with the same python starts at once
            files[path] = code
            files["env"] = root.env.read_bytes() if root.env.exists() else b""
        return files

    def _keep(self, store: mngr.Store, records) -> None:
        """Records the host now has become the controller's truth (never before)."""
        for record in records:
            if isinstance(record, mngr.HostRecord):
                store.write_host(record)
            else:
                store.write_agent(record)
        store.versions.save()


    @one_at_a_time
    def update_policy(self, host, policy: mngr.IdlePolicy) -> None:
        store = self.store(host.record.id)
        record, _ = store.read_host()
        self._push(host, store, [replace(record, policy=policy,
                                         version=store.next_version(record.id, record.version))])

    @one_at_a_time
    def update_agent(self, view, **changes) -> None:
        store = self.store(view.host.record.id)
        agent, _ = store.read_agent(view.record.id)
        agent = replace(agent, version=store.next_version(agent.id, agent.version), **changes)
        records = [agent]
        if "permissions" in changes:
            host, _ = store.read_host()
            others = [store.read_agent(a)[0] for a in host.agents if a != agent.id]
            records.append(replace(host, version=store.next_version(host.id, host.version),
                                   permissions=mngr.permission_union(
                                       [a.permissions for a in others if a] + [agent.permissions])))
        self._push(view.host, store, records)

    def resign(self, keyring) -> int:
        """Re-sign the controller's records with the newest key, and send them in."""
        count = 0
        hosts = {h.record.id: h for h in self.collect() if h.record is not None}
        for old, record in self._records():
            new = mngr.Store(old.host_dir, keyring, self.ctx.versions)
            count += mngr.resign_host(old, new, record)
            if record.id in hosts and hosts[record.id].facts.get("exists"):
                try:
                    self._push(hosts[record.id], new)
                except mngr.MngrError as exc:  # one unreachable host does not stop the rest
                    mngr.warn(f"{record.name} keeps its old signatures until it is reachable "
                              f"(run keys rotate again then): {exc.line()}")
        return count


def _number(value, where: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} is not a number")
    return float(value)


def need_terminal(view) -> None:
    """Attaching needs a terminal: refuse, saying how, when stdin is not one."""
    import sys

    if not sys.stdin.isatty():
        raise mngr.RefusedError("cannot attach: stdin is not a terminal",
                                f"run it from a terminal: mngr connect {view.record.name}")


def clean_report(raw) -> dict:
    """A host-report as the controller will read it, every field checked; TypeError when
    anything is not of its shape (the host wrote it: it may be anything)."""
    if not isinstance(raw, dict):
        raise TypeError("not an object")
    report = {"document": raw.get("document"), "agents": {}, "panes": {}, "activity": {},
              "deploy_lock_since": _number(raw.get("deploy_lock_since"), "deploy_lock_since"),
              "ssh_open": raw.get("ssh_open") is True}
    agents, panes, activity = raw.get("agents") or {}, raw.get("panes") or {}, raw.get("activity") or {}
    if not all(isinstance(x, dict) for x in (agents, panes, activity)):
        raise TypeError("agents, panes and activity must be objects")
    for agent_id, seen in agents.items():
        if not isinstance(seen, dict) or not isinstance(seen.get("status") or {}, dict):
            raise TypeError(f"agent {agent_id!r} is not an object")
        status = seen.get("status") or {}
        report["agents"][str(agent_id)] = {
            "document": seen.get("document"),
            "status": {"pane_pid": int(_number(status.get("pane_pid"), "pane_pid") or 0),
                       "started_at": _number(status.get("started_at"), "started_at")},
            "output_mtime": _number(seen.get("output_mtime"), "output_mtime")}
    fields = {f.name for f in dataclasses.fields(mngr.PaneInfo)}
    for session, pane in panes.items():
        if pane is None:
            report["panes"][str(session)] = None
            continue
        if not isinstance(pane, dict) or set(pane) != fields:
            raise TypeError(f"pane {session!r} is not a pane")
        report["panes"][str(session)] = {
            "session": str(pane["session"]), "pane_pid": int(_number(pane["pane_pid"], "pane_pid") or 0),
            "dead": pane["dead"] is True, "attached": pane["attached"] is True,
            "dead_status": None if pane["dead_status"] is None
            else int(_number(pane["dead_status"], "dead_status")),
            "window_activity": _number(pane["window_activity"], "window_activity"),
            "client_activity": _number(pane["client_activity"], "client_activity")}
    for source in ("agent", "user", "ssh"):
        report["activity"][source] = _number(activity.get(source), source)
    return report


def record_agents(host_dir: mngr.HostDir) -> list:
    try:
        return [p.name for p in host_dir.agents.iterdir() if mngr.is_id(p.name)]
    except FileNotFoundError:
        return []
