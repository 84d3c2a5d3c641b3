"""The soak's plan: which events are published and which faults are injected, and when.

Everything here comes from one ``random.Random(seed)``, so a seed (with the same
``minutes`` and replica count) gives the same plan every time: ``make chaos SEED=…``
replays it. Nothing here does I/O; the runner (``soak.py``) carries the plan out, and
where the plan names "the owner of a type" it finds that process at run time.

Events: a few hundred SIMs over three communicator types; a SIM's client has 0 to 3
linked areas sharing its SIM (Patriot commissions them with one click: the same command
for one ICCID several times at once); commissions and decommissions of one SIM close
together; some events are bulk (origin ``reconcile``/``replay``, AMQP priority 0-4), some
fail without a call (bad ICCID, unknown type, no ICCID), some name an ICCID the account
does not know. Poison messages (not events at all) are a fault kind.

Faults start 2 to 6 s apart, drawn from a shuffled bag of every kind (so a short run sees
each kind; a kind whose target is busy stays in the bag for a later turn), and each one
is healed before the active phase ends. The plan keeps
them sane: at most one fault per account, per replica and per broker node at a time, no
``stop_app`` while the consumer timeout is lowered, and never every replica down at once.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

EVENTS_EXCHANGE_CODES = {"activate": 65516, "deactivate": 65517}
ACCOUNT_FAULTS = ("api_5xx_storm", "rate_limited", "api_hang", "wrong_key", "account_down")
REPLICA_FAULTS = ("kill9", "sigterm", "blackhole", "reset")
KINDS = ("kill9", "sigterm", "close_connections", "stop_app", "consumer_timeout",
         "blackhole", "reset", *ACCOUNT_FAULTS, "poison")
# The bag holds every kind once, the commonest faults of production twice.
BAG = (*KINDS, "kill9", "close_connections")
LOWERED_TIMEOUT_MS = 4000  # the consumer_timeout fault's value on every node
POISON_KINDS = ("not_json", "json_array", "no_client_id", "not_utf8", "too_large", "bad_job")


@dataclass(frozen=True)
class TypePlan:
    """A communicator type of the soak and its simulator account's limits."""

    name: str
    account: str
    max_concurrency: int
    requests_per_second: float
    sims: int


TYPES = (
    TypePlan("Type A", "a", 1, 8.0, 110),
    TypePlan("Type B", "b", 2, 15.0, 110),
    TypePlan("Type C", "c", 1, 4.0, 40),
)


