"""The pause (pause.py): when a type pauses, how it probes, when it resumes; no broker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from prometheus_client import CollectorRegistry

from jasper_consumer.errors import (
    CommunicatorMisconfigured,
    JasperError,
    JasperRejected,
    JasperRetryable,
    TypePaused,
)
from jasper_consumer.metrics import Metrics
from jasper_consumer.outcomes import ErrorInfo
from jasper_consumer.pause import (
    PROBE_MIN_S,
    PROBE_REPAUSE_CAP_S,
    Pause,
    PauseRules,
    Verdict,
)

WRONG_KEY = CommunicatorMisconfigured("10000001", "Invalid credentials", 401)
BUSY = JasperRetryable("30000001", "Unknown server error", 500)
NOT_FOUND = JasperRejected("20000001", "Resource not found", 404)


def test_a_pause_code_pauses_at_once():
    """10000001 pauses the type; its error (retryable, with the HTTP status) is kept."""
    rules = PauseRules()

    assert rules.answered(WRONG_KEY) is Verdict.PAUSE
    assert rules.error == ErrorInfo("10000001", 401, "Invalid credentials", True)


def test_transient_failures_in_a_row_ask_echo():
    """Three transient failures in a row (across events) ask Echo; anything else resets."""
    rules = PauseRules(outage_streak=3)

    assert [rules.answered(BUSY) for _ in range(2)] == [Verdict.GO, Verdict.GO]
    assert rules.answered(NOT_FOUND) is Verdict.GO  # an answer: the account is up
    assert [rules.answered(BUSY) for _ in range(3)] == [Verdict.GO, Verdict.GO,
                                                         Verdict.ASK_ECHO]


def test_echo_failing_too_pauses_with_the_last_error():
    """Echo failing after a streak pauses with the streak's last error; passing goes on."""
    rules = PauseRules(outage_streak=1)
    assert rules.answered(BUSY) is Verdict.ASK_ECHO

    assert rules.echo_answered(None, BUSY) is Verdict.GO
    assert rules.error is None
    rules.answered(BUSY)
    assert rules.echo_answered(JasperRetryable("UNEXPECTED_RESPONSE", "x", 503), BUSY) \
        is Verdict.PAUSE
    assert rules.error is not None
    assert (rules.error.code, rules.error.retryable) == ("30000001", True)


def test_probes_double_from_one_second_to_thirty():
    """Echo probes: at most one a second, doubling, at least every 30 s."""
    waits = list(itertools.islice(PauseRules().probe_waits(), 8))
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_repause_right_after_a_resume_probes_less_often():
    """A role that may Echo but not change a SIM: each re-pause doubles the floor to 5 min;
    a real success resets it."""
    rules = PauseRules()
    floors = []
    for _ in range(10):
        rules.answered(WRONG_KEY)
        floors.append(next(rules.probe_waits()))
        rules.resumed()
    assert floors == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert max(itertools.islice(rules.probe_waits(), 20)) == PROBE_REPAUSE_CAP_S
    rules.answered(None)
    rules.answered(WRONG_KEY)
    assert next(rules.probe_waits()) == PROBE_MIN_S


