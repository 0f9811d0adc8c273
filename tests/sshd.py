"""A real sshd for tests: its own host key, user key, config and pid file, on a
free loopback port (or inside a network namespace the test made), stopped by pid."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
TEST_USER = "mngr-test"     # made by make test (tests/setup.sh deps); its shell is /bin/sh


def have_test_user() -> bool:
    try:
        return pwd.getpwnam(TEST_USER).pw_shell == "/bin/sh"
    except KeyError:
        return False


def sshd_without_python(extra: str = "") -> "Sshd":
    """An sshd whose sessions have a shell and nothing else on PATH: no python3 there.
    Log in as TEST_USER, whose /bin/sh reads no rc file that would change PATH. Under
    /tmp, readable by that user; the caller removes .root.parent."""
    root = Path(tempfile.mkdtemp(prefix="mngr-sshd-", dir="/tmp"))
    root.chmod(0o755)
    bare = root / "bare-bin"
    bare.mkdir(mode=0o755)
    os.symlink(shutil.which("sh"), bare / "sh")
    return Sshd(root / "sshd", env={"PATH": str(bare)}, extra=extra)


def have_sshd() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh") is not None and os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_port(address: str, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), 1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Sshd:
    """One sshd; keys and config under `root`. Logins as root with the user key.

    Its sessions get SHLVL=1, so a login shell that is bash does not read the user's
    ~/.bashrc as it does for ssh commands: the machine's own rc files (root's here) are
    not the test's, and can be slow or hang (a tool's stale lock)."""

    def __init__(self, root: Path, address: str = "127.0.0.1", port: int = 0, netns: str = "",
                 extra: str = "", env: dict = None):
        self.root = root
        self.address = address
        self.port = port or free_port()
        self.netns = netns
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # sshd reads authorized_keys as the user logging in
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(root / name)], check=True)
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        (root / "authorized_keys").chmod(0o644)
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress {address}\nHostKey {root / 'host_key'}\n"
            f"PidFile {root / 'sshd.pid'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nLogLevel ERROR\n"
            "MaxSessions 100\nMaxStartups 100\n"
            "SetEnv " + " ".join(f"{k}={v}" for k, v in {"SHLVL": "1", **(env or {})}.items()) + "\n"
            + extra)
        self.pid = 0

    @property
    def identity(self) -> str:
        return str(self.root / "user_key")

    def known_hosts_line(self) -> str:
        key = " ".join((self.root / "host_key.pub").read_text().split()[:2])
        host = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{host} {key}\n"

    def start(self) -> "Sshd":
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation dir
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        subprocess.run([*prefix, SSHD, "-f", str(self.config), "-E", str(self.root / "sshd.log")],
                       check=True, timeout=30)
        pid_file = self.root / "sshd.pid"
        deadline = time.monotonic() + 10
        # the file may be there, still empty: sshd writes it after creating it
        while not (pid_file.exists() and pid_file.read_text().strip().isdigit()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pid = int(pid_file.read_text())
        if not wait_port(self.address, self.port):
            raise RuntimeError(f"sshd did not listen on {self.address}:{self.port}: "
                               + (self.root / "sshd.log").read_text()[-500:])
        return self

    def stop(self) -> None:
        if self.pid:
            try:  # the listener only: sessions it forked for agents' tmux servers are not ours
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.pid = 0


class Netns:
    """A network namespace joined to this one by a veth pair, both ends ours; the
    link can be cut (`ip link set ... down`) and mended."""

    def __init__(self, tag: str):
        number = os.getpid() % 200 + 20
        self.name = f"mngr-{tag}"
        self.outer, self.inner = f"mo{tag}"[:15], f"mi{tag}"[:15]
        self.outer_address, self.address = f"10.213.{number}.1", f"10.213.{number}.2"

    def ip(self, *args, inside: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.name] if inside else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=30)

    def create(self) -> "Netns":
        self.ip("netns", "add", self.name)
        self.ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        self.ip("link", "set", self.inner, "netns", self.name)
        self.ip("addr", "add", f"{self.outer_address}/30", "dev", self.outer)
        self.ip("link", "set", self.outer, "up")
        self.ip("addr", "add", f"{self.address}/30", "dev", self.inner, inside=True)
        self.ip("link", "set", self.inner, "up", inside=True)
        self.ip("link", "set", "lo", "up", inside=True)
        return self

    def cut(self) -> None:
        self.ip("link", "set", self.outer, "down")

    def mend(self) -> None:
        self.ip("link", "set", self.outer, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
