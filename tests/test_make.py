"""The Makefile installs what each target needs and no more, ``make unit`` needs no broker,
and a run ends by saying what it did not check.

The recipes are read with ``make -n -B`` (print every command, run none).
"""

from __future__ import annotations

import shutil
import tomllib

import pytest

from .conftest import skip_reasons
from .external import REPO, run


def recipe(target: str) -> str:
    """What ``make <target>`` would run from scratch (nothing is run)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = run(make, "-n", "-B", target)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_run_installs_only_what_the_service_needs():
    """`make run` installs the locked runtime dependencies and the package, no extra."""
    commands = recipe("run")

    assert "--require-hashes -r deploy/requirements.lock" in commands
    assert "pip install --quiet -e .\n" in commands
    assert ".[dev]" not in commands
    assert ".[bench]" not in commands


@pytest.mark.parametrize(("target", "extra", "not_extra"), [
    ("test", "dev", "bench"), ("unit", "dev", "bench"), ("lint", "dev", "bench"),
    ("bench", "bench", "dev"),
])
def test_each_target_installs_its_extra(target, extra, not_extra):
    """Tests and lint install the dev extra, the bench the bench extra; neither the other."""
    commands = recipe(target)

    assert f"-e '.[{extra}]'" in commands
    assert f".[{not_extra}]" not in commands


def test_benchmark_tools_are_not_dev_tools():
    """uvloop, FastStream and py-spy are in the bench extra only."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = {extra: {dep.split(">")[0].split("[")[0].split("=")[0] for dep in deps}
             for extra, deps in extras.items()}

    assert {"uvloop", "faststream", "py-spy"} <= names["bench"]
    assert not {"uvloop", "faststream", "py-spy"} & names["dev"]


def test_make_unit_leaves_out_every_test_that_needs_the_broker():
    """`make unit` ignores tests/integration and tests/reliability (whose harness closes
    the broker's connections and stops its app), the browser tests (they run the service)
    and the chaos soak (it runs replicas and stops the broker's app); the chaos soak's
    invariant checks need no broker and stay."""
    command = recipe("unit").replace("\\\n", " ")

    for ignored in ("tests/integration", "tests/reliability", "tests/browser",
                    "tests/chaos/test_chaos.py"):
        assert f"--ignore={ignored}" in command, ignored
    assert "--ignore=tests/chaos " not in command + " "


def test_skipped_checks_are_counted_by_reason():
    """The run's last lines count skipped tests by the reason each gave."""
    def skipped(reason: str) -> pytest.TestReport:
        return pytest.TestReport("t", ("t.py", 1, "t"), {}, "skipped",
                                 ("t.py", 1, f"Skipped: {reason}"), "setup")

    passed = pytest.TestReport("t", ("t.py", 1, "t"), {}, "passed", None, "call")
    reports = [skipped("kubectl absent"), skipped("kubectl absent"), skipped("no cluster"),
               passed]

    assert skip_reasons(reports) == {"kubectl absent": 2, "no cluster": 1}