class VirtualTime:
    """The probes' waits on a clock the test moves: ``advance`` ends the earliest one."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waiting: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((self.now + seconds, future))
        self.waiting.sort(key=lambda w: w[0])
        await future

    def advance(self) -> None:
        self.waiting = [w for w in self.waiting if not w[1].done()]
        if self.waiting:
            at, future = self.waiting.pop(0)
            self.now = max(self.now, at)
            future.set_result(None)


class PauseAgainstAnAccount(RuleBasedStateMachine):
    """The real :class:`Pause`, on virtual time, against an account whose key breaks and is
    fixed and which goes down and up; calls answer accordingly, probes come when the clock
    says, the resume hook may fail or meet a new pause, ownership may be lost. Always: a
    paused type has a probe coming (never paused for good), probes are 1 s to 30 s apart
    (5 min after re-pauses), ``jasper_communicator_up`` says whether it is paused, and
    the hooks run once per pause and once per resume."""

    @initialize()
    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = VirtualTime()
        self.key_ok, self.up = True, True
        self.resume_hook = "ok"
        self.echoes: list[float] = []
        self.hooks: list[str] = []
        self.metrics = Metrics(CollectorRegistry())
        self.pause = Pause("T", self.metrics, echo=self._echo, on_pause=self._on_pause,
                           on_resume=self._on_resume, sleep=self.clock.sleep)

    def _answer(self) -> JasperError | None:
        if not self.key_ok:
            return WRONG_KEY
        return None if self.up else BUSY

    async def _echo(self) -> None:
        self.echoes.append(self.clock.now)
        err = self._answer()
        if err is not None:
            raise err

    async def _on_pause(self, _: ErrorInfo) -> None:
        self.hooks.append("pause")

    async def _on_resume(self) -> None:
        self.hooks.append("resume")
        if self.resume_hook == "fail":
            raise RuntimeError("the parked queue cannot be consumed")
        if self.resume_hook == "repause":  # a call during the hook meets the wrong key
            with contextlib.suppress(TypePaused):
                await self.pause.observe(WRONG_KEY)

    def _run(self, coro: Any = None) -> None:
        async def settle() -> None:
            if coro is not None:
                with contextlib.suppress(TypePaused):
                    await coro
            for _ in range(20):  # let every task that can run, run
                await asyncio.sleep(0)

        self.loop.run_until_complete(settle())

    @rule()
    def a_call_ends(self) -> None:
        if self.pause.error is None:  # no real call is made while paused
            self._run(self.pause.observe(self._answer()))

    @rule(ok=st.booleans())
    def the_key(self, ok: bool) -> None:
        self.key_ok = ok

    @rule(up=st.booleans())
    def the_account(self, up: bool) -> None:
        self.up = up

    @rule(mode=st.sampled_from(["ok", "fail", "repause"]))
    def the_resume_hook(self, mode: str) -> None:
        self.resume_hook = mode

    @rule()
    def time_passes(self) -> None:
        self.clock.advance()
        self._run()

    @rule()
    def ownership_lost(self) -> None:
        self._run(self.pause.stop())
        self.echoes.clear()
        self.hooks.clear()  # the pause is forgotten: the next owner starts afresh

    @invariant()
    def a_paused_type_has_a_probe_coming(self) -> None:
        if self.pause.error is not None:
            assert any(not f.done() for _, f in self.clock.waiting), "paused with no prober"

    @invariant()
    def the_gauge_says_it(self) -> None:
        up = self.metrics.communicator_up.labels("T")._value.get()
        assert up == (0 if self.pause.error is not None else 1)

    @invariant()
    def hooks_alternate(self) -> None:
        assert all(a != b for a, b in itertools.pairwise(self.hooks)), self.hooks

    def teardown(self) -> None:
        if hasattr(self, "loop"):
            self._run(self.pause.stop())
            self.loop.close()


PauseAgainstAnAccount.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck))
test_pause_against_an_account = PauseAgainstAnAccount.TestCase


# -- the driver ---------------------------------------------------------------------------


class Account:
    """Echo's answers, in order; records the calls."""

    def __init__(self, *answers: JasperError | None) -> None:
        self.answers = list(answers)
        self.echoes = 0

    async def echo(self) -> None:
        self.echoes += 1
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def test_pausing_calls_the_hook_probes_and_resumes(metrics: Metrics,
                                                         monkeypatch: pytest.MonkeyPatch):
    """A pause calls on_pause once, probes Echo until it passes, then calls on_resume;
    jasper_communicator_up follows."""
    monkeypatch.setattr("jasper_consumer.pause.PROBE_MIN_S", 0.01)
    account = Account(WRONG_KEY, None)
    events: list[str] = []
    resumed = asyncio.Event()

    async def on_pause(error: ErrorInfo) -> None:
        events.append(f"pause {error.code}")

    async def on_resume() -> None:
        events.append("resume")
        resumed.set()

    pause = Pause("T", metrics, echo=account.echo, on_pause=on_pause, on_resume=on_resume,
                  rules=PauseRules())
    pause.rules.floor_s = 0.01
    up = metrics.communicator_up.labels("T")

    with pytest.raises(TypePaused):
        await pause.observe(WRONG_KEY)
    assert up._value.get() == 0
    with pytest.raises(TypePaused):
        pause.check()
    async with asyncio.timeout(5):
        await resumed.wait()

    assert events == ["pause 10000001", "resume"]
    assert account.echoes == 2
    assert up._value.get() == 1
    pause.check()
    await pause.stop()


