"""A provider made of numbers: N in-memory hosts, for enforce tests and the benchmark.

Found through its entry point (this dir holds a dist-info) when the dir is on
PYTHONPATH. Settings: [providers.NAME] backend = "synthetic", hosts = N,
calls = "/path/to/log" (every mutating call is appended there),
fail = true (listing fails, as an unreachable provider would), vanish = true
(every host is gone by the time enforce re-checks it).
"""
from __future__ import annotations

import json
import time

import mngr

POLICY = mngr.IdlePolicy.for_mode("io", idle_timeout=600, trust="untrusted")


class SyntheticProvider:
    backend = "synthetic"

    def __init__(self, name, conf, ctx):
        self.name = name
        self.count = int(conf.get("hosts", 10))
        self.calls = conf.get("calls")
        self.fail = bool(conf.get("fail", False))
        self.vanish = bool(conf.get("vanish", False))
        self.born = time.time() - 3600

    def collect(self):
        if self.fail:
            raise mngr.UnreachableError(f"synthetic provider {self.name} is down")
        hosts = []
        for i in range(self.count):
            record = mngr.HostRecord(id=f"{i:032x}", name=f"syn-{i}", provider=self.name,
                                     lifecycle=mngr.Lifecycle("running", self.born),
                                     policy=POLICY, created_at=self.born)
            hosts.append(mngr.HostView(self, record, mngr.Verification(True)))
        return hosts

    def observe(self, host, now):
        index = int(host.record.id, 16)
        # even hosts booted long ago (idle: stop), odd ones just now (active: none)
        boot = self.born if index % 2 == 0 else now - 1
        return mngr.Observation(exists=True, running=True, state="running",
                                state_since=self.born, certified_created_at=self.born,
                                certified_boot_time=boot,
                                reported=(("agent", now),))

    def refresh(self, host):
        return None if self.vanish else host

    def default_policy(self):
        return POLICY

    def _mutate(self, method, host):
        if self.calls:
            with open(self.calls, "a") as handle:
                handle.write(json.dumps({"method": method, "host": host.name}) + "\n")

    def stop_host(self, host):
        self._mutate("stop_host", host)

    def mark_failed(self, host):
        self._mutate("mark_failed", host)

    def force_stop_host(self, host):
        self._mutate("force_stop_host", host)

    def update_policy(self, host, policy):
        self._mutate("update_policy", host)
