#!/usr/bin/env python3
"""make bench: mngr's speed targets, measured against Python's own start-up.

Ratios, not seconds, so the numbers mean the same on a slow or a busy machine.
Each figure is the median of several runs; the baseline is measured in the
same run. Prints one line per target and exits 1 if one is missed.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RESULTS = []


def timed(argv, env, runs=15, cwd=REPO) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def report(name, value, limit, unit="x") -> None:
    ok = value <= limit
    RESULTS.append(ok)
    print(f"{name:<48} {value:8.2f}{unit}  (target <= {limit:g}{unit})  {'ok' if ok else 'MISSED'}")


def bench_decide() -> None:
    sys.path.insert(0, str(REPO))
    import mngr

    policy = mngr.IdlePolicy.for_mode("io", idle_timeout=600, trust="untrusted", max_lifetime=86400)
    obs = mngr.Observation(True, True, "running", 1000.0, certified_created_at=1000.0,
                           certified_boot_time=1000.0, signed_created_at=1000.0,
                           reported=(("agent", 5000.0), ("user", 4000.0)))
    decide, count, rates = mngr.decide, 200_000, []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(count):
            decide(obs, policy, 2000.0 + (i & 1023))
        rates.append(count / (time.perf_counter() - start))
    rate = statistics.median(rates)
    ok = rate >= 500_000
    RESULTS.append(ok)
    print(f"{'decide() per second':<48} {rate:10,.0f}  (target >= 500,000)  {'ok' if ok else 'MISSED'}")


def bench_enforce(env, home) -> None:
    """enforce --dry-run over a synthetic provider: the per-host cost must be small and flat.

    Run in this process (mngr.main) so that interpreter start-up noise does
    not drown the cost of a hundred hosts; the best of several runs.
    """
    import contextlib
    import io

    import mngr

    config = home / ".config" / "mngr"
    config.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "tests" / "synthetic"))
    saved = dict(os.environ)
    os.environ.update(env)
    totals = {}
    try:
        for hosts in (10, 100, 1000, 10000):
            (config / "settings.toml").write_text(
                f'[providers.syn]\nbackend = "synthetic"\nhosts = {hosts}\n')
            samples = []
            for _ in range(7):
                sink = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stdout(sink):
                    code = mngr.main(["enforce", "--dry-run", "--provider", "syn", "--json"])
                samples.append(time.perf_counter() - start)
                assert code == 0 and sink.getvalue().count('"action": "stop"') == hosts // 2
            totals[hosts] = min(samples)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    per_host = {n: (totals[n] - totals[10]) / (n - 10) * 1000 for n in (100, 1000, 10000)}
    for n, cost in per_host.items():
        report(f"enforce --dry-run, ms per host ({n} hosts)", cost, 1.0, "ms")
    spread = max(per_host.values()) / min(per_host.values())
    report("enforce per-host cost, max/min over 100..10000", spread, 1.5)


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="mngr-bench-"))
    tmux_dir = Path(tempfile.mkdtemp(prefix="mb", dir="/tmp"))
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMUX_TMPDIR": str(tmux_dir),
           "MNGR_TMUX_SOCKET": "mngr-bench"}
    try:
        baseline = timed([PY, "-c", "pass"], env)
        print(f"{'python3 -c pass (baseline)':<48} {baseline * 1000:8.1f}ms")
        report("python3 -m mngr --help / baseline", timed([PY, "-m", "mngr", "--help"], env) / baseline, 1.5)

        work = home / "work"
        work.mkdir()
        for i in range(100):
            subprocess.run([PY, str(REPO / "mngr.py"), "create", f"bench-{i}", "--in-place",
                            "--no-connect", "--agent-cmd", "sleep 3600"],
                           env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
        listed = timed([PY, str(REPO / "mngr.py"), "list", "--json"], env, runs=10)
        report("mngr list --json, 100 agents / baseline", listed / baseline, 3.0)
        bench_decide()
        bench_enforce(env, home)
    finally:
        subprocess.run(["tmux", "-L", "mngr-bench", "kill-server"], env=env,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmux_dir, ignore_errors=True)
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