async def test_a_back_off_wait_ends_when_the_type_pauses(metrics: Metrics):
    """A job sleeping between retries is woken by a pause (to be parked) at once."""
    async def nothing(*_: object) -> None:
        return None

    pause = Pause("T", metrics, echo=Account(WRONG_KEY).echo, on_pause=nothing,
                  on_resume=nothing)
    sleeper = asyncio.create_task(pause.sleep(30))
    await asyncio.sleep(0)

    with pytest.raises(TypePaused):
        await pause.observe(WRONG_KEY)
    async with asyncio.timeout(1):
        with pytest.raises(TypePaused):
            await sleeper
    await pause.stop()


async def test_stop_ends_probing_and_forgets_the_pause(metrics: Metrics):
    """Ownership lost: no more Echo from this process, and up again as far as it knows."""
    async def nothing(*_: object) -> None:
        return None

    account = Account(*[WRONG_KEY] * 100)
    pause = Pause("T", metrics, echo=account.echo, on_pause=nothing, on_resume=nothing)
    pause.rules.floor_s = 0.01  # probes every 10-20 ms while it runs
    with pytest.raises(TypePaused):
        await pause.observe(WRONG_KEY)
    async with asyncio.timeout(2):
        while account.echoes < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await pause.stop()
    echoes = account.echoes
    await asyncio.sleep(0.1)  # several probe intervals

    assert account.echoes == echoes
    assert pause.error is None
    assert metrics.communicator_up.labels("T")._value.get() == 1


async def test_a_back_off_wait_begun_after_the_pause_ends_at_once(metrics: Metrics):
    """Another job paused the type between this job's answer and its back-off wait: the
    wait does not run its course (up to max_delay_seconds) before the job is parked."""
    async def nothing(*_: object) -> None:
        return None

    pause = Pause("T", metrics, echo=Account(*[WRONG_KEY] * 10).echo, on_pause=nothing,
                  on_resume=nothing)
    with pytest.raises(TypePaused):
        await pause.observe(WRONG_KEY)

    async with asyncio.timeout(1):
        with pytest.raises(TypePaused):
            await pause.sleep(30)
    await pause.stop()


async def test_a_pause_during_the_resume_hook_gets_a_prober_of_its_own(metrics: Metrics):
    """The first call after a resume, made while the resume hook still runs, pauses the
    type again: a new probe is scheduled (the type is not left paused for good)."""
    clock = VirtualTime()
    pause: Pause

    async def on_resume() -> None:
        with contextlib.suppress(TypePaused):
            await pause.observe(WRONG_KEY)  # the role may call Echo, not change a SIM

    async def echo() -> None:
        return None

    async def on_pause(_: ErrorInfo) -> None:
        return None

    pause = Pause("T", metrics, echo=echo, on_pause=on_pause, on_resume=on_resume,
                  sleep=clock.sleep)
    with contextlib.suppress(TypePaused):
        await pause.observe(WRONG_KEY)
    for _ in range(5):
        await asyncio.sleep(0)
    clock.advance()  # the probe passes: resume, and the hook meets the wrong key
    for _ in range(20):
        await asyncio.sleep(0)

    assert pause.error is not None
    assert any(not f.done() for _, f in clock.waiting), "paused with no probe coming"
    await pause.stop()
