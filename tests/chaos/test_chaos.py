"""The short fixed-seed soak that ``make test`` runs (``make chaos`` runs longer ones).

Seed 7 over 1.5 minutes injects every fault kind at least once (``schedule.py`` takes
kinds from a shuffled bag); about 2 minutes in all on an idle machine, bounded waits
only. Where the 3-node cluster answers, the broker faults go to it; else to the
machine's broker (``stop_app`` and the consumer timeout disturb its other clients: the
same rule as ``tests/reliability``, run it on a broker nothing else is using).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .run import run_soak

SEED = 7
MINUTES = 1.5


@pytest.mark.timeout(900)
async def test_short_fixed_seed_soak_holds_every_invariant(tmp_path: Path) -> None:
    """The 1.5-minute soak of seed 7 (every fault kind) holds every invariant."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("the soak needs rabbitmqctl (RabbitMQ's CLI) for its broker faults")

    ok, verdicts = await run_soak(SEED, MINUTES, workdir=tmp_path)

    failed = [f"{v.name}: {v.status()}: {v.failures}" for v in verdicts if not v.holds]
    assert ok, f"seed {SEED}: " + "; ".join(failed)
