"""The three ways mngr runs: python -m mngr, the installed script, a copied single file."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, need


def python39():
    """A Python 3.9 interpreter: $MNGR_PYTHON39, pyenv's, or python3.9 on PATH."""
    candidates = [os.environ.get("MNGR_PYTHON39", "")]
    root = subprocess.run(["sh", "-c", "pyenv root 2>/dev/null"], capture_output=True, text=True).stdout.strip()
    for base in filter(None, [root, os.path.expanduser("~/.pyenv")]):
        candidates += sorted(glob.glob(f"{base}/versions/3.9*/bin/python3.9"))
    candidates.append(shutil.which("python3.9") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
            if probe.stdout.strip() == "(3, 9)":
                return candidate
    return None


def clean_env(home: Path) -> dict:
    return {"PATH": os.environ["PATH"], "HOME": str(home)}


@pytest.mark.parametrize("which", ["current", "3.9"])
def test_import_under_isolated_mode_has_no_side_effects(tmp_path, which):
    interpreter = sys.executable if which == "current" else python39()
    need(interpreter is not None, "a Python 3.9 interpreter (pyenv versions/3.9*)")
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys; sys.path.insert(0, %r); import mngr; "
            "k = mngr.Keyring((mngr.SigningKey('k', b'secret', 0.0),)); "
            "p = {'kind': 'host', 'id': 'h', 'version': 3}; "
            "d = mngr.sign_payload(k, p); assert mngr.verify_document(d, k, 'host', 'h').ok; "
            "mngr.write_json(mngr.Path(sys.argv[1]) / 'data.json', d); "
            "assert mngr.verify_file(mngr.Path(sys.argv[1]) / 'data.json', k, 'host').ok; "
            "print(mngr.__version__, 'logging' in sys.modules)" % str(REPO))
    out = subprocess.run([interpreter, "-I", "-S", "-c", code, str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path, env=clean_env(home))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.1.0", "False"]
    assert list(home.iterdir()) == []  # importing created nothing


def test_copied_single_file_runs_help_and_host_info(tmp_path):
    host_dir = tmp_path / "host"
    (host_dir / "bin").mkdir(parents=True)
    shutil.copy(REPO / "mngr.py", host_dir / "bin" / "mngr.py")
    env = {**clean_env(tmp_path), "MNGR_HOST_DIR": str(host_dir)}
    interpreter = python39() or sys.executable
    help_out = subprocess.run([sys.executable, "-I", "-S", str(host_dir / "bin" / "mngr.py"), "--help"],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
    assert help_out.returncode == 0 and "create" in help_out.stdout
    info = subprocess.run([interpreter, "-I", "-S", str(host_dir / "bin" / "mngr.py"), "host-info"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert info.returncode == 0 and '"data": null' in info.stdout


def test_python_dash_m_from_a_checkout(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mngr", "--version"], capture_output=True, text=True,
                         cwd=REPO, env=clean_env(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "mngr 0.1.0"


def test_pip_install_gives_a_script_and_the_provider_entry_point(tmp_path):
    need(subprocess.run([sys.executable, "-c", "import setuptools, wheel"]).returncode == 0,
         "setuptools and wheel (make test puts them in .venv)")
    target = tmp_path / "site"
    source = tmp_path / "source"  # building writes into the source tree: use a copy
    source.mkdir()
    for name in ("mngr.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "providers", source / "providers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    env = {**clean_env(tmp_path), "PYTHONPATH": str(target)}
    script = subprocess.run([str(target / "bin" / "mngr"), "--version"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert script.returncode == 0 and script.stdout.strip() == "mngr 0.1.0"
    probe = subprocess.run([sys.executable, "-c",
                            "from importlib.metadata import entry_points; import mngr_providers.local; "
                            "print([e.value for e in entry_points(group='mngr.providers')])"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert "mngr_providers.local:LocalProvider" in probe.stdout
