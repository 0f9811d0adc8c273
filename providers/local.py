"""The local provider: this machine as a host that is always running.

Agents are tmux sessions on mngr's own tmux socket. The host cannot be
stopped or destroyed; its agents can. The local host is trusted (DESIGN 1).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mngr


@dataclass(frozen=True)
class AgentPlan:
    """Everything create needs, resolved and checked before anything is made."""

    name: str
    agent_type: str
    command: str
    work_mode: str
    source_dir: Path
    target: Path | None
    branch: str
    base_branch: str
    env: dict
    start_on_boot: bool = False
    args: object = None
    permissions: tuple = ()


class LocalProvider:
    backend = "local"

    def __init__(self, name: str, conf: dict, ctx):
        self.name = name
        self.conf = conf
        self.ctx = ctx
        self.host_dir = mngr.HostDir(ctx.env.get(mngr.ENV_HOST_DIR) or mngr.user_dir(ctx.env))
        self.tmux = mngr.Tmux(ctx.tmux_socket)

    # Reading ---------------------------------------------------------------

    def store(self) -> mngr.Store:
        return mngr.Store(self.host_dir, self.ctx.keyring, self.ctx.versions)

    def collect(self) -> list:
        """The local host and its agents: file reads plus one tmux call."""
        if not self.host_dir.data.exists():
            return []
        store = self.store()
        record, verification = store.read_host()
        host = mngr.HostView(self, record, verification)
        agent_ids = record.agents if record else self._agent_dirs()
        panes = self.tmux.panes() if agent_ids else {}
        for agent_id in agent_ids:
            agent, agent_check = store.read_agent(agent_id)
            if agent is None or (record and agent.host_id != record.id):
                host.problems.append(f"agent {agent_id}: {agent_check.reason or 'wrong host'}")
                continue
            host.agents.append(self._view(host, agent, agent_check, panes))
        return [host]

    def refresh(self, host):
        """The same host collected again, right before acting; None if it vanished."""
        for fresh in self.collect():
            if host.record is None or (fresh.record and fresh.record.id == host.record.id):
                return fresh
        return None

    def default_policy(self) -> mngr.IdlePolicy:
        return mngr.default_policy(self.ctx.settings, self.name, trusted=True)

    def observe(self, host, now: float) -> mngr.Observation:
        """Certified: the process table (tmux) and /proc/stat. The local host is
        trusted, so its reported activity files count too when the policy says so."""
        running = any(a.state in ("running", "replaced") for a in host.agents)
        record = host.record
        reported = []
        for agent in host.agents:
            if agent.started_at is not None:  # read once, when the agent was collected
                reported.append(("start", agent.started_at))
            output = mngr.mtime(self.host_dir.agent_dir(agent.record.id) / "logs" / "output.log")
            if output is not None:
                reported.append(("agent", output))
        for source in ("user", "agent", "ssh"):
            stamp = mngr.mtime(self.host_dir.activity / source)
            if stamp is not None:
                reported.append((source, stamp))
        lock = mngr.deploy_lock_since(self.host_dir)
        created = [a.record.created_at for a in host.agents]
        return mngr.Observation(
            exists=True, running=running,
            state=mngr.derive_state(True, running, record.lifecycle.state if record else "running"),
            state_since=record.lifecycle.since if record else now,
            verify_error=host.verify_error,
            certified_created_at=None,
            certified_boot_time=mngr.boot_time(),
            signed_created_at=max(created) if created else None,
            process_alive=running,
            reported=tuple(sorted(reported)),
            deploy_lock_since=lock)

    def _agent_dirs(self) -> list:
        try:
            return sorted(p.name for p in self.host_dir.agents.iterdir() if mngr.is_id(p.name))
        except FileNotFoundError:
            return []

    def _view(self, host, agent, verification, panes):
        pane = panes.get(agent.session, False)
        status = mngr.read_status(self.host_dir.agent_dir(agent.id))
        state = mngr.agent_state(status.get("pane_pid", 0), pane)
        started = status.get("started_at")
        return mngr.AgentView(agent, host, state, verification,
                              exit_status=pane.dead_status if pane and pane.dead else None,
                              attached=bool(pane and pane.attached),
                              started_at=float(started) if isinstance(started, (int, float)) else None)

    def _refresh(self, view):
        host = self.collect()[0]
        for agent in host.agents:
            if agent.record.id == view.record.id:
                return agent
        raise mngr.NotFoundError(f"agent {view.record.name} vanished")

    # Creating --------------------------------------------------------------

    def plan_agent(self, args, name) -> AgentPlan:
        for flag in ("image", "dockerfile", "build_arg", "start_arg", "cpus", "memory", "pull",
                     "exclude", "snapshot", "mount"):
            if getattr(args, flag):
                raise mngr.UsageError(f"--{flag.replace('_', '-')} is for container hosts, "
                                      "not the local host", "use --in docker, or drop it")
        name, agent_type, command, env, permissions = mngr.agent_basics(self.ctx, args, name)
        source = Path(args.source or self.ctx.cwd).resolve()
        if not source.is_dir():
            raise mngr.UsageError(f"source dir {source} does not exist", "give an existing --source DIR")
        top = mngr.git_toplevel(source) if shutil.which("git") else None
        mode = args.work_mode or ("worktree" if top else "in_place")
        branch = base = ""
        target = Path(args.target).resolve() if args.target else None
        if mode == "in_place" and target:
            raise mngr.UsageError("--target makes no sense with --in-place", "drop one of them")
        if mode == "worktree":
            if top is None:
                raise mngr.UsageError(f"{source} is not in a git repository",
                                      "use --copy or --in-place, or run git init")
            branch = args.new_branch or f"mngr/{name}"
            if mngr.git(top, "check-ref-format", "--branch", branch, check=False).returncode:
                raise mngr.UsageError(f"bad branch name {branch!r}", "give another --new-branch")
            if mngr.git(top, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}",
                        check=False).returncode == 0:
                raise mngr.RefusedError(f"branch {branch} already exists",
                                        f"pick another with --new-branch, or delete it: git branch -D {branch}")
            base = args.base_branch or "HEAD"
            if mngr.git(top, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}",
                        check=False).returncode:
                raise mngr.UsageError(f"no commit {base!r} in {top}",
                                      "give an existing --base-branch, or make a first commit")
            source = top
        elif args.base_branch or args.new_branch:
            raise mngr.UsageError("--base-branch and --new-branch need --worktree")
        if target is not None and target.exists():
            raise mngr.RefusedError(f"target {target} already exists", "give a new --target DIR")
        mngr.apply_policy_flags(self.default_policy(), args)  # refuse bad policy flags now
        return AgentPlan(name, agent_type, command, mode, source, target, branch, base, env,
                         bool(args.start_on_boot), args, permissions)

    def create_agent(self, plan: AgentPlan, host=None):
        mngr.run(["tmux", "-V"], what="tmux")  # fail early and clearly when tmux is missing
        python = self._host_python()
        undo = []
        try:
            with self._deploying(), mngr.FileLock(self.host_dir.lock):
                store = self.store()
                host = self._ensure_host(store)
                policy = mngr.apply_policy_flags(host.policy, plan.args)
                if policy != host.policy:
                    mngr.warn("the policy applies to the whole local host, all its agents included")
                    host = replace(host, policy=policy)
                for agent_id in host.agents:
                    other, _ = store.read_agent(agent_id)
                    if other is not None and other.name == plan.name:
                        raise mngr.RefusedError(f"an agent named {plan.name} already exists",
                                                "pick another name, or destroy it first")
                union = mngr.permission_union([host.permissions, plan.permissions])
                mngr.widening(host.name, host.permissions, bool(host.agents), union,
                              plan.args.allow_widen)
                agent_id = mngr.new_id()
                info = mngr.HostInfo(host.id, host.name, self.name, host.lifecycle.state)
                self.ctx.hook("on_before_agent_create", mngr.AgentInfo(
                    agent_id, plan.name, plan.agent_type, info))
                work_dir = self._make_work_dir(plan, agent_id, undo)
                agent_dir = self.host_dir.agent_dir(agent_id)
                mngr.agent_skeleton(agent_dir)
                undo.append(lambda: shutil.rmtree(agent_dir, ignore_errors=True))
                mngr.atomic_write(agent_dir / "env", mngr.format_env_file(plan.env), mode=0o600)
                now = time.time()
                record = mngr.AgentRecord(
                    id=agent_id, name=plan.name, host_id=host.id, agent_type=plan.agent_type,
                    command=plan.command, session=self.ctx.prefix + plan.name,
                    work_dir=str(work_dir), work_mode=plan.work_mode, branch=plan.branch,
                    source_dir=str(plan.source_dir), start_on_boot=plan.start_on_boot,
                    created_at=now, permissions=plan.permissions)
                store.write_agent(record)
                new_host = replace(host, agents=host.agents + (agent_id,), permissions=union,
                                   version=store.next_version(host.id, host.version))
                store.write_host(new_host)
                undo.append(lambda: self._forget_agent(agent_id))
                self._start_session(record, python)
                undo.append(lambda: self.tmux.kill(record.session))
                store.versions.save()
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        self._ensure_watcher(python)
        mngr.append_jsonl(self.host_dir.events / "mngr.jsonl",
                          {"at": now, "event": "agent_created", "agent": plan.name, "id": agent_id})
        view = self._refresh(mngr.AgentView(record, None, "running", mngr.Verification(True)))
        # after the fact: a plugin failing here leaves the agent there, and says so
        self.ctx.hook("on_after_agent_create", mngr.agent_info(record, info, view.state))
        return view

    def _ensure_host(self, store) -> mngr.HostRecord:
        record, verification = store.read_host()
        if record is not None:
            return record
        if verification.reason != "missing":
            raise mngr.TamperedStateError(
                f"the local host record {self.host_dir.data} fails verification: {verification.reason}",
                "inspect it; move it aside to start afresh")
        self.host_dir.skeleton()
        now = time.time()
        record = mngr.HostRecord(id=mngr.new_id(), name="local", provider=self.name,
                                 lifecycle=mngr.Lifecycle("running", now),
                                 policy=self.default_policy(), created_at=now)
        self.ctx.hook("on_before_host_create", mngr.host_info(record, self.name))
        store.write_host(record)
        self.ctx.state_changed(None, record, self.name)
        self.ctx.hook("on_after_host_create", mngr.host_info(record, self.name))
        return record

    def _make_work_dir(self, plan: AgentPlan, agent_id: str, undo) -> Path:
        if plan.work_mode == "in_place":
            return plan.source_dir
        target = plan.target or self.host_dir.work / f"{plan.name}-{agent_id[:8]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if plan.work_mode == "copy":
            undo.append(lambda: shutil.rmtree(target, ignore_errors=True))
            shutil.copytree(plan.source_dir, target, symlinks=True)
            return target
        if mngr.git_is_dirty(plan.source_dir):
            mngr.warn(f"{plan.source_dir} has uncommitted changes; the worktree starts from "
                      f"{plan.base_branch} without them")
        mngr.git(plan.source_dir, "worktree", "add", "-q", "-b", plan.branch, str(target),
                 plan.base_branch)

        def remove_worktree():
            mngr.git(plan.source_dir, "worktree", "remove", "--force", str(target), check=False)
            mngr.git(plan.source_dir, "branch", "-D", plan.branch, check=False)
        undo.append(remove_worktree)
        return target

    def _session_env(self, record: mngr.AgentRecord) -> dict:
        return mngr.session_env(self.host_dir, record)

    def _start_session(self, record: mngr.AgentRecord, python: str) -> None:
        mngr.start_agent_session(self.host_dir, record, self.tmux, python, self.ctx.env)

    # The host's python, the copied-in mngr.py, the watcher, the deploy lock ---

    def _host_path(self) -> str:
        host_env = mngr.read_env_file(self.host_dir.env)
        return host_env.get("PATH") or self.ctx.env.get("PATH", os.defpath)

    def _host_python(self) -> str:
        """python3 (3.9+) as the host's PATH finds it; refuses clearly before anything is made."""
        python = shutil.which("python3", path=self._host_path())
        need = "the host needs python3 3.9 or newer on its PATH for mngr's idle watcher"
        if python is None:
            raise mngr.RefusedError(f"no python3 on the host's PATH ({self._host_path()})",
                                    f"{need}; install it, or fix PATH in {self.host_dir.env}")
        probe = mngr.run([python, "-I", "-S", "-c",
                          f"import sys; sys.exit(0 if sys.version_info >= (3, 9) else {mngr.EXIT_NO_PYTHON})"],
                         check=False, what="python3 probe")
        if probe.returncode:
            raise mngr.RefusedError(f"{python} is too old or broken (exit {probe.returncode})", need)
        return python

    def _copy_in(self) -> Path:
        """Put this very mngr.py in the host dir, unless the same bytes are there."""
        source = Path(mngr.__file__).resolve().read_bytes()
        target = self.host_dir.bin / "mngr.py"
        try:
            same = hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(source).digest()
        except FileNotFoundError:
            same = False
        if not same:
            mngr.atomic_write(target, source, mode=0o755)
        return target

    def watcher_alive(self) -> bool:
        probe = mngr.FileLock(self.host_dir.root / "watcher.lock", blocking=False)
        if probe.acquire():
            probe.release()
            return False
        return True

    def _ensure_watcher(self, python: str) -> None:
        """Start the host's watcher unless one runs (its own lock keeps it to one)."""
        script = self._copy_in()
        if self.watcher_alive():
            return
        interval = mngr.parse_duration(self.ctx.setting("watch_interval", 10))
        env = {**self.ctx.env, **mngr.read_env_file(self.host_dir.env),
               mngr.ENV_HOST_DIR: str(self.host_dir.root)}
        mngr.spawn([*mngr.host_python(python, script.parent), "watch", "--tmux-socket", self.tmux.socket,
                    "--interval", interval, "--on-stop", "agents"],
                   log_path=self.host_dir.logs / "watcher.log", env=env, cwd=self.host_dir.root)

    @contextlib.contextmanager
    def _deploying(self):
        """Hold the deploy lock while changing the host: a file in deploy_lock/.

        The watcher takes the lock by removing the empty dir, so a missing dir
        while a watcher runs means it is stopping the host right now."""
        lock = self.host_dir.deploy_lock
        busy = mngr.RefusedError("the host's idle watcher is stopping it right now",
                                 "try again in a few seconds")
        if not lock.is_dir():
            if self.watcher_alive():
                raise busy
            lock.mkdir(parents=True, exist_ok=True)
        stamp = lock / f"{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileNotFoundError:
            raise busy from None
        try:
            yield
        finally:
            try:
                stamp.unlink()
            except FileNotFoundError:
                pass

    # Acting on agents ------------------------------------------------------

    def start_agent(self, view):
        if view.state == "replaced":
            raise mngr.RefusedError(f"{view.record.name}'s session runs another program",
                                    f"stop it first: mngr stop {view.record.name}")
        python = self._host_python()
        with self._deploying():
            if view.state == "done":
                self.tmux.kill(view.record.session)
            self._start_session(view.record, python)
        self._ensure_watcher(python)
        return self._refresh(view)

    def start_from_snapshot(self, view, snapshot: str):
        raise mngr.RefusedError("the local host has no snapshots")

    def snapshot_create(self, host):
        raise mngr.RefusedError("the local host has no snapshots", "snapshots are for container hosts")

    def stop_agent(self, view, snapshot_mode: str = "auto") -> None:
        if snapshot_mode == "always":
            raise mngr.RefusedError("the local host has no snapshots", "drop --snapshot-mode always")
        self.tmux.kill(view.record.session)
        agent_dir = self.host_dir.agent_dir(view.record.id)
        mngr.append_jsonl(agent_dir / "events" / "events.jsonl",
                          {"at": time.time(), "event": "stopped"})

    def send_message(self, view, text: str) -> None:
        self.tmux.send(view.record.session, text)

    def output(self, view, lines: int) -> str:
        if view.state != "stopped":
            return self.tmux.capture(view.record.session, lines)
        log = self.host_dir.agent_dir(view.record.id) / "logs" / "output.log"
        try:
            data = log.read_bytes()[-lines * 400:]
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:]) + "\n"

    def exec_in(self, view, shell_command: str, timeout) -> int:
        env = dict(self.ctx.env)
        env.update(self._session_env(view.record))
        result = mngr.run(["sh", "-c", shell_command], cwd=view.record.work_dir, env=env,
                          capture=False, check=False, timeout=timeout,
                          what=f"exec in {view.record.name}")
        return result.returncode

    def attach(self, view) -> int:
        env = {k: v for k, v in self.ctx.env.items() if k != "TMUX"}
        if not sys.stdin.isatty():
            raise mngr.RefusedError("cannot attach: stdin is not a terminal",
                                    f"run it from a terminal: mngr connect {view.record.name}")
        attached = threading.Event()

        def mark_user_activity():  # a person is here: keep a user-mode host alive
            while not attached.wait(5.0):
                mngr.touch(self.host_dir.activity / "user")
        mngr.touch(self.host_dir.activity / "user")
        threading.Thread(target=mark_user_activity, daemon=True).start()
        try:
            return mngr.run(self.tmux.attach_argv(view.record.session), capture=False, check=False,
                            timeout=None, env=env, what="tmux attach").returncode
        finally:
            attached.set()

    def destroy_agent(self, view, remove_work: bool, discard_changes: bool) -> None:
        record = view.record
        info = mngr.agent_info(record, mngr.host_info(view.host.record, self.name), view.state)
        self.ctx.hook("on_before_agent_destroy", info)
        if remove_work and record.work_mode == "worktree" and Path(record.work_dir).is_dir() \
                and not discard_changes and mngr.git_is_dirty(Path(record.work_dir)):
            raise mngr.RefusedError(f"worktree {record.work_dir} has uncommitted changes",
                                    "commit them, or add --discard-changes")
        self.tmux.kill(record.session)
        with self._deploying(), mngr.FileLock(self.host_dir.lock):
            self._forget_agent(record.id)
        shutil.rmtree(self.host_dir.agent_dir(record.id), ignore_errors=True)
        if remove_work and record.work_mode == "worktree":
            mngr.git(record.source_dir, "worktree", "remove", "--force", record.work_dir, check=False)
            mngr.git(record.source_dir, "branch", "-D", record.branch, check=False)
        elif remove_work and record.work_mode == "copy":
            shutil.rmtree(record.work_dir, ignore_errors=True)
        mngr.append_jsonl(self.host_dir.events / "mngr.jsonl",
                          {"at": time.time(), "event": "agent_destroyed", "agent": record.name,
                           "id": record.id})
        self.ctx.hook("on_after_agent_destroy", info)

    def orphans(self, cutoff: float) -> list:
        """For gc: dirs under mngr's own work dir that no agent record uses any more and
        that were last changed before cutoff. Only clean git worktrees may go (their
        branches keep every commit); copies and dirty worktrees may hold work: kept."""
        try:
            entries = sorted(p for p in self.host_dir.work.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        store = self.store()
        record, _ = store.read_host()
        used = set()
        for agent_id in (record.agents if record else ()):
            agent, _ = store.read_agent(agent_id)
            if agent is not None:
                used.add(Path(agent.work_dir).resolve())
        found = []
        for path in entries:
            if path.resolve() in used or path.stat().st_mtime >= cutoff:
                continue
            row = {"kind": "worktree", "name": str(path), "path": str(path)}
            if not (path / ".git").is_file():
                found.append({**row, "kind": "copy", "keep": True, "reason": "a copy may hold work"})
            elif mngr.git_is_dirty(path):
                found.append({**row, "keep": True, "reason": "uncommitted changes"})
            else:
                found.append({**row, "reason": "no agent uses it; clean (its branch stays)"})
        return found

    def remove_orphan(self, orphan: dict) -> None:
        path = Path(orphan["path"])
        common = mngr.git(path, "rev-parse", "--path-format=absolute", "--git-common-dir").stdout.strip()
        mngr.git(Path(common).parent, "worktree", "remove", str(path))

    def _forget_agent(self, agent_id: str) -> None:
        store = self.store()
        host, _ = store.read_host()
        if host is not None and agent_id in host.agents:
            self._write_host(store, host, tuple(a for a in host.agents if a != agent_id))
        store.versions.save()

    def _write_host(self, store, host, agents) -> None:
        """The host record with these agents, its permissions their union, re-signed."""
        records = [store.read_agent(a)[0] for a in agents]
        union = mngr.permission_union([r.permissions for r in records if r is not None])
        store.write_host(replace(host, agents=agents, permissions=union,
                                 version=store.next_version(host.id, host.version)))

    # Hosts and keys --------------------------------------------------------

    def stop_host(self, host) -> None:
        """The local machine itself never stops: stopping it stops its agents, every
        session with mngr's prefix on mngr's socket (tampered records included)."""
        for session in self.tmux.panes():
            if session.startswith(self.ctx.prefix):
                self.tmux.kill(session)
        mngr.append_jsonl(self.host_dir.events / "mngr.jsonl",
                          {"at": time.time(), "event": "host_agents_stopped"})
        if host.record is not None:  # the machine runs on; as mngr sees it, the host stopped
            stopped = replace(host.record, lifecycle=mngr.Lifecycle("stopped", time.time()))
            self.ctx.state_changed(host.record, stopped, self.name)

    def mark_failed(self, host) -> None:
        raise mngr.RefusedError("the local host is always running; it cannot fail")

    force_stop_host = stop_host

    def update_policy(self, host, policy: mngr.IdlePolicy) -> None:
        with self._deploying(), mngr.FileLock(self.host_dir.lock):
            store = self.store()
            record, check = store.read_host()
            if record is None:
                raise mngr.TamperedStateError(f"local host record fails verification ({check.reason})")
            store.write_host(replace(record, policy=policy,
                                     version=store.next_version(record.id, record.version)))
            store.versions.save()

    def update_agent(self, view, **changes) -> None:
        with self._deploying(), mngr.FileLock(self.host_dir.lock):
            store = self.store()
            record, check = store.read_agent(view.record.id)
            if record is None:
                raise mngr.TamperedStateError(f"agent {view.record.name}'s record fails verification "
                                              f"({check.reason})")
            store.write_agent(replace(record, version=store.next_version(record.id, record.version),
                                      **changes))
            if "permissions" in changes:
                host, _ = store.read_host()
                self._write_host(store, host, host.agents)
            store.versions.save()

    def restart_agent(self, view):
        self.tmux.kill(view.record.session)
        return self.start_agent(replace(view, state="stopped"))

    def resign(self, keyring) -> int:
        """Re-sign the local records with the newest key; returns how many."""
        if not self.host_dir.data.exists():
            return 0
        with mngr.FileLock(self.host_dir.lock):
            old = self.store()
            host, check = old.read_host()
            if host is None:
                raise mngr.TamperedStateError(
                    f"not re-signing {self.host_dir.data}: it fails verification ({check.reason})")
            return mngr.resign_host(old, mngr.Store(self.host_dir, keyring, self.ctx.versions), host)
