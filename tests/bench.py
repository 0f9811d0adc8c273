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
    finally:
        subprocess.run(["tmux", "-L", "mngr-bench", "kill-server"], env=env,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmux_dir, ignore_errors=True)
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
