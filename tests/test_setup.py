"""The Makefile's set-up as a user meets it (pure and fast: `make python`, no venv is built).

`make demo` and `make test` first check the interpreter: Python 3.10-3.13 with its venv module.
Each failure is one line on stderr and exit 2, before anything is installed.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PYENV = pathlib.Path.home() / ".pyenv" / "versions"


def _make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # As a user's shell has it: not the variables of a make that runs this test (make test).
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    lines = [line for line in r.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (r.returncode, r.stderr)


def test_the_running_interpreter_passes():
    r = _make("python", f"PYTHON={sys.executable}")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_the_default_interpreter_is_found_and_in_range():
    version = subprocess.run(["make", "-s", "--no-print-directory", "-f", "-", "show"], cwd=REPO, text=True,
                             input=(REPO / "Makefile").read_text() + "\nshow:\n\t@echo $(PYTHON)\n",
                             capture_output=True, timeout=60).stdout.strip()
    assert version, "no interpreter found on this machine's PATH"
    out = subprocess.run([version, "-c", "import sys; print(sys.version_info[:2] >= (3, 10), sys.version_info[:2] <= (3, 13))"],
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["True", "True"], (version, out)


def test_a_missing_interpreter_is_one_line():
    _one_line_error(_make("python", "PYTHON=/nonexistent/python3.12"), "PYTHON=/nonexistent/python3.12 not found")


def test_an_interpreter_out_of_range_is_one_line():
    version = "3.9"
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"))
    if not found:
        pytest.skip(f"no Python {version} under {PYENV} on this machine")
    _one_line_error(_make("python", f"PYTHON={found[0]}"), f"is Python {version}; malaria-ray needs 3.10-3.13")


def test_python_without_its_venv_module_is_one_line(tmp_path):
    """Debian's python3 without python3.X-venv has no ensurepip: the same interpreter with that module
    unimportable says which package to install, instead of failing inside `python -m venv`."""
    (tmp_path / "ensurepip.py").write_text("raise ImportError('No module named ensurepip (Debian: python3-venv)')\n")
    r = _make("python", f"PYTHON={sys.executable}", env={"PYTHONPATH": str(tmp_path)})
    v = "%d.%d" % sys.version_info[:2]
    _one_line_error(r, f"cannot create a virtualenv: install its venv module (Debian/Ubuntu: apt-get install python{v}-venv)")


def test_a_venv_build_checks_the_interpreter_first(tmp_path):
    r = _make(f"VENV={tmp_path / 'venv'}", "PYTHON=/nonexistent/python3.12")
    _one_line_error(r, "PYTHON=/nonexistent/python3.12 not found")
    assert not (tmp_path / "venv").exists()


def test_demo_installs_the_product_without_the_dev_extras():
    plan = _make("-n", "-B", "demo", "VENV=/tmp/no-such-venv").stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs == ["/tmp/no-such-venv/bin/pip install --quiet -e ."], plan
    assert "[dev]" in _make("-n", "-B", "test", "VENV=/tmp/no-such-venv").stdout