@dataclass(frozen=True)
class Publish:
    """One message to publish ``at_s`` after the start: an event, or poison bytes."""

    at_s: float
    message_id: str
    event: dict[str, Any] | None = None
    raw: bytes | None = None
    priority: int | None = None
    to_work_queue_of: str | None = None  # a poison job straight onto a type's work queue
    what: str = "event"  # event, local_failure, unknown_iccid, poison:<kind>, closing

    @property
    def iccid(self) -> str | None:
        if self.event is None or self.what != "event":
            return None
        ref = self.event.get("device", {}).get("ref_no")
        return ref if isinstance(ref, str) else None


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` at ``at_s`` for ``duration_s`` (0: an instant), on a target."""

    at_s: float
    kind: str
    duration_s: float = 0.0
    replica: int | None = None  # replica faults; None for close_connections means all
    owner_of: str | None = None  # prefer the process that owns this type at run time
    account: str | None = None  # account faults; consumer_timeout's slowed account
    node: int | None = None  # stop_app: index into the broker's stoppable nodes
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [self.kind]
        if self.owner_of:
            parts.append(f"owner of {self.owner_of} (else replica {self.replica})")
        elif self.replica is not None:
            parts.append(f"replica {self.replica}")
        elif self.kind == "close_connections":
            parts.append("every replica")
        if self.account:
            parts.append(f"account {self.account}")
        if self.node is not None:
            parts.append(f"node #{self.node}")
        if self.params:
            parts.append(" ".join(f"{k}={v}" for k, v in sorted(self.params.items())))
        if self.duration_s:
            parts.append(f"for {self.duration_s:.1f} s")
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    seed: int
    minutes: float
    replicas: int
    active_s: float
    publishes: tuple[Publish, ...]
    faults: tuple[Fault, ...]
    without: frozenset[str] = frozenset()  # fault kinds left out


def iccid_of(type_index: int, n: int) -> str:
    """The n-th SIM of the type-index-th type (20 digits, distinct per type)."""
    return f"896101{type_index + 1:02d}{n:012d}"


def make_plan(seed: int, minutes: float, replicas: int = 3, stoppable_nodes: int = 1,
              without: frozenset[str] = frozenset()) -> Plan:
    """The whole plan for ``minutes`` of traffic and faults (the quiet phase follows);
    ``without`` leaves fault kinds out (another plan: the seed replays it only with the
    same kinds left out)."""
    unknown = without - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; the kinds: {', '.join(KINDS)}")
    rng = random.Random(seed)
    active_s = minutes * 60.0
    publishes = _events(rng, active_s)
    faults = _faults(rng, active_s, replicas, stoppable_nodes, without)
    poison = [f for f in faults if f.kind == "poison"]
    publishes = sorted([*publishes, *(_poison(rng, f) for f in poison)],
                       key=lambda p: p.at_s)
    return Plan(seed, minutes, replicas, active_s, tuple(publishes), tuple(faults), without)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _event(rng: random.Random, at_s: float, type_name: str, ref_no: str | None,
           client_id: str, command: str, what: str = "event") -> Publish:
    event: dict[str, Any] = {
        "event_id": _uuid(rng), "event_code": EVENTS_EXCHANGE_CODES[command],
        "client_id": client_id, "occurred_at": "2026-11-25T10:15:00Z",
        "device": {"communicator_type": type_name}}
    if ref_no is not None:
        event["device"]["ref_no"] = ref_no
    roll = rng.random()
    if roll < 0.08:
        event["origin"] = rng.choice(("reconcile", "replay"))
    priority = None
    if 0.08 <= roll < 0.18:
        priority = rng.randint(0, 4)
    elif 0.18 <= roll < 0.26:
        priority = rng.randint(5, 9)
    return Publish(at_s, event["event_id"], event=event, priority=priority, what=what)


def _events(rng: random.Random, active_s: float) -> list[Publish]:
    """About 4 events a second until ``active_s``, in steps of one to four events."""
    areas = {(t, n): rng.choice((0, 0, 1, 1, 2, 3))
             for t, tp in enumerate(TYPES) for n in range(tp.sims)}
    weights = [tp.sims for tp in TYPES]
    out: list[Publish] = []
    at = 1.0
    while at < active_s:
        t = rng.choices(range(len(TYPES)), weights)[0]
        tp = TYPES[t]
        n = rng.randrange(tp.sims)
        sim = iccid_of(t, n)
        base = f"{t + 1}{n:05d}"
        command = "activate" if rng.random() < 0.55 else "deactivate"
        roll = rng.random()
        if roll < 0.55:  # one client, base or an area
            area = rng.randint(0, areas[(t, n)])
            out.append(_event(rng, at, tp.name, sim, base if area == 0 else f"{base}-{area}",
                              command))
        elif roll < 0.75:  # a base and all its linked areas with one click
            for area in range(areas[(t, n)] + 1):
                out.append(_event(rng, at + 0.01 * area, tp.name, sim,
                                  base if area == 0 else f"{base}-{area}", command))
        elif roll < 0.92:  # commission and decommission of one SIM close together
            flips = rng.choice((2, 2, 3))
            gap = 0.0
            for k in range(flips):
                flipped = command if k % 2 == 0 else _other(command)
                out.append(_event(rng, at + gap, tp.name, sim, base, flipped))
                gap += rng.choice((0.0, 0.05, 0.3, 1.0))
        elif roll < 0.96:  # fails without a call
            ref, type_name = rng.choice((("12", tp.name), (None, tp.name), (sim, "Type Z")))
            out.append(_event(rng, at, type_name, ref, base, command, "local_failure"))
        else:  # an ICCID the account does not know (20000001)
            out.append(_event(rng, at, tp.name, f"8999{t + 1:02d}{n:014d}", base, command,
                              "unknown_iccid"))
        at += rng.uniform(0.2, 0.6)
    return sorted(out, key=lambda p: p.at_s)


def _other(command: str) -> str:
    return "deactivate" if command == "activate" else "activate"


def _poison(rng: random.Random, fault: Fault) -> Publish:
    kind = str(fault.params["message"])
    mid = f"poison-{_uuid(rng)}"
    raw = {
        "not_json": b"<alarm>not json</alarm>",
        "json_array": b'[{"event_id": "x"}]',
        "no_client_id": b'{"event_id": "x", "event_code": 65516}',
        "not_utf8": b'{"client_id": "\xff\xfe"}',
        "too_large": b'{"client_id": "1", "pad": "' + b"x" * 70_000 + b'"}',
        "bad_job": b'{"not": "a job"}',
    }[kind]
    work_of = str(fault.params["type"]) if kind == "bad_job" else None
    return Publish(fault.at_s, mid, raw=raw, to_work_queue_of=work_of, what=f"poison:{kind}")


class _Busy:
    """What the plan has already booked: per key, the end of its current fault."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}

    def free(self, key: str, at: float) -> bool:
        return self.until.get(key, -1.0) <= at

    def book(self, key: str, end: float) -> None:
        self.until[key] = max(self.until.get(key, -1.0), end)


def _faults(rng: random.Random, active_s: float, replicas: int,
            stoppable_nodes: int, without: frozenset[str] = frozenset()) -> list[Fault]:
    busy = _Busy()
    down_until = [-1.0] * replicas  # replicas away (killed, stopping, blackholed)
    bag: list[str] = []
    out: list[Fault] = []
    at = rng.uniform(4.0, 8.0)
    end_by = active_s - 3.0  # every fault healed before the quiet phase
    while at < end_by:
        if not bag:
            bag = [kind for kind in BAG if kind not in without]
            rng.shuffle(bag)
            if not bag:
                break
        # the first kind in the bag whose target is free now; the others wait their turn
        for i in range(len(bag) - 1, -1, -1):
            fault = _one(rng, bag[i], at, end_by, replicas, stoppable_nodes, busy, down_until)
            if fault is not None:
                out.append(fault)
                del bag[i]
                break
        at += rng.uniform(2.0, 6.0)
    return out


def _one(rng: random.Random, kind: str, at: float, end_by: float, replicas: int,
         stoppable_nodes: int, busy: _Busy, down_until: list[float]) -> Fault | None:
    """One fault of ``kind`` at ``at`` if its target is free, else None (skipped)."""
    def span(low: float, high: float) -> float:
        return round(min(rng.uniform(low, high), max(0.5, end_by - at)), 2)

    type_names = [tp.name for tp in TYPES]
    if kind in REPLICA_FAULTS or kind == "close_connections":
        replica = rng.randrange(replicas)
        owner_of = rng.choice(type_names) if rng.random() < 0.5 else None
        if kind == "close_connections":
            if rng.random() < 0.4:
                return Fault(at, kind)
            return Fault(at, kind, replica=replica, owner_of=owner_of)
        # never every replica away at once: the plan counts the worst case
        away = sum(1 for until in down_until if until > at)
        if not busy.free(f"replica{replica}", at) or (kind != "reset" and away >= replicas - 1):
            return None
        if kind == "kill9":
            duration = span(0.5, 6.0)  # until the restart
            params: dict[str, Any] = {}
        elif kind == "sigterm":
            duration = span(0.5, 4.0)  # after the exit, until the restart
            params = {}
        elif kind == "blackhole":
            duration = span(3.0, 40.0)
            params = {}
        else:  # reset
            duration = span(0.5, 4.0)
            params = {}
        # a SIGTERM may take the grace period (10 s) to end, a restart ~10 s to be ready
        booked = at + duration + (25.0 if kind in ("kill9", "sigterm") else 2.0)
        busy.book(f"replica{replica}", booked)
        if kind != "reset":
            down_until[replica] = max(down_until[replica], booked)
        return Fault(at, kind, duration, replica=replica, owner_of=owner_of, params=params)
    if kind == "stop_app":
        node = rng.randrange(stoppable_nodes)
        if not (busy.free("broker", at) and busy.free("timeout", at)):
            return None
        duration = span(3.0, 15.0)
        busy.book("broker", at + duration + 10.0)
        return Fault(at, kind, duration, node=node)
    if kind == "consumer_timeout":
        account = rng.choice(TYPES).account
        if not (busy.free("broker", at) and busy.free("timeout", at)
                and busy.free(account, at)):
            return None
        duration = span(10.0, 25.0)
        busy.book("timeout", at + duration + 5.0)
        busy.book(account, at + duration + 2.0)
        return Fault(at, kind, duration, account=account,
                     params={"timeout_ms": LOWERED_TIMEOUT_MS, "latency_s": 1.5})
    if kind in ACCOUNT_FAULTS:
        free = [tp.account for tp in TYPES if busy.free(tp.account, at)]
        if not free:
            return None
        account = rng.choice(free)
        if kind == "api_5xx_storm":
            status, code, html = rng.choice(((500, "30000001", False), (503, None, True),
                                             (502, None, True)))
            duration = span(3.0, 20.0)
            params = {"fail_every": rng.choice((1, 1, 2, 3)), "http_status": status,
                      "code": code, "html": html}
        elif kind == "rate_limited":
            duration = span(5.0, 20.0)
            params = {"fail_every": rng.choice((2, 3, 4))}
        elif kind == "api_hang":
            duration = span(3.0, 15.0)
            params = {"latency_s": 30.0}
        elif kind == "wrong_key":
            duration = span(5.0, 30.0)
            params = {}
        else:  # account_down
            duration = span(5.0, 30.0)
            params = {"mode": rng.choice(("refuse", "html503"))}
        busy.book(account, at + duration + 2.0)
        return Fault(at, kind, duration, account=account, params=params)
    assert kind == "poison", kind
    message = rng.choice(POISON_KINDS)
    params = {"message": message}
    if message == "bad_job":
        params["type"] = rng.choice(type_names)
    return Fault(at, kind, params=params)
