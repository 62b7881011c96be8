"""The command line starts: ``--version`` and ``--help``."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import detloss


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_version_is_0_1_0():
    assert detloss.__version__ == "0.1.0"


def test_module_version():
    out = _run([sys.executable, "-m", "detloss", "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "detloss 0.1.0"


def test_module_help_exits_zero():
    out = _run([sys.executable, "-m", "detloss", "--help"])
    assert out.returncode == 0, out.stderr
    assert "usage: detloss" in out.stdout


def test_no_command_prints_help():
    out = _run([sys.executable, "-m", "detloss"])
    assert out.returncode == 0, out.stderr
    assert "usage: detloss" in out.stdout


@pytest.mark.skipif(shutil.which("detloss") is None, reason="console script not on PATH")
def test_console_script():
    out = _run(["detloss", "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "detloss 0.1.0"
    assert _run(["detloss", "--help"]).returncode == 0


def test_unknown_command_fails():
    out = _run([sys.executable, "-m", "detloss", "no-such-command"])
    assert out.returncode != 0
    assert "invalid choice" in out.stderr or "error" in out.stderr
