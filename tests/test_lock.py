"""deploy/requirements.lock, from which the image installs, covers what pyproject.toml asks for.

The lock pins every runtime dependency (and the build backend) to one version inside
pyproject's range, each with its sha256 hashes, and is closed: whatever a locked package
needs is locked too. ``make lock`` regenerates it (uv pip compile --generate-hashes).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .external import REPO

LOCK = REPO / "deploy" / "requirements.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Canonical name -> (pinned version, hashes) of every entry of the lock."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    text = LOCK.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --hash=")
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)(\s*;.*)?", requirement.strip())
        assert match, f"not an exact pin: {line}"
        entries[canonicalize_name(match.group(1))] = (
            Version(match.group(2)), [o.strip() for o in options])
    return entries


def _runtime() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


def test_lock_pins_every_runtime_dependency_within_its_range():
    """Each dependency of pyproject.toml is pinned to a version its range allows."""
    pins = locked()

    for requirement in _runtime():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in the lock: run `make lock`"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), \
            f"{requirement}: the lock has {pins[name][0]}: run `make lock`"


def test_lock_pins_the_build_backend():
    """The image builds its own wheel offline: the build backend is locked too."""
    pins = locked()

    for requirement in map(Requirement, PYPROJECT["build-system"]["requires"]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in the lock"
        assert requirement.specifier.contains(pins[name][0])


def test_every_locked_file_is_checked_by_hash():
    """Every pin carries sha256 hashes (pip --require-hashes refuses the lock otherwise)."""
    for name, (_, hashes) in locked().items():
        assert hashes, f"{name} has no hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_lock_is_closed_under_dependencies():
    """What each locked package needs on the image's Python (3.11, Linux) is locked, in range."""
    # The requirements come from the packages installed here, which `make` installs from the
    # lock first; a different installed version means the venv is older than the lock.
    pins = locked()
    environment = {key: str(value) for key, value in default_environment().items()}
    environment |= {"python_version": "3.11", "sys_platform": "linux",
                    "platform_system": "Linux", "extra": ""}

    for name, (version, _) in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is locked but not installed: run `make` to reinstall")
        assert Version(installed) == version, \
            f"{name} {installed} installed, {version} locked: run `make` to reinstall"
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            needed = canonicalize_name(requirement.name)
            assert needed in pins, f"{name} needs {requirement}, not in the lock"
            assert requirement.specifier.contains(pins[needed][0], prereleases=True), \
                f"{name} needs {requirement}, the lock has {pins[needed][0]}"


def test_runtime_ranges_stop_before_the_next_major():
    """pyproject keeps ranges, each with an upper bound, so a rebuild takes no new major."""
    for requirement in _runtime():
        uppers = [s for s in requirement.specifier if s.operator in ("<", "<=", "~=")]
        assert uppers, f"{requirement} has no upper bound"
