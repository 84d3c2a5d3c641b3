"""The programs the deploy/ checks run (promtool, hadolint, kubectl), found and run alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(name: str, env: str) -> str:
    """A tool from $ENV, PATH, .tools/bin (``make`` puts promtool there) or the venv."""
    candidates = [os.environ.get(env), shutil.which(name), REPO / ".tools" / "bin" / name,
                  Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} not found ({env}, PATH, .tools/bin, venv): `make test` installs it")


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (2 min at most), capturing its output; never raises on
    a non-zero exit."""
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)
