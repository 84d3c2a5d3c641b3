"""The holes of issue 9, end to end: each test drives the real service (a subprocess)
through the real broker and the simulator; each failed on the code before the rebuild.

Every type here has ``request_timeout_seconds: 2``: a process that becomes a type's owner
waits one ``1 / requests_per_second`` plus the request timeout before its first call
(operator guide, section 13), and a 10 s default would slow every test. Times are compared
on one clock: ``time.monotonic()`` in this process and the simulator's
``RequestRecord.started`` (also ``time.monotonic()``; on Linux CLOCK_MONOTONIC is shared by
every process on the host).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from typing import Any

import pytest

from .conftest import (
    Harness,
    Proc,
    Simulator,
    active_consumer_pid,
    caller_pid,
    consumer_prefetches,
    first_answer,
    iccid,
    job_body,
    make_event,
    metric_value,
    queue_counts,
    type_,
    vm_rss_mb,
    wait_until,
)

REQUEST_TIMEOUT_S = 2
RIGHT_KEY = "ka"  # the key type_("a") gives the service
WRONG_ACCOUNT = {"a": "another-key"}  # the simulator's account "a" expects this instead


def type_a(rps: float = 1, concurrency: int = 1, **extra: Any) -> dict[str, Any]:
    """"Type A" at the given limits (default: Cisco's, one call at a time and 1/s)."""
    return type_("a", concurrency, rps, request_timeout_seconds=REQUEST_TIMEOUT_S, **extra)


async def pause_started(sim: Simulator, timeout: float = 30) -> float:
    """When the simulator first answered 401 (the pause), on the shared clock."""
    found: list[float] = []

    async def seen() -> bool:
        record = first_answer(await sim.requests(), 401)
        if record is not None:
            found.append(record["started"])
        return bool(found)

    await wait_until(seen, "the first 401 answer (the pause)", timeout, 0.1)
    return found[0]


async def settle_quietly(predicate: Any, what: str, timeout: float) -> None:
    """Wait (bounded) for ``predicate``; a timeout is not an error here: the caller
    measures what happened and asserts with the numbers."""
    with contextlib.suppress(AssertionError):
        await wait_until(predicate, what, max(timeout, 0.1), 0.05)


def delayed_count(harness: Harness, event_id: str) -> int:
    return harness.signals.outcomes(event_id).count("delayed")


# -- hole 1 --------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_hole1_pause_delays_1000_waiting_within_5s(harness: Harness):
    """1,000 events waiting at 1 call/s each get a delayed signal within 5 s of the pause.

    So does an event published during the pause, within 5 s of being published; none gets
    two. One call at a time, 1 call/s, 1,000 SIMs, a wrong key.

    Why 1,000 at 1/s here and the order after the fix in another test: the hole is at the
    default limits (where the prefetch is smallest), so the timing is measured at 1/s, not
    with a rate raised to 20/s; but draining 1,000 events at 1/s after the fix takes 17
    minutes, so "applied in publish order once the key is fixed" is
    test_hole1_pause_then_fix_applies_in_publish_order, with 30 events, also at 1/s.
    An event's deadline is 5 s after the later of the pause and its publish confirm (this
    test cannot see when it reached the type; routing takes milliseconds).
    """
    sim = await harness.setup([type_a()], account_keys=WRONG_ACCOUNT)
    await harness.start_service()
    await harness.read_signals()
    events = [make_event(iccid(n), "Type A") for n in range(1000)]
    ids = [e["event_id"] for e in events]
    published = await harness.publish(events)
    paused = await pause_started(sim)
    deadline = {e: max(paused, t) + 5 for e, t in zip(ids, published, strict=True)}
    await settle_quietly(
        lambda: all(harness.signals.first_at(e, "delayed") is not None for e in ids),
        "a delayed signal for each of 1,000 events", max(deadline.values()) + 1 - time.monotonic())

    late_event = make_event(iccid(5000), "Type A")
    [late_published] = await harness.publish([late_event])
    await settle_quietly(
        lambda: harness.signals.first_at(late_event["event_id"], "delayed") is not None,
        "a delayed signal for the event published during the pause", 6)
    at = {e: harness.signals.first_at(e, "delayed") for e in ids}
    on_time = [e for e in ids if (t := at[e]) is not None and t <= deadline[e]]
    missing = [e for e in ids if at[e] is None]
    lags = [t - max(paused, p) for e, p in zip(ids, published, strict=True)
            if (t := at[e]) is not None]
    multi = [e for e in [*ids, late_event["event_id"]] if delayed_count(harness, e) > 1]
    late_at = harness.signals.first_at(late_event["event_id"], "delayed")
    late_lag = None if late_at is None else late_at - late_published
    line = (f"hole 1: 1,000 waiting at 1/s, {len(on_time)} delayed within 5 s of the pause, "
            f"{len(missing)} never, last after {max(lags, default=float('nan')):.2f} s; "
            f"{len(multi)} with more than one; event published during the pause: "
            + ("no delayed signal" if late_lag is None else f"delayed after {late_lag:.2f} s"))
    print(line)
    assert len(on_time) == 1000, line
    assert late_lag is not None, line
    assert late_lag <= 5, line
    assert not multi, line
    assert not any(harness.signals.finals(e) for e in ids), line


@pytest.mark.timeout(240)
def collapse(statuses: list[str]) -> list[str]:
    """Identical commands in a row are one call (coalescing)."""
    return [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]


async def test_hole1_pause_then_fix_applies_in_publish_order(harness: Harness):
    """After a pause at 1 call/s and the fix, 30 events end delayed-then-final, in order.

    10 SIMs x (activate, deactivate, activate) wait on a wrong key: each gets its delayed
    signal within 5 s of the pause; once the key is fixed each ends with exactly one final
    signal: succeeded, or SUPERSEDED for a decommission (bulk) that came back from the
    parked queue after the newer commission was applied; no SIM's PUT applies an older
    event after a newer one, and all end ACTIVATED.
    """
    sim = await harness.setup([type_a()], account_keys=WRONG_ACCOUNT)
    await harness.start_service()
    await harness.read_signals()
    commands = ["activate", "deactivate", "activate"]
    events = [make_event(iccid(n), "Type A", code=65516 if c == "activate" else 65517)
              for c in commands for n in range(10)]
    ids = [e["event_id"] for e in events]
    published = await harness.publish(events)
    paused = await pause_started(sim)
    deadline = max(paused, max(published)) + 5
    await settle_quietly(
        lambda: all(harness.signals.first_at(e, "delayed") is not None for e in ids),
        "a delayed signal for each of 30 events", deadline + 0.5 - time.monotonic())
    delayed_on_time = sum(1 for e in ids if (t := harness.signals.first_at(e, "delayed"))
                          is not None and t <= deadline)

    fixed = time.monotonic()
    await sim.account("a", api_key=RIGHT_KEY)
    # Echo at least every 30 s, then 30 calls at 1/s, then the owner's first-call wait.
    await settle_quietly(lambda: all(harness.signals.finals(e) for e in ids),
                         "final signals for all 30 events", 90)
    drained = time.monotonic() - fixed

    def superseded(e: str) -> bool:
        finals = harness.signals.finals(e)
        return len(finals) == 1 and (finals[0].get("error") or {}).get("code") == "SUPERSEDED"

    wrong_outcomes = {e: harness.signals.outcomes(e) for e in ids
                      if harness.signals.outcomes(e) != ["delayed", "succeeded"]
                      and not (harness.signals.outcomes(e) == ["delayed", "failed"]
                               and superseded(e))}
    puts = sorted((r for r in await sim.requests()
                   if r["method"] == "PUT" and r["http_status"] == 200), key=lambda r: r["started"])
    out_of_order = {}
    for n in range(10):
        seen = [r["requested_status"] for r in puts if r["iccid"] == iccid(n)]
        wanted = [("ACTIVATED" if e["event_code"] == 65516 else "DEACTIVATED")
                  for e in events if e["device"]["ref_no"] == iccid(n)
                  and harness.signals.outcomes(e["event_id"]) == ["delayed", "succeeded"]]
        if collapse(seen) != collapse(wanted):
            out_of_order[iccid(n)] = seen
    statuses = [(await sim.sim(iccid(n)) or {}).get("status") for n in range(10)]
    line = (f"hole 1 (order): 30 waiting at 1/s, {delayed_on_time} delayed within 5 s of the "
            f"pause; after the fix {sum(1 for e in ids if harness.signals.finals(e))} final "
            f"in {drained:.1f} s, {len(wrong_outcomes)} without outcomes [delayed, succeeded], "
            f"{len(out_of_order)} SIMs with PUTs out of publish order, "
            f"{statuses.count('ACTIVATED')} of 10 SIMs ACTIVATED")
    print(line)
    assert delayed_on_time == 30, line
    assert not wrong_outcomes, (line, list(wrong_outcomes.values())[:5])
    assert not out_of_order, (line, list(out_of_order.items())[:3])
    assert statuses == ["ACTIVATED"] * 10, line


# -- hole 2 --------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_hole2_prefetch_stays_bounded_through_pause_and_resume(harness: Harness):
    """Through a pause and its resume the work queue stays at <= 64 prefetch and unacked.

    prefetch 64, 500 waiting at 1 call/s, a wrong key, hold_refresh_seconds 3 (the current
    code hands held messages back and registers again at paused_prefetch), then the fix.
    """
    sim = await harness.setup([type_a()], account_keys=WRONG_ACCOUNT,
                              prefetch=64, hold_refresh_seconds=3)
    await harness.start_service()
    await harness.read_signals()
    queue = harness.work_queue("Type A")
    await harness.publish([make_event(iccid(n), "Type A") for n in range(500)])
    paused = await pause_started(sim)

    samples: dict[str, list[tuple[list[int], int]]] = {"pause": [], "resume": []}

    async def sample(phase: str) -> None:
        prefetches = await consumer_prefetches(queue)
        _, unacked = await queue_counts(queue)
        samples[phase].append((prefetches, unacked))

    # rabbitmqctl takes ~2.5 s a call: sample until three hold-refresh periods have passed.
    while time.monotonic() < paused + 10 or len(samples["pause"]) < 2:
        await sample("pause")
    await sim.account("a", api_key=RIGHT_KEY)

    async def resumed() -> bool:
        return first_answer(await sim.requests(), 200, after=paused) is not None

    await wait_until(resumed, "the first call answered 200 after the fix", 60, 0.2)
    for _ in range(3):
        await sample("resume")

    def worst(phase: str) -> tuple[int, int]:
        # Every sample must show the work queue consumed, with a bounded prefetch
        # (0 would mean unlimited in AMQP): no consumer at all is no proof.
        assert samples[phase], (phase, samples)
        assert all(p and all(0 < x <= 64 for x in p) for p, _ in samples[phase]), samples
        return (max(max(p) for p, _ in samples[phase]),
                max(u for _, u in samples[phase]))

    (p_pause, u_pause), (p_resume, u_resume) = worst("pause"), worst("resume")
    line = (f"hole 2: prefetch 64, 500 waiting: during the pause consumer prefetch up to "
            f"{p_pause}, {u_pause} unacked; after the resume prefetch up to {p_resume}, "
            f"{u_resume} unacked (samples: {samples})")
    print(line)
    assert max(p_pause, u_pause) <= 64, line
    assert max(p_resume, u_resume) <= 64, line


# -- hole 3 --------------------------------------------------------------------------------


async def test_hole3_shared_event_id_calls_each_sim(harness: Harness):
    """One event id for two SIMs of a client gets a PUT and a succeeded signal for each SIM.

    The second message arrives after the first has finished (so no coalescing can hide it).
    """
    sim = await harness.setup([type_a(rps=5)])
    await harness.start_service()
    await harness.read_signals()
    event_id = str(uuid.uuid4())
    sims = [iccid(31), iccid(32)]
    for n, sim_id in enumerate(sims):  # the second arrives after the first has finished
        await harness.publish([{**make_event(sim_id, "Type A"), "event_id": event_id,
                                "client_id": "c-shared"}])
        await settle_quietly(lambda n=n: len(harness.signals.finals(event_id)) > n,
                             f"final signal {n + 1} for the shared event id", 20)

    finals = {s["iccid"]: s for s in harness.signals.finals(event_id)}
    puts = {r["iccid"] for r in await sim.requests() if r["method"] == "PUT"}
    statuses = {s: (await sim.sim(s) or {}).get("status") for s in sims}
    seen = {s: (finals[s]["outcome"], finals[s]["attempts"]) if s in finals else None
            for s in sims}
    line = (f"hole 3: one event id, two SIMs: PUTs for {sorted(puts)}, finals "
            f"{len(harness.signals.finals(event_id))} {seen}, statuses {statuses}")
    print(line)
    assert puts == set(sims), line
    assert len(harness.signals.finals(event_id)) == 2, line
    assert all(v is not None and v[0] == "succeeded" and v[1] >= 1 for v in seen.values()), line
    assert statuses == dict.fromkeys(sims, "ACTIVATED"), line


# -- hole 4 --------------------------------------------------------------------------------


async def run_jobs_queued_together(harness: Harness, sim_id: str,
                                   jobs: list[dict[str, Any]]) -> Simulator:
    """Start the service once (it declares its queues), stop it, publish ``jobs`` straight
    to the work queue, start it again: they are all waiting when it consumes."""
    sim = await harness.setup([type_a(rps=5)])
    first = await harness.start_service()
    assert first.terminate(30) == 0, first.output()[-2000:]
    await harness.read_signals()
    await sim.fault(sim_id, latency_s=0.5)  # a call in flight while the rest arrive
    await harness.publish_jobs(harness.work_queue("Type A"), jobs)
    await harness.start_service()
    await harness.wait_final(list(dict.fromkeys(j["event_id"] for j in jobs)), 45)
    return sim


async def put_sequence(sim: Simulator, sim_id: str) -> list[str | None]:
    return [r["requested_status"] for r in sorted(await sim.requests(), key=lambda r: r["started"])
            if r["method"] == "PUT" and r["iccid"] == sim_id and r["http_status"] == 200]


async def test_hole4a_no_outcome_copied_from_a_redelivered_duplicate(harness: Harness):
    """A job never takes the outcome of a redelivered duplicate queued ahead of it.

    J1 activate (stamp 10), J3 deactivate (20), J1 again (10), J2 activate (30) for one
    SIM, queued together: J2 makes its own call and the SIM ends ACTIVATED.
    """
    x = iccid(41)
    j1, j3, j2 = (job_body(f"hole4a-{n}-{uuid.uuid4()}", x, c, s)
                  for n, c, s in ((1, "activate", 10), (3, "deactivate", 20), (2, "activate", 30)))
    sim = await run_jobs_queued_together(harness, x, [j1, j3, j1, j2])

    j2_final = harness.signals.finals(j2["event_id"])[-1]
    status = (await sim.sim(x) or {}).get("status")
    puts = await put_sequence(sim, x)
    line = (f"hole 4a: SIM ends {status}, PUTs {puts}, J2 final "
            f"{j2_final['outcome']} with {j2_final['attempts']} attempt(s)")
    print(line)
    assert status == "ACTIVATED", line
    assert j2_final["outcome"] == "succeeded", line
    assert j2_final["attempts"] >= 1, line
    assert puts[-1:] == ["ACTIVATED"], line


async def test_hole4b_no_superseded_outcome_shared(harness: Harness):
    """A job never shares the SUPERSEDED outcome of an older job queued ahead of it.

    Jn deactivate (stamp 50), then Jo activate (40, older) and Jf activate (60) for one
    SIM, queued together: Jo fails SUPERSEDED, Jf makes its own call, the SIM ends
    ACTIVATED.
    """
    x = iccid(42)
    jn, jo, jf = (job_body(f"hole4b-{n}-{uuid.uuid4()}", x, c, s)
                  for n, c, s in (("n", "deactivate", 50), ("o", "activate", 40),
                                  ("f", "activate", 60)))
    sim = await run_jobs_queued_together(harness, x, [jn, jo, jf])

    jo_final = harness.signals.finals(jo["event_id"])[-1]
    jf_final = harness.signals.finals(jf["event_id"])[-1]
    status = (await sim.sim(x) or {}).get("status")
    puts = await put_sequence(sim, x)
    jo_code = (jo_final.get("error") or {}).get("code")
    line = (f"hole 4b: SIM ends {status}, PUTs {puts}, Jo {jo_final['outcome']} {jo_code}, "
            f"Jf {jf_final['outcome']} {(jf_final.get('error') or {}).get('code')} with "
            f"{jf_final['attempts']} attempt(s)")
    print(line)
    assert (jo_final["outcome"], jo_code) == ("failed", "SUPERSEDED"), line
    assert jf_final["outcome"] == "succeeded", line
    assert jf_final["attempts"] >= 1, line
    assert status == "ACTIVATED", line
    assert puts == ["DEACTIVATED", "ACTIVATED"], line


# -- hole 5 --------------------------------------------------------------------------------


def long_number_event(n: int) -> bytes:
    """A valid event except that its event_code is a 5,000-digit number."""
    body = json.dumps({**make_event(iccid(500 + n), "Type A"), "event_id": f"longnum-{n}",
                       "event_code": 0})
    return body.replace('"event_code": 0', '"event_code": ' + "9" * 5000).encode()


async def test_hole5_every_message_is_settled(harness: Harness):
    """Bodies that make the parser raise are all settled, and routing goes on.

    35 bodies of 50,000 '[' and 35 events with a 5,000-digit event_code: each is
    dead-lettered (x-jasper-error) or failed with a signal, the events queue ends with 0
    ready and 0 unacked, and an event published after them succeeds within 10 s.
    """
    await harness.setup([type_a(rps=20)])
    await harness.start_service()
    await harness.read_signals()
    bodies = [b"[" * 50_000] * 35 + [long_number_event(n) for n in range(35)]
    mids = [f"deep-{n}" for n in range(35)] + [f"longnum-{n}" for n in range(35)]
    await harness.publish(bodies, message_ids=mids, routing_key="event.65516")
    canary = make_event(iccid(1), "Type A")
    [canary_published] = await harness.publish([canary])
    await settle_quietly(lambda: bool(harness.signals.finals(canary["event_id"])),
                         "the event published after them", 10)
    canary_final = harness.signals.finals(canary["event_id"])
    canary_lag = (harness.signals.first_at(canary["event_id"], "succeeded") or float("inf")) \
        - canary_published

    async def unsettled() -> list[str]:
        dead = await harness.dead_letters()
        return [m for m in mids if not dead.get(m) and not any(
            s["outcome"] == "failed" and (s.get("error") or {}).get("message")
            for s in harness.signals.finals(m))]

    async def all_settled() -> bool:
        return not await unsettled() and await queue_counts(f"{harness.tag}.events") == (0, 0)

    await settle_quietly(all_settled, "all 70 settled and the events queue empty", 15)
    left = await unsettled()
    ready, unacked = await queue_counts(f"{harness.tag}.events")
    line = (f"hole 5: 70 unparseable bodies: {70 - len(left)} settled, {len(left)} not "
            f"(first: {left[:3]}); events queue {ready} ready, {unacked} unacked; event after "
            + (f"{canary_final[0]['outcome']} in {canary_lag:.2f} s" if canary_final
               else "got no final signal within 10 s"))
    print(line)
    assert not left, line
    assert (ready, unacked) == (0, 0), line
    assert canary_final, line
    assert canary_final[0]["outcome"] == "succeeded", line
    assert canary_lag <= 10, line


# -- hole 8 --------------------------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_hole8_two_replicas_one_delayed_each_and_one_prober(harness: Harness):
    """With two replicas and a kill -9, no event gets two delayed signals and one process probes.

    Two replicas, 60 events at 1 call/s, a wrong key, the anchor renewed every 3 s, then a
    kill -9 of the active one: after the fix all 60 succeed, none has more than one
    delayed signal, and Echo probes come from one process at a time, none from the killed
    one after its death. The probes are told apart by their User-Agent
    (``jasper-consumer/<version> (<host> pid <pid>)``). Before the rebuild a hand-back gave
    every held event a second delayed signal, from the standby.
    """
    sim = await harness.setup([type_a()], account_keys=WRONG_ACCOUNT, hold_refresh_seconds=3)
    replicas = [await harness.start_service(), await harness.start_service()]
    await harness.read_signals()
    events = [make_event(iccid(n), "Type A") for n in range(60)]
    ids = [e["event_id"] for e in events]
    await harness.publish(events)
    await wait_until(lambda: all(harness.signals.first_at(e, "delayed") for e in ids),
                     "a delayed signal for each of 60 events", 90, 0.2)

    pid = await active_consumer_pid(harness.work_queue("Type A"))
    up = [metric_value(await harness.metrics(port), "jasper_communicator_up",
                       communicator_type="Type A") for port in harness.ports]
    if pid is None and up.count(0.0) == 1:  # the broker could not say: the paused one
        pid = replicas[up.index(0.0)].popen.pid
    victims = [p for p in replicas if p.popen.pid == pid]
    assert victims, f"cannot tell the active replica: broker says pid {pid}, up {up}"
    victim: Proc = victims[0]
    survivor = next(p for p in replicas if p is not victim)
    victim.kill9()
    killed_at = time.monotonic()

    async def echo_after_kill() -> bool:
        return any("/echo/" in r["path"] and r["started"] > killed_at
                   for r in await sim.requests())

    await wait_until(echo_after_kill, "an Echo probe after the kill", 60, 0.2)
    await sim.account("a", api_key=RIGHT_KEY)
    await settle_quietly(lambda: all(harness.signals.finals(e) for e in ids),
                         "final signals for all 60 events", 150)

    not_succeeded = [e for e in ids
                     if [s["outcome"] for s in harness.signals.finals(e)] != ["succeeded"]]
    multi = [e for e in ids if delayed_count(harness, e) > 1]
    echoes = sorted((r for r in await sim.requests() if "/echo/" in r["path"]),
                    key=lambda r: r["started"])
    agents = [r["user_agent"] for r in echoes]
    runs = [agent for agent, _ in itertools.groupby(agents)]
    interleaved = len(runs) != len(set(runs))
    from_dead = [r for r in echoes
                 if r["started"] > killed_at and caller_pid(r["user_agent"]) == victim.popen.pid]
    told_apart = any(caller_pid(a) is not None for a in agents)
    line = (f"hole 8: 2 replicas, 60 events at 1/s, killed pid {victim.popen.pid} "
            f"(up metric before: {up}): {len(ids) - len(not_succeeded)} of 60 succeeded, "
            f"{len(multi)} with more than one delayed signal (max "
            f"{max((delayed_count(harness, e) for e in ids), default=0)}); {len(echoes)} Echo "
            f"probes, user agents {'' if told_apart else 'CANNOT tell processes apart: '}"
            f"{len(set(agents))} distinct, runs {runs}, interleaved {interleaved}, "
            f"{len(from_dead)} from the killed process after its death")
    print(line)
    assert not multi, line
    assert not not_succeeded, line
    assert told_apart, f"the probes' user agents name no process: {agents}"
    assert all(caller_pid(a) is not None for a in agents), agents
    assert not interleaved, line
    assert not from_dead, line
    assert survivor.alive, line


# -- hole 9 --------------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_hole9_failures_do_not_hold_their_answers(harness: Harness):
    """Failures with ~60 KB error bodies grow the RSS by < 15 MB from the 100th to the 1,000th.

    1,000 SIMs, each answered HTTP 400 10000025 (not retryable) with a ~60 KB errorMessage.
    With a 0-byte pad the same run grows by ~4 MB today.
    """
    sim = await harness.setup([type_a(rps=200, concurrency=4)])
    service = await harness.start_service()
    await harness.read_signals()
    for n in range(1000):
        await sim.fault(iccid(n), always_fail=True, error_code="10000025", http_status=400,
                        body_pad_bytes=60_000)
    events = [make_event(iccid(n), "Type A") for n in range(1000)]
    ids = [e["event_id"] for e in events]
    await harness.publish(events)
    await wait_until(lambda: sum(1 for e in ids if harness.signals.finals(e)) >= 100,
                     "100 final signals", 60, 0.02)
    rss_100 = vm_rss_mb(service.popen.pid)
    await harness.wait_final(ids, 120)
    rss_1000 = vm_rss_mb(service.popen.pid)

    codes = {(harness.signals.finals(e)[0].get("error") or {}).get("code") for e in ids}
    growth = rss_1000 - rss_100
    line = (f"hole 9: 1,000 failures with a 60 KB body: RSS {rss_100:.1f} MB after 100, "
            f"{rss_1000:.1f} MB after 1,000 (+{growth:.1f} MB); error codes {codes}")
    print(line)
    assert codes == {"10000025"}, line
    assert growth < 15, line


# -- hole 10 -------------------------------------------------------------------------------


async def test_hole10a_already_is_matched_by_code(harness: Harness):
    """An answer 10000005 whose message says "already" fails the event with 10000005.

    "Already in that status" is recognised by its code, not by a word in the message.
    """
    sim = await harness.setup([type_a(rps=5)])
    await harness.start_service()
    await harness.read_signals()
    await sim.fault(iccid(61), always_fail=True, error_code="10000005", http_status=400,
                    error_message="SIM is already in transition")
    event = make_event(iccid(61), "Type A")
    await harness.publish([event])
    await harness.wait_final([event["event_id"]], 20)

    final = harness.signals.finals(event["event_id"])[0]
    code = (final.get("error") or {}).get("code")
    line = f"hole 10a: 10000005 'SIM is already in transition' ended {final['outcome']} {code}"
    print(line)
    assert (final["outcome"], code) == ("failed", "10000005"), line


async def test_hole10b_commands_total_counts_router_failures(harness: Harness):
    """jasper_commands_total counts the router's local failures, by type or "unknown".

    An event for an unconfigured type and one with an invalid ICCID for "Type A".
    """
    await harness.setup([type_a(rps=5)])
    await harness.start_service()
    await harness.read_signals()
    unknown = make_event(iccid(71), "Type Z")
    invalid = make_event("12345", "Type A")
    await harness.publish([unknown, invalid])
    await harness.wait_final([unknown["event_id"], invalid["event_id"]], 20)

    values: dict[str, float | None] = {}

    async def counted() -> bool:  # counted once the broker confirmed the signal
        text = await harness.metrics(harness.ports[-1])
        values.update({t: metric_value(text, "jasper_commands_total", communicator_type=t,
                                       command="activate", outcome="failed")
                       for t in ("unknown", "Type A")})
        return values == {"unknown": 1.0, "Type A": 1.0}

    with contextlib.suppress(AssertionError):
        await wait_until(counted, "both local failures counted", 5)
    line = f"hole 10b: jasper_commands_total{{command=activate,outcome=failed}} by type {values}"
    print(line)
    assert values == {"unknown": 1.0, "Type A": 1.0}, line
