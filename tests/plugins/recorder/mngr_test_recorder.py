"""Records every mngr hook call, with its arguments, as JSON lines.

Inert unless MNGR_RECORDER_LOG names a file. MNGR_RECORDER_FAIL=HOOK makes that
hook raise; MNGR_RECORDER_REFUSE=COMMAND makes on_before_command refuse it;
MNGR_RECORDER_KILL=HOOK (or on_host_state_change:STATE) kills the mngr process
there with SIGKILL, as a crash or an OOM kill would, at that step;
MNGR_RECORDER_RUN=HOOK:PROVIDER:COMMAND runs a shell command the first time that
hook fires for a host of that provider (to break something mid-run).
"""
import dataclasses
import json
import os
import signal

import mngr

HOOKS = [h for h in mngr.ALL_HOOKS if h not in ("host_fields", "agent_fields", "agent_types",
                                                "permissions")]


def _plain(value):
    """Hook arguments as JSON: dataclasses whole (but argparse's args), settings by keys."""
    if dataclasses.is_dataclass(value):
        return {k: v for k, v in dataclasses.asdict(value).items() if k != "args"}
    if isinstance(value, dict):
        return {"keys": sorted(value)}
    return value


class Recorder:
    def __init__(self):
        self.log = os.environ.get("MNGR_RECORDER_LOG")

    def _record(self, hook, *args):
        if not self.log:
            return
        with open(self.log, "a") as handle:
            handle.write(json.dumps({"hook": hook, "args": [_plain(a) for a in args]}) + "\n")
        if os.environ.get("MNGR_RECORDER_FAIL") == hook:
            raise RuntimeError(f"told to fail in {hook}")
        run = os.environ.get("MNGR_RECORDER_RUN", "")   # HOOK:PROVIDER:SHELL COMMAND, once
        if run.count(":") >= 2:
            at, provider, command = run.split(":", 2)
            if hook == at and getattr(args[0], "provider", None) == provider:
                import subprocess

                os.environ.pop("MNGR_RECORDER_RUN")
                subprocess.run(["sh", "-c", command], check=False)
        kill = os.environ.get("MNGR_RECORDER_KILL", "")
        if kill == hook or hook == "on_host_state_change" and kill == f"{hook}:{args[0].new}":
            os.kill(os.getpid(), signal.SIGKILL)

    def on_before_command(self, call):
        self._record("on_before_command", call)
        if os.environ.get("MNGR_RECORDER_REFUSE") == call.command:
            raise mngr.RefusedError(f"the recorder plugin refuses {call.command}")

    def host_fields(self, host):
        return {"seen": host.name} if self.log else {}

    def agent_fields(self, agent):
        return {"name_length": len(agent.name)} if self.log else {}

    def agent_types(self):
        return {"recorded": {"command": "sleep 600", "env": {"RECORDED": "1"}}}

    def permissions(self):
        return {"rec": "a permission family the recorder owns"}


def _recording(hook):
    def method(self, *args):
        self._record(hook, *args)
    method.__name__ = hook
    return method


for _hook in HOOKS:
    if not hasattr(Recorder, _hook):
        setattr(Recorder, _hook, _recording(_hook))
