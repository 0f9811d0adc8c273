"""The Docker provider: each host is a container; PID 1 is mngr.py host-init.

Trust: a container may run untrusted code, so its hosts default to
`trust = untrusted`. What this module believes comes from `docker inspect`
(certified) and from the signed records the controller keeps under
~/.mngr/hosts/<host-id>/; what the container says about itself (one
`host-report` exec per running host) is reported, and its copies of the
signed records are checked against the keyring.

Calls per `list`: one `docker ps -a`, one `docker inspect` for every
container, and one `docker exec` per running host, in parallel.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import mngr

from .remote import CopyPlan, RecordKeeper, clean_report, need_terminal, one_at_a_time

LABEL = "com.imbue.mngr"
HOST_DIR = "/mngr"              # the host dir inside every container
WORK_ROOT = "/work"             # agents' work dirs inside containers
SOCKET = mngr.DEFAULT_ROOT_NAME  # the tmux socket inside containers
STOP_TIMEOUT = 30               # seconds docker stop waits for PID 1's stop hooks
READY_TIMEOUT = 60.0
DEFAULT_BASE = "debian:bookworm-slim"
# what a host needs, installed only where the base image lacks it (so a base that has
# it already builds offline)
DEFAULT_DOCKERFILE = """\
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN command -v python3 >/dev/null && command -v tmux >/dev/null && command -v ps >/dev/null \\
    || { apt-get update && apt-get install -y --no-install-recommends \\
         python3 tmux procps git ca-certificates && rm -rf /var/lib/apt/lists/*; }
"""
SNAPSHOT_REPO = "mngr-snapshot"
# what the docker CLI says when it cannot reach its engine (a registry's "connection
# refused" during a build or pull is not one of these)
UNREACHABLE = ("Cannot connect to the Docker daemon", "error during connect",
               "Is the docker daemon running")


@dataclass(frozen=True)
class DockerPlan(CopyPlan):
    mounts: tuple = ()


class DockerProvider(RecordKeeper):
    backend = "docker"

    def __init__(self, name: str, conf: dict, ctx):
        super().__init__(name, conf, ctx)
        self.env = {**ctx.env, "DOCKER_BUILDKIT": "0"}  # the classic builder: works offline
        if conf.get("docker_host"):
            self.env["DOCKER_HOST"] = str(conf["docker_host"])
        if str(conf.get("docker_host", "")).startswith("ssh://"):
            # docker runs ssh itself: give it mngr's ssh options (no prompts, host keys
            # checked, a bounded connect, one control master per engine)
            from .ssh import ssh_wrapper

            wrapper = ssh_wrapper(mngr.user_dir(ctx.env), str(conf.get("ssh_identity", "")),
                                  conf.get("connect_timeout", 10))
            self.env["PATH"] = f"{wrapper}{os.pathsep}{self.env.get('PATH', os.defpath)}"
        # the network a host gets with net:egress; without it, none
        self.egress_network = str(conf.get("egress_network", "bridge"))
        timeout = conf.get("timeout", mngr.SUBPROCESS_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise mngr.ConfigError(f"settings [providers.{name}]: timeout must be a positive number")
        self.timeout = float(timeout)   # seconds for each docker call, unless it says otherwise

    # Calling docker -------------------------------------------------------

    def docker(self, *args, timeout=None, check=True, input=None, engine_stderr=True, text=True):
        """One docker call, bounded; an unreachable or hung engine is exit 75 with a clear
        message, whether or not the caller checks the exit code. engine_stderr=False: the
        call runs a host's code (docker exec), whose stderr or hang is the host's own."""
        timeout = self.timeout if timeout is None else timeout
        try:
            result = mngr.run(["docker", *args], env=self.env, timeout=timeout, check=False,
                              input=input, what=f"docker {args[0]}", text=text)
        except mngr.CommandTimedOutError:
            if not engine_stderr:
                raise
            where = self.env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            raise mngr.UnreachableError(f"the Docker engine at {where} did not answer "
                                        f"docker {args[0]} within {timeout:g}s",
                                        "is dockerd hung or overloaded? retry later") from None
        if result.returncode != 0:
            stderr = result.stderr if text else result.stderr.decode(errors="replace")
            if engine_stderr and any(line in stderr for line in UNREACHABLE):
                raise self._unreachable()
            if check:
                tail = (stderr.strip().splitlines() or [""])[-1]
                raise mngr.CommandFailedError(f"docker {args[0]} failed (exit {result.returncode})"
                                              + (f": {tail}" if tail else ""),
                                              detail=stderr, returncode=result.returncode)
        return result

    def _unreachable(self) -> mngr.UnreachableError:
        where = self.env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return mngr.UnreachableError(f"cannot reach the Docker engine at {where}: is dockerd running?",
                                     "start it, or fix docker_host in settings")

    def _exec(self, container: str, *argv, timeout=None, check=True, input=None):
        flags = ["-i"] if input is not None else []
        return self.docker("exec", *flags, "-e", f"{mngr.ENV_HOST_DIR}={HOST_DIR}", container,
                           *argv, timeout=timeout, check=check, input=input, engine_stderr=False)

    def _mngr(self, container: str, *argv, **kwargs):
        return self._exec(container, *mngr.host_python("python3", f"{HOST_DIR}/bin"), *argv, **kwargs)

    def tmux(self, container: str) -> mngr.Tmux:
        def runner(argv, **kwargs):
            kwargs.pop("what", None)
            return self._exec(container, *argv, **kwargs)
        return mngr.Tmux(SOCKET, runner)

    # The controller's records ----------------------------------------------

    def _started(self, container: str, store, record, start, fail=True):
        """starting -> running, signed, sent into the host with the agents to start; the
        controller keeps the running record only once the host has it. On failure the
        container is killed and (unless fail=False: the caller puts things back) the host
        is marked failed, with a version above anything the host may have kept."""
        running = self._set_state(store, record, "running", write=False)
        try:
            self._deploy(container, store, start=start, records=[running])
        except BaseException:
            if not fail:
                self.docker("kill", container, check=False)
                raise
            failed = replace(record, lifecycle=mngr.transition(record.lifecycle, "failed", time.time()),
                             version=running.version + 1)
            store.write_host(failed)
            store.versions.save()
            self.ctx.state_changed(record, failed, self.name)
            self.docker("kill", container, check=False)  # failed: not left running
            raise
        self.ctx.state_changed(record, running, self.name)
        return running

    # Reading -----------------------------------------------------------------

    def collect(self) -> list:
        records = self._records()
        if self.conf.get("implicit") and not records:
            return []  # the unconfigured default instance with no hosts: no docker call at all
        ids = self.docker("ps", "-a", "-q", "--no-trunc", "--filter",
                          f"label={LABEL}.provider={self.name}").stdout.split()
        inspected = self._inspect(ids)
        inspected = [c for c in inspected if self.ours(c["Config"]["Labels"].get(f"{LABEL}.controller", ""))]
        containers = {c["Config"]["Labels"].get(f"{LABEL}.host-id"): c for c in inspected}
        running = [c["Id"] for c in inspected if c["State"]["Running"]]
        with ThreadPoolExecutor(max_workers=8) as pool:
            reports = dict(zip(running, pool.map(self._report, running)))
        hosts = []
        for store, record in records:
            container = containers.pop(record.id, None)
            hosts.append(self._view(store, record, self._facts(container),
                                    reports.get(container["Id"]) if container else None))
        for host_id, container in containers.items():  # a container without our record
            missing = mngr.Verification(False, "missing")
            hosts.append(mngr.HostView(self, None, missing, facts=self._facts(container)))
        return hosts

    def _inspect(self, ids) -> list:
        """docker inspect of many containers; one removed since they were listed is
        simply not there (docker says so on stderr and exits 1)."""
        if not ids:
            return []
        result = self.docker("inspect", *ids, check=False)
        try:
            return json.loads(result.stdout)
        except ValueError:
            if "No such" in result.stderr:
                return []
            raise mngr.CommandFailedError(f"docker inspect failed: {result.stderr.strip()[-200:]}",
                                          detail=result.stderr) from None

    def _report(self, container_id: str):
        """What a running host says about itself, shape-checked; {"error": ...} otherwise.
        A host that will not report is not "unreachable": it may be hiding (fail closed)."""
        try:
            result = self._mngr(container_id, "host-report", "--tmux-socket", SOCKET, check=False)
        except mngr.MngrError as exc:
            return {"error": exc.line()}
        if result.returncode != 0:
            return {"error": (result.stderr.strip().splitlines() or ["host-report failed"])[-1][:200]}
        try:
            return clean_report(json.loads(result.stdout))
        except Exception as exc:  # the host wrote it: any failure to read it is its own
            return {"error": f"malformed: {type(exc).__name__}: {exc}"[:200]}

    @staticmethod
    def _facts(container) -> dict:
        if container is None:
            return {"exists": False}
        state = container["State"]
        return {"exists": True, "id": container["Id"], "running": bool(state["Running"]),
                "status": state["Status"], "exit_code": state.get("ExitCode"),
                "created": _epoch(container["Created"]),
                "started": _epoch(state.get("StartedAt")) if state["Running"] else None}

    # Creating ---------------------------------------------------------------

    def plan_agent(self, args, name) -> DockerPlan:
        name, agent_type, command, env, permissions = mngr.agent_basics(self.ctx, args, name,
                                                                        programs_here=False)
        mounts = []
        for item in args.mount:
            parts = item.split(":")
            if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/") \
                    or (len(parts) == 3 and parts[2] != "ro"):
                raise mngr.UsageError(f"bad --mount {item!r}", "use /host/path:/container/path[:ro]")
            read_only = len(parts) == 3
            if not mngr.mount_allowed(permissions, parts[0], read_only):
                raise mngr.RefusedError(f"--mount {item} needs a grant",
                                        f"add --grant fs:mount:{parts[0]}" + (":ro" if read_only else ""))
            mounts.append(item)
        source = Path(args.source or self.ctx.cwd).resolve()
        if not source.is_dir():
            raise mngr.UsageError(f"source dir {source} does not exist", "give an existing --source DIR")
        if args.work_mode in ("in_place", "worktree") or args.target or args.base_branch \
                or args.new_branch:
            raise mngr.UsageError("a container host gets a copy of the source dir",
                                  "drop --in-place/--worktree/--target/--base-branch/--new-branch")
        if args.dockerfile and args.image:
            raise mngr.UsageError("both --image and --dockerfile given", "use one of them")
        if args.dockerfile and not Path(args.dockerfile).is_file():
            raise mngr.UsageError(f"no Dockerfile at {args.dockerfile}")
        mngr.apply_policy_flags(self.default_policy(), args)
        return DockerPlan(name, agent_type, command, env, source, tuple(args.exclude), args,
                          permissions, tuple(mounts))

    def create_agent(self, plan: DockerPlan, host=None):
        args = plan.args
        if host is not None:
            return self._add_agent(plan, host)
        for store, record in self._records():
            if record.name == plan.name:
                raise mngr.RefusedError(f"a docker host named {plan.name} already exists",
                                        f"pick another name, or add to it: --host {plan.name}")
        building = not args.snapshot and (bool(args.dockerfile)
                                          or not (args.image or self.conf.get("image")))
        record, store = self._new_host(plan.name, args, plan.permissions,
                                       "building" if building else "starting")
        host_id, now = record.id, record.created_at
        self._begin_host(record, store)
        container = ""
        try:
            # the agent is recorded before anything slow, so a failed build lists as failed
            agent = self._agent_record(plan, host_id, now)
            self.ctx.hook("on_before_agent_create",
                          mngr.agent_info(agent, mngr.host_info(record, self.name)))
            store.write_agent(agent)
            mngr.atomic_write(store.host_dir.agent_dir(agent.id) / "env",
                              mngr.format_env_file(plan.env), mode=0o600)
            record = replace(record, agents=(agent.id,),
                             version=store.next_version(host_id, record.version))
            store.write_host(record)
            if args.snapshot:
                image = self._snapshot_image(args.snapshot)
            else:
                image = self._image(plan, host_id) if building else (args.image or self.conf["image"])
            if building:
                record = self._set_state(store, record, "starting")
            if args.pull:
                self._require_image(image, pull=True)
            container = self._create_container(record, image, args, plan.mounts)
            self._cp_in(container, self._files(store, skeleton=True), work=plan)
            self.docker("start", container)
            # the host exists now: a plugin failing here leaves it failed, not invisible
            self.ctx.hook("on_after_host_create", mngr.host_info(record, self.name))
            record = self._started(container, store, record, [agent.id])
        except BaseException as exc:
            current, _ = store.read_host()
            if current is not None and "failed" in mngr.HOST_TRANSITIONS[current.lifecycle.state]:
                self._set_state(store, current, "failed")
            if container:  # kept for a look and for destroy, but not left running
                self.docker("kill", container, check=False)
            if isinstance(exc, mngr.MngrError):
                exc.hint = exc.hint or f"the host shows as failed; remove it: mngr destroy -f {plan.name}"
            raise
        store.versions.save()
        view = self._fresh_view(record, agent, {"id": container})
        self.ctx.hook("on_after_agent_create", mngr.agent_info(agent, mngr.host_info(record, self.name),
                                                               view.state))
        return view

    def _agent_record(self, plan: DockerPlan, host_id: str, now: float) -> mngr.AgentRecord:
        return mngr.AgentRecord(
            id=mngr.new_id(), name=plan.name, host_id=host_id, agent_type=plan.agent_type,
            command=plan.command, session=self.ctx.prefix + plan.name,
            work_dir=f"{WORK_ROOT}/{plan.name}", work_mode="copy", source_dir=str(plan.source_dir),
            start_on_boot=bool(plan.args.start_on_boot), created_at=now,
            permissions=plan.permissions)

    def _add_agent(self, plan: DockerPlan, host):
        return self._add_agent_locked(host, plan)

    @one_at_a_time
    def _add_agent_locked(self, host, plan: DockerPlan):
        fresh, _ = self.store(host.record.id).read_host()  # as it is now, under the lock
        host.record = fresh or host.record
        if not host.facts.get("running"):
            raise mngr.RefusedError(f"host {host.name} is not running",
                                    f"start one of its agents first: mngr start {host.agents[0].record.name}"
                                    if host.agents else "start it first")
        if any(a.record.name == plan.name for a in host.agents):
            raise mngr.RefusedError(f"host {host.name} already has an agent named {plan.name}")
        if plan.mounts:
            raise mngr.RefusedError("--mount applies when a host is made", "make a new host for it")
        union = mngr.permission_union([host.record.permissions, plan.permissions])
        mngr.widening(host.name, host.record.permissions, bool(host.agents), union,
                      plan.args.allow_widen)
        if mngr.grants(union, "net", "egress") and not mngr.grants(host.record.permissions, "net", "egress"):
            mngr.warn(f"{host.name} gets a network only when its container is re-made "
                      "(snapshot create, then start --snapshot)")
        store = self.store(host.record.id)
        container = host.facts["id"]
        agent = self._agent_record(plan, host.record.id, time.time())
        info = mngr.host_info(host.record, self.name)
        self.ctx.hook("on_before_agent_create", mngr.agent_info(agent, info))
        mngr.atomic_write(store.host_dir.agent_dir(agent.id) / "env",
                          mngr.format_env_file(plan.env), mode=0o600)
        record = replace(host.record, agents=host.record.agents + (agent.id,), permissions=union,
                         policy=mngr.apply_policy_flags(host.record.policy, plan.args),
                         version=store.next_version(host.record.id, host.record.version))
        self._cp_in(container, {}, work=plan)
        try:  # the host gets the records first; the controller keeps them once it has
            self._deploy(container, store, start=[agent.id], records=[agent, record])
        except BaseException:
            shutil.rmtree(store.host_dir.agent_dir(agent.id), ignore_errors=True)
            raise
        view = self._fresh_view(record, agent, {"id": container})
        self.ctx.hook("on_after_agent_create", mngr.agent_info(agent, info, view.state))
        return view

    def _image(self, plan: DockerPlan, host_id: str) -> str:
        """Build the host's image: from --dockerfile (tagged as this host's, so destroy
        removes it), or the embedded default (shared, kept). Without --pull, every base
        image must be here already: docker build would otherwise pull it."""
        args = plan.args
        build_args = dict(item.partition("=")[::2] for item in args.build_arg)
        if args.dockerfile:
            tag = f"mngr-build:{host_id}"
            path = Path(args.dockerfile).resolve()
            argv = ["build", "-t", tag, "-f", str(path),
                    "--label", f"{LABEL}.built-for={host_id}",
                    "--label", f"{LABEL}.build-provider={self.name}"]
            context = str(path.parent)
            bases = dockerfile_bases(path.read_text(errors="replace"), build_args)
        else:
            base = str(self.conf.get("base_image") or DEFAULT_BASE)
            tag = f"mngr-default:{mngr.__version__}" + (
                "" if base == DEFAULT_BASE else "-" + hashlib.sha256(base.encode()).hexdigest()[:8])
            if self.docker("image", "inspect", tag, check=False).returncode == 0:
                return tag
            argv = ["build", "-t", tag, "--build-arg", f"BASE={base}",
                    "--label", f"{LABEL}.build-provider={self.name}", "-"]
            context = None
            bases = [base]
        for item in args.build_arg:
            argv += ["--build-arg", item]
        if args.pull:
            argv.append("--pull")
        else:
            for base in bases:
                if self.docker("image", "inspect", base, check=False).returncode != 0:
                    raise mngr.RefusedError(f"base image {base} is not available locally",
                                            "load or build it, or pass --pull to let docker pull it")
        if context:
            argv.append(context)
        result = self.docker(*argv, timeout=1800, check=False,
                             input=None if context else DEFAULT_DOCKERFILE)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["docker build failed"])[-1]
            raise mngr.CommandFailedError(f"building the image failed: {tail}",
                                          "fix the Dockerfile, then destroy this host and "
                                          "create it again", detail=result.stderr)
        return tag

    def _require_image(self, image: str, pull: bool) -> None:
        if self.docker("image", "inspect", image, check=False).returncode == 0:
            return
        if not pull:
            raise mngr.RefusedError(f"image {image} is not available locally",
                                    "build or load it, or pass --pull to let docker pull it")
        self.docker("pull", image, timeout=1800)

    def _create_container(self, record: mngr.HostRecord, image: str, args, mounts=()) -> str:
        options = {"cpus": args.cpus, "memory": args.memory, "start_args": list(args.start_arg),
                   "mounts": list(mounts)}  # so a container re-made from a snapshot gets them too
        labels = {"host-id": record.id, "host-name": record.name, "provider": self.name,
                  "created-at": str(int(record.created_at)), "version": mngr.__version__,
                  "controller": self.controller, "create-options": json.dumps(options)}
        argv = ["create", "--pull", "missing" if getattr(args, "pull", False) else "never",
                "--name", f"mngr-{record.name}", "--hostname", record.name,
                "--network", self.egress_network if mngr.grants(record.permissions, "net", "egress")
                else "none", "-e", f"{mngr.ENV_HOST_DIR}={HOST_DIR}"]
        for mount in mounts:
            argv += ["-v", mount]
        for key, value in labels.items():
            argv += ["--label", f"{LABEL}.{key}={value}"]
        for key, value in sorted((self.conf.get("labels") or {}).items()):
            argv += ["--label", f"{key}={value}"]
        if args.cpus:
            argv += ["--cpus", str(args.cpus)]
        if args.memory:
            argv += ["--memory", str(args.memory)]
        for item in args.start_arg:
            argv += shlex.split(item)
        init = (f"command -v python3 >/dev/null 2>&1 || exit {mngr.EXIT_INIT_NO_PYTHON}; "
                f"python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' "
                f"|| exit {mngr.EXIT_INIT_OLD_PYTHON}; "
                f"command -v tmux >/dev/null 2>&1 || exit {mngr.EXIT_INIT_NO_TMUX}; "
                f"exec {' '.join(shlex.quote(a) for a in mngr.host_python('python3', HOST_DIR + '/bin'))} "
                f"host-init --tmux-socket {SOCKET} "
                f"--interval {self.interval}")
        argv += ["--entrypoint", "sh", image, "-c", init]
        result = self.docker(*argv, check=False)
        if result.returncode != 0:
            if "No such image" in result.stderr or "pull access denied" in result.stderr \
                    or "Unable to find image" in result.stderr:
                raise mngr.RefusedError(f"image {image} is not available locally",
                                        "build or load it, or pass --pull to let docker pull it")
            if "Conflict" in result.stderr and "already in use" in result.stderr:
                raise mngr.RefusedError(f"a container named mngr-{record.name} already exists",
                                        "pick another name, or remove that container")
            tail = (result.stderr.strip().splitlines() or ["docker create failed"])[-1]
            raise mngr.CommandFailedError(f"docker create failed: {tail}", detail=result.stderr)
        return result.stdout.strip()

    def _cp_in(self, container: str, files: dict, work=None) -> None:
        """Files for the host dir, and a plan's work dir, in one tar stream through docker cp
        (works before the container starts; not atomic, so only for hosts not running)."""
        stream = io.BytesIO()
        with tarfile.open(fileobj=stream, mode="w") as tar:
            dirs = set()
            if files:
                dirs |= {"mngr"} | {f"mngr/{d}" for d in (
                    "activity", "agents", "bin", "events", "logs", "hooks", "hooks/boot",
                    "hooks/post_services", "hooks/stop", "deploy_lock")}
            for rel in files:
                parts = rel.split("/")[:-1]
                dirs |= {"mngr/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)}
            if work is not None:
                dirs.add(WORK_ROOT.strip("/"))
            for name in sorted(dirs):
                tar.addfile(_dir_entry(name))
            for rel, content in files.items():
                info = tarfile.TarInfo(f"mngr/{rel}")
                info.size, info.mtime = len(content), time.time()
                info.mode = 0o755 if rel == "bin/mngr.py" else 0o600 if rel.endswith("env") else 0o644
                tar.addfile(info, io.BytesIO(content))
            if work is not None:
                def keep(info):
                    rel = info.name.split("/", 2)[2] if info.name.count("/") >= 2 else ""
                    if rel and any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p)
                                   for p in work.excludes):
                        return None
                    return info
                tar.add(work.source_dir, arcname=f"{WORK_ROOT.strip('/')}/{work.name}", filter=keep)
        self.docker("cp", "-", f"{container}:/", input=stream.getvalue(), timeout=600)

    def _deploy(self, container: str, store: mngr.Store, start=(), records=()) -> None:
        """One exec into a running host: write the signed records atomically (the watcher
        and enforce may be reading them) and start agents. A PID 1 that has exited is
        explained by its sentinel code."""
        stream = io.BytesIO()
        with tarfile.open(fileobj=stream, mode="w") as tar:
            for rel, content in self._files(store, records=records).items():
                info = tarfile.TarInfo(rel)
                info.size, info.mtime = len(content), time.time()
                info.mode = 0o600 if rel.endswith("env") else 0o644
                tar.addfile(info, io.BytesIO(content))
        argv = ["deploy", "--tmux-socket", SOCKET]
        for agent_id in start:
            argv += ["--start", agent_id]
        result = self._mngr(container, *argv, input=stream.getvalue(), check=False, timeout=60)
        if result.returncode == 0:
            self._keep(store, records)
            return
        state = json.loads(self.docker("inspect", "-f", "{{json .State}}", container).stdout)
        if not state["Running"]:
            code = state.get("ExitCode")
            reason = mngr.INIT_EXIT_REASONS.get(code, f"its PID 1 exited with code {code}")
            raise mngr.RefusedError(f"the host did not start: {reason}",
                                    "use an image with python3 (3.9+) and tmux, e.g. "
                                    "apt-get install python3 tmux in its Dockerfile")
        tail = (result.stderr.strip().splitlines() or ["deploy failed"])[-1]
        raise mngr.CommandFailedError(f"deploying to host failed: {tail}", detail=result.stderr)

    # Acting on agents and hosts ---------------------------------------------

    def _container(self, view) -> str:
        host = view.host if isinstance(view, mngr.AgentView) else view
        if not host.facts.get("exists"):
            raise mngr.RefusedError(f"host {host.name}'s container is gone",
                                    f"remove what is left: mngr destroy -f {view.record.name}"
                                    if isinstance(view, mngr.AgentView) else "destroy it")
        return host.facts["id"]

    @one_at_a_time
    def start_agent(self, view):
        container = self._container(view)
        store = self.store(view.host.record.id)
        if view.host.facts.get("running"):  # deploy restarts the session: one exec, not two
            self._deploy(container, store, start=[view.record.id])
            record = view.host.record
        else:  # boot the host; the watcher comes back with PID 1
            record, _ = store.read_host()
            record = self._now_stopped(store, record)
            record = self._set_state(store, record, "starting")
            self._cp_in(container, self._files(store))
            try:
                self.docker("start", container)
            except mngr.MngrError:
                self._set_state(store, record, "failed")
                raise
            record = self._started(container, store, record, [view.record.id])
        return self._fresh_view(record, view.record, {"id": container})

    def restart_agent(self, view):
        """With its records re-sent: a changed env or permission set takes effect."""
        return self.start_agent(view)

    def stop_agent(self, view, snapshot_mode: str = "auto") -> None:
        container = self._container(view)
        others = [a for a in view.host.agents if a.record.id != view.record.id and a.state == "running"]
        if not others and view.host.facts.get("running"):
            # its last running agent: stop the container, stop paying. A container keeps its
            # disk when stopped, so "auto" takes no snapshot; "always" does.
            if snapshot_mode == "always":
                self.snapshot_create(view.host)
            self.stop_host(view.host)
        elif view.host.facts.get("running"):
            self.tmux(container).kill(view.record.session)

    def stop_host(self, host) -> None:
        self._stop(host, ["stop", "-t", str(STOP_TIMEOUT)])

    def force_stop_host(self, host) -> None:
        self._stop(host, ["kill"])

    @one_at_a_time
    def _stop(self, host, argv) -> None:
        if host.record is None:  # a container of ours without a record: stop it, nothing else
            self.docker(*argv, host.facts["id"], timeout=STOP_TIMEOUT + 30)
            return
        store = self.store(host.record.id)
        record, _ = store.read_host()
        if record.lifecycle.state == "failed":  # stays failed; just not running
            self.docker(*argv, host.facts["id"], timeout=STOP_TIMEOUT + 30)
            return
        if record.lifecycle.state == "running":
            record = self._set_state(store, record, "stopping")
        try:
            self.docker(*argv, host.facts["id"], timeout=STOP_TIMEOUT + 30)
        except mngr.MngrError:
            if self._running(host.facts["id"]):
                raise  # still stopping: enforce's stopping timeout forces it later
        if record.lifecycle.state != "stopped":  # it was started outside mngr: already so
            record = self._set_state(store, record, "stopped")
        self._cp_in(host.facts["id"], self._files(store))

    def _running(self, container: str) -> bool:
        state = self.docker("inspect", "-f", "{{.State.Running}}", container, check=False)
        return state.stdout.strip() == "true"

    @one_at_a_time
    def mark_failed(self, host) -> None:
        store = self.store(host.record.id)
        record, _ = store.read_host()
        if host.facts.get("exists"):
            self.docker("kill", host.facts["id"], check=False)
        self._set_state(store, record, "failed")

    # Snapshots ------------------------------------------------------------------

    def snapshot_create(self, host) -> dict:
        container = self._container(host)
        inspect = json.loads(self.docker("inspect", container).stdout)[0]
        mounts = [m.get("Destination") for m in inspect.get("Mounts") or []]
        if mounts:
            mngr.warn(f"bind mounts and volumes are not in a snapshot: {', '.join(mounts)}")
        snapshot_id = os.urandom(6).hex()
        tag = f"{SNAPSHOT_REPO}:{host.record.id}-{snapshot_id}"
        now = time.time()
        changes = []
        for key, value in (("snapshot-id", snapshot_id), ("snapshot-of", host.record.id),
                           ("snapshot-host-name", host.record.name),
                           ("snapshot-provider", self.name), ("snapshot-created", int(now)),
                           ("built-for", ""), ("build-provider", "")):  # not the build's image
            changes += ["-c", f"LABEL {LABEL}.{key}={value}"]
        self.docker("commit", *changes, container, tag, timeout=1800)
        return {"id": snapshot_id, "host": host.record.name, "host_id": host.record.id,
                "provider": self.name, "image": tag, "created_at": mngr.iso(now)}

    def _remove_resource(self, host) -> None:
        if host.facts.get("exists"):
            self.docker("rm", "-f", host.facts["id"], timeout=120)

    def snapshot_list(self) -> list:
        """This instance's snapshots, in one docker call."""
        if self.conf.get("implicit") and not self._records() and not self._has_any_snapshot():
            return []
        result = self.docker("images", "--filter", f"label={LABEL}.snapshot-provider={self.name}",
                             "--filter", f"label={LABEL}.controller={self.controller}",
                             "--format", "{{json .}}")
        names = {record.id: record.name for _, record in self._records()}
        rows = []
        for line in result.stdout.splitlines():
            image = json.loads(line)
            host_id, _, snapshot_id = image.get("Tag", "").rpartition("-")
            rows.append({"id": snapshot_id, "host": names.get(host_id, host_id), "host_id": host_id,
                         "provider": self.name, "image": f"{image['Repository']}:{image['Tag']}",
                         "created_at": image.get("CreatedAt", ""), "size": image.get("Size", ""),
                         "created": _local_epoch(image.get("CreatedAt", ""))})
        return rows

    def _has_any_snapshot(self) -> bool:
        try:
            return bool(self.docker("images", "-q", SNAPSHOT_REPO).stdout.strip())
        except mngr.MngrError:
            return False

    def _snapshot_image(self, snapshot_id: str) -> str:
        for row in self.snapshot_list():
            if row["id"] == snapshot_id:
                return row["image"]
        raise mngr.NotFoundError(f"no snapshot {snapshot_id} in provider {self.name}",
                                 "see mngr snapshot list")

    def snapshot_destroy(self, snapshot_id: str) -> None:
        result = self.docker("rmi", self._snapshot_image(snapshot_id), check=False)
        if result.returncode != 0:
            if "is using its referenced image" in result.stderr or "conflict" in result.stderr:
                raise mngr.RefusedError(f"snapshot {snapshot_id} is in use by a host's container",
                                        "destroy the hosts made from it first")
            raise mngr.CommandFailedError(f"docker rmi failed: {result.stderr.strip()}")

    @one_at_a_time
    def start_from_snapshot(self, view, snapshot_id: str):
        """Replace the host's container with one made from the snapshot, with the options
        it was made with; the host keeps its id, its records and its agents. The old
        container is kept, renamed, until the new one runs, and put back if it does not."""
        image = self._snapshot_image(snapshot_id)
        host = view.host
        store = self.store(host.record.id)
        old = host.facts["id"] if host.facts.get("exists") else ""
        options = self._create_options(old)
        if host.facts.get("running"):
            self.stop_host(host)
        record, _ = store.read_host()
        name = f"mngr-{record.name}"
        if old:
            self.docker("rename", old, f"{name}-replaced-{old[:12]}")
        record = self._set_state(store, record, "starting")
        container = ""
        try:
            container = self._create_container(record, image, options, options.mounts)
            self._cp_in(container, self._files(store, skeleton=True))
            self.docker("start", container)
            record = self._started(container, store, record, [view.record.id], fail=False)
        except BaseException:
            if container:
                self.docker("rm", "-f", container, check=False, timeout=120)
            if old:
                self.docker("rename", old, name, check=False)
            current, _ = store.read_host()
            if current.lifecycle.state == "starting":  # the old container is back, stopped
                self._set_state(store, current, "stopped")
            raise
        if old:
            self.docker("rm", "-f", old, timeout=120)
        return self._fresh_view(record, view.record, {"id": container})

    def _create_options(self, container: str):
        """The cpus, memory, start args and mounts a container was made with."""
        found = self._inspect([container]) if container else []
        labels = (found[0]["Config"]["Labels"] or {}) if found else {}
        try:
            options = json.loads(labels.get(f"{LABEL}.create-options") or "{}")
        except ValueError:
            options = {}
        return SimpleNamespace(cpus=options.get("cpus"), memory=options.get("memory"),
                               start_arg=tuple(options.get("start_args") or ()),
                               mounts=tuple(options.get("mounts") or ()), pull=False)

    def send_message(self, view, text: str) -> None:
        self.tmux(self._container(view)).send(view.record.session, text)

    def output(self, view, lines: int) -> str:
        container = self._container(view)
        if view.state != "stopped" and view.host.facts.get("running"):
            return self.tmux(container).capture(view.record.session, lines)
        result = self.docker("cp", f"{container}:{HOST_DIR}/agents/{view.record.id}/logs/output.log",
                             "-", check=False, text=False)
        if result.returncode != 0:
            return ""
        try:  # the host wrote it: a regular file's last bytes, nothing else
            with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
                member = next((m for m in tar.getmembers() if m.isfile()), None)
                data = tar.extractfile(member).read()[-lines * 400:] if member else b""
        except tarfile.TarError:
            data = b""
        text = data.decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) + "\n"

    def exec_in(self, view, shell_command: str, timeout) -> int:
        container = self._container(view)
        if not view.host.facts.get("running"):
            raise mngr.RefusedError(f"host {view.host.name} is stopped",
                                    f"start it: mngr start {view.record.name}")
        env = mngr.read_env_file(self.store(view.host.record.id).host_dir.agent_dir(view.record.id) / "env")
        argv = ["docker", "exec", "-i", "-w", view.record.work_dir,
                "-e", f"{mngr.ENV_HOST_DIR}={HOST_DIR}", "-e", f"MNGR_AGENT_NAME={view.record.name}",
                "-e", f"MNGR_AGENT_ID={view.record.id}"]
        for key in sorted(env):  # by name: docker takes the value from its own environment,
            argv += ["-e", key]   # so no secret is on a command line for ps to show
        argv += [container, "sh", "-c", shell_command]
        return mngr.run(argv, env={**self.env, **env}, capture=False, check=False, timeout=timeout,
                        what=f"exec in {view.record.name}").returncode

    def attach(self, view) -> int:
        need_terminal(view)
        container = self._container(view)
        self._exec(container, "touch", f"{HOST_DIR}/activity/user", check=False)
        return mngr.run(["docker", "exec", "-it", container, "tmux", "-L", SOCKET, "attach-session",
                         "-t", f"={view.record.session}"], env=self.env, capture=False,
                        check=False, timeout=None, what="docker exec tmux attach").returncode

    @one_at_a_time
    def destroy_agent(self, view, remove_work: bool, discard_changes: bool) -> None:
        """Forget the agent; a host left with no agents is removed with its container."""
        host = view.host
        store, record, info, agent, remaining = self._destroying(view)
        if not remaining:  # the host goes, with everything mngr made for it
            self.ctx.hook("on_before_host_destroy", info)
            if host.facts.get("exists"):
                self.docker("rm", "-f", host.facts["id"], timeout=120)
            # the image built for it, by tag: its snapshots (children of it) stay usable
            self.docker("rmi", f"mngr-build:{host.record.id}", check=False)
            self._host_destroyed(record, agent)
            return
        if host.facts.get("running"):
            self.tmux(host.facts["id"]).kill(view.record.session)
        kept = [store.read_agent(a)[0] for a in remaining]
        record = replace(record, agents=remaining, version=store.next_version(record.id, record.version),
                         permissions=mngr.permission_union([a.permissions for a in kept if a]))
        self._push(host, store, [record])
        shutil.rmtree(store.host_dir.agent_dir(view.record.id), ignore_errors=True)
        self.ctx.hook("on_after_agent_destroy", agent)

    def _push(self, host, store, records=()) -> None:
        """New records into the host (atomically when it runs, by docker cp when not),
        then, and only then, on the controller: a failure leaves both as they were."""
        if not host.facts.get("exists"):
            self._keep(store, records)
        elif host.facts.get("running"):
            self._deploy(host.facts["id"], store, records=records)
        else:
            self._cp_in(host.facts["id"], self._files(store, records=records))
            self._keep(store, records)

def dockerfile_bases(text: str, build_args: dict) -> list:
    """The images a Dockerfile builds FROM, as far as they can be known without
    building: not scratch, not an earlier stage, and only when every $VAR in the
    name resolves (from --build-arg, else the ARG default before the first FROM)."""
    defaults, stages, bases, seen_from = {}, set(), [], False
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split()
        keyword = words[0].upper() if words else ""
        if keyword == "ARG" and not seen_from and len(words) > 1 and "=" in words[1]:
            key, _, value = words[1].partition("=")
            defaults[key] = value.strip('"')
        elif keyword == "FROM":
            seen_from = True
            names = [w for w in words[1:] if not w.startswith("--")]
            if not names:
                continue
            image = re.sub(r"\$\{?(\w+)\}?",
                           lambda m: build_args.get(m.group(1), defaults.get(m.group(1), m.group(0))),
                           names[0])
            if "$" not in image and image.lower() != "scratch" and image.lower() not in stages:
                bases.append(image)
            if len(names) >= 3 and names[1].upper() == "AS":
                stages.add(names[2].lower())
    return list(dict.fromkeys(bases))


def _dir_entry(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, time.time()
    return info


def _epoch(text):
    """Docker's RFC 3339 timestamps (nanoseconds, Z) to epoch seconds."""
    if not text or text.startswith("0001-"):
        return None
    from datetime import datetime

    main, _, fraction = text.rstrip("Z").partition(".")
    stamp = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S")
    seconds = (stamp - datetime(1970, 1, 1)).total_seconds()
    return seconds + (float(f"0.{fraction[:6]}") if fraction else 0.0)


def _local_epoch(text):
    """docker images' CreatedAt ("2026-12-03 19:30:01 +0000 UTC") to epoch seconds."""
    from datetime import datetime

    try:
        return datetime.strptime(" ".join(str(text).split()[:3]), "%Y-%m-%d %H:%M:%S %z").timestamp()
    except ValueError:
        return None
