"""Bad input: random argv and random settings files through main(), in-process.

The promise: no traceback ever; exit 2 for usage, 1 (or 3, 75) otherwise, with one
error line. Commands that would run arbitrary text (exec, connect) or reach other
providers are left out: the values are random, the machine is real.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import mngr

SAFE = ("create", "list", "message", "logs", "stop", "start", "destroy", "limit", "enforce",
        "config", "keys", "snapshot", "plugin", "gc", "host")
# --ssh would make `host add` connect to whatever it was given: tests reach only loopback
UNSAFE_FLAGS = {"--in", "--host", "--image", "--dockerfile", "--pull", "--snapshot", "--mount", "--ssh",
                "--source", "--target", "--agent-cmd", "--watch", "--env-file", "-h", "--help",
                "--version", "--connect", "--stdin", "--pass-env", "--exclude", "--grant"}


def flags_of(command: str) -> list:
    parser = mngr.build_parser(only=command)
    sub = mngr._subparser(parser, command)
    flags = []
    for action in sub._actions:
        flags += [o for o in action.option_strings if o not in UNSAFE_FLAGS]
        if action.choices and hasattr(action, "_name_parser_map"):
            flags += list(action.choices)
    return sorted(set(flags))


VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "-1", "0", "5m", "2d", "1e9", "9" * 40, "a b", "ünï", "x" * 300,
                     "io", "custom", "env:X", "net:egress", "fs:*", "name=*", "state=run*", "--",
                     "-", "@", "../..", "/etc/passwd", "\t", "agent", "none", "true"]),
)


@st.composite
def argvs(draw):
    command = draw(st.sampled_from(SAFE))
    flags = flags_of(command)
    argv = [command]
    for _ in range(draw(st.integers(0, 5))):
        if flags and draw(st.booleans()):
            argv.append(draw(st.sampled_from(flags)))
        argv.append(draw(VALUES))
    if command == "create":
        argv += ["--agent-cmd", "true", "--no-connect"]
    return argv


@pytest.fixture(scope="module")
def sandbox():
    root = Path(tempfile.mkdtemp(prefix="mngr-fuzz-"))
    tmux_dir = Path(tempfile.mkdtemp(prefix="mf", dir="/tmp"))
    (root / "home").mkdir()
    (root / "work").mkdir()
    env = {"HOME": str(root / "home"), "TMUX_TMPDIR": str(tmux_dir),
           "MNGR_TMUX_SOCKET": f"mngr-fuzz-{tmux_dir.name}", "MNGR_RECORDER_LOG": ""}
    yield root, env
    subprocess.run(["tmux", "-L", env["MNGR_TMUX_SOCKET"], "kill-server"], capture_output=True,
                   env={**os.environ, **env})
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(tmux_dir, ignore_errors=True)


def run_main(root, env, argv):
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    os.environ.update(env)
    for key in [k for k in os.environ if k.startswith("MNGR_COMMANDS_")]:
        del os.environ[key]
    os.chdir(root / "work")
    sys.stdin = io.StringIO("")
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = mngr.main(argv)
            except SystemExit as exc:  # --help and --version end in argparse's exit
                code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.stdin = saved_stdin
    return code, out.getvalue(), err.getvalue()


def check(code, err, argv):
    assert "Traceback" not in err and "internal error" not in err, (argv, err)  # no bug hidden
    assert code in (0, 1, 2, 3, 75), (argv, code, err)
    errors = [line for line in err.splitlines() if line.startswith("mngr: error:")]
    if code != 0 and code is not None:
        assert len(errors) >= 1, (argv, err)
        if code == 2:
            assert len(errors) == 1 and err.strip().count("\n") == errors[0].count("\n"), (argv, err)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None)
@given(argv=argvs())
@example(argv=["limit", "--idle-timeout", "9" * 40])
@example(argv=["list", "--include", "no-equals-sign"])
@example(argv=["config", "get", "a..b"])
@example(argv=["config", "set", "x y", "1"])
@example(argv=["create", "ünï", "--agent-cmd", "true", "--no-connect"])
@example(argv=["stop", "-a"])
@example(argv=["limit", "--activity-sources", "user,,agent"])
@example(argv=["snapshot", "destroy", "nope"])
def test_random_argv_never_tracebacks(sandbox, argv):
    root, env = sandbox
    code, _, err = run_main(root, env, argv)
    check(code, err, argv)


SETTINGS = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"[commands.list]\nrunning = 'maybe'\n", b"[commands]\nlist = 3\n",
                     b"[agent_types]\nx = 1\n", b"[agent_types.x]\nparent_type = 'x'\n",
                     b"[providers]\nfoo = 'bar'\n", b"[providers.p]\nbackend = 'nope'\n",
                     b"[policy]\nidle_timeout = 'soon'\n", b"[policy]\nidle_mode = 'maybe'\n",
                     b"[plugins]\nx = 1\n", b"watch_interval = 'x'\n", b"prefix = 3\n",
                     b"[commands.create]\ngrant = 'bogus'\n", b"\xff\xfe\x00"]),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None)
@given(content=SETTINGS, argv=st.sampled_from([["list"], ["enforce", "--dry-run"],
                                               ["config", "list"], ["create", "s", "x"],
                                               ["limit", "--all", "--idle-timeout", "1h"]]))
def test_random_settings_never_traceback(sandbox, content, argv):
    root, env = sandbox
    settings_file = root / "home" / ".config" / "mngr" / "settings.toml"
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_bytes(content)
    try:
        code, _, err = run_main(root, env, argv)
    finally:
        settings_file.unlink()
    check(code, err, argv)
