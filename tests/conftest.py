"""What every test run ends with: the checks this machine skipped, and why.

A skipped check is not a passed one. Tests skip where a tool or a service is missing
(kubectl renders deploy/k8s, rabbitmqctl reads the broker back, the 3-node cluster of
``../shared/rabbitmq-cluster``); the reason each gives is printed, counted, as the very
last lines of the run, so that ``make test`` on a new machine says what it did not check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator

import pytest


def skip_reasons(reports: list[pytest.TestReport]) -> Counter[str]:
    """The reason of each skipped test (``-ra`` prints them too, among everything else)."""
    reasons: Counter[str] = Counter()
    for report in reports:
        if report.skipped and isinstance(report.longrepr, tuple):
            reasons[str(report.longrepr[2]).removeprefix("Skipped: ")] += 1
    return reasons


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None]:
    """After everything else, the short summary included (the outermost wrapper)."""
    yield
    reasons = skip_reasons(terminalreporter.stats.get("skipped", []))
    if not reasons:
        return
    terminalreporter.section("NOT CHECKED on this machine", sep="!", yellow=True, bold=True)
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.line(f"{count:4d} test(s): {reason}", yellow=True)
