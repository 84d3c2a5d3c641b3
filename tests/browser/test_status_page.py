"""The status page in a real browser, against the running service and the simulator.

Two communicator types, one with a wrong key in its ``api_key_file``: within 10 s the page
shows that one paused and why, the other running; once the key is fixed, running again.
With two replicas, the standby's page shows the owner's figures; an idle owner is found
without any event, and a killed owner's facts age out of the page. No page logs a console
error, and neither the page nor ``/status.json`` holds a secret.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from jasper_consumer.status import PAUSE_WORDS
from jasper_consumer.statusboard import TTL_S

from ..reliability.conftest import Harness, iccid, make_event, type_, wait_until
from .conftest import Browser

pytestmark = pytest.mark.timeout(150)

PAUSED_WITHIN_S = 10.0
# The README's screenshot: STATUS_PAGE_SCREENSHOT=docs/status-page.png pytest tests/browser
SCREENSHOT_TO = os.environ.get("STATUS_PAGE_SCREENSHOT")


def secrets() -> dict[str, str]:
    """Distinctive user names and keys, so that any of them on a page is found."""
    tag = uuid.uuid4().hex[:8]
    return {"user_nz": f"nz-user-{tag}", "key_nz": f"nz-key-{tag}",
            "user_au": f"au-user-{tag}", "key_au": f"au-key-{tag}",
            "wrong_au": f"au-wrong-key-{tag}"}


def jobs(type_name: str, first: int, count: int, *, lane: str) -> list[dict[str, Any]]:
    """Work-queue jobs as the router writes them, stamped with the time it received them."""
    return [{"event_id": str(uuid.uuid4()), "event_code": 65516, "client_id": f"1002{n:02d}",
             "command": "activate", "iccid": iccid(n), "communicator_type": type_name,
             "lane": lane, "received_at": time.time() - 0.2} for n in range(first, first + count)]


async def page_json(harness: Harness, port: int) -> dict[str, Any]:
    async with harness.http.get(f"http://127.0.0.1:{port}/status.json") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def page_html(harness: Harness, port: int) -> str:
    async with harness.http.get(f"http://127.0.0.1:{port}/") as resp:
        assert resp.status == 200
        return await resp.text()


def by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in data["communicator_types"]}


def assert_no_secret(texts: list[str], found_in: dict[str, str]) -> None:
    """None of the secrets (nor the broker's URL or password) is in any of ``texts``;
    a failure names the secret, never shows it."""
    leaked = [name for name, secret in found_in.items() if any(secret in t for t in texts)]
    leaked += [what for what in ("amqp://", "guest") if any(what in t for t in texts)]
    assert leaked == []


async def test_a_paused_type_beside_a_running_one(harness: Harness, browser: Browser) -> None:
    """A wrong key pauses M2MOne AU: within 10 s the page shows it PAUSED with the reason,
    M2MOne NZ RUNNING; after the key file is fixed, AU is RUNNING again. No console error,
    no secret in the page or its JSON."""
    s = secrets()
    key_file = harness.tmp / "au.key"
    key_file.write_text(s["wrong_au"] + "\n")
    nz = type_("n", 1, 5, name="M2MOne NZ", username=s["user_nz"], api_key=s["key_nz"])
    au = {**type_("a", 1, 5, name="M2MOne AU", username=s["user_au"]), "api_key": None,
          "api_key_file": str(key_file)}
    await harness.setup([nz, au], account_keys={s["user_au"]: s["key_au"]})
    await harness.start_service()
    url = f"http://127.0.0.1:{harness.ports[-1]}/"

    published = time.monotonic()
    await harness.publish([make_event(iccid(900 + n), "M2MOne AU") for n in range(3)]
                          + [make_event("89990000000000000001", "M2MOne NZ")])
    await harness.publish_jobs(harness.work_queue("M2MOne NZ"),
                               jobs("M2MOne NZ", 0, 6, lane="interactive")
                               + jobs("M2MOne NZ", 10, 4, lane="bulk"))

    async def au_paused_nz_running() -> bool:
        loaded = await browser.load(url)
        return (loaded.types.get("M2MOne AU", ("", ""))[0] == "paused"
                and loaded.types.get("M2MOne NZ", ("", ""))[0] == "running")

    await wait_until(au_paused_nz_running, "the page to show M2MOne AU paused, NZ running",
                     PAUSED_WITHIN_S - (time.monotonic() - published), poll=0.25)
    shown = time.monotonic() - published
    loaded = await browser.load(url)
    _state, text = loaded.types["M2MOne AU"]
    assert "PAUSED" in text
    assert " ".join(PAUSE_WORDS["10000001"].split()[:6]) in " ".join(text.split())
    assert "Invalid credentials" in text
    assert "10000001, HTTP 401" in text
    assert "next probe" in text
    assert "RUNNING" in loaded.types["M2MOne NZ"][1]
    print(f"status page: paused type shown {shown:.1f} s after the publish")

    async def nz_figures() -> bool:  # the NZ jobs done, and their latency on the page
        nz_facts = by_name(await page_json(harness, harness.ports[-1]))["M2MOne NZ"]
        # 6 jobs put straight on the work queue, and the routed event that failed
        return (nz_facts["time_to_final"]["interactive"]["count"] == 7
                and nz_facts["time_to_final"]["bulk"]["count"] == 4
                and len(nz_facts["failures"]) == 1)

    await wait_until(nz_figures, "NZ's latency and failure on the page", 20, poll=0.25)
    loaded = await browser.load(url)
    nz_text = loaded.types["M2MOne NZ"][1]
    assert "interactive: p50" in nz_text
    assert "bulk: p50" in nz_text
    assert "89990000000000000001" in nz_text
    assert "20000001" in nz_text
    await browser.screenshot(harness.tmp / "status-page.png")
    if SCREENSHOT_TO:
        shutil.copyfile(harness.tmp / "status-page.png", Path(SCREENSHOT_TO))
    assert_no_secret([loaded.source, await page_html(harness, harness.ports[-1]),
                      str(await page_json(harness, harness.ports[-1]))], s)

    key_file.write_text(f"  {s['key_au']}  \n")

    async def au_running() -> bool:
        return (await browser.load(url)).types.get("M2MOne AU", ("", ""))[0] == "running"

    await wait_until(au_running, "the page to show M2MOne AU running again", 45, poll=0.5)
    assert "RUNNING" in (await browser.load(url)).types["M2MOne AU"][1]
    assert browser.errors() == []


async def test_the_standby_shows_the_owners_figures(harness: Harness, browser: Browser) -> None:
    """Two replicas: the standby's page names the owner and shows its failures and
    latency, the same as the owner's own page; a client id ``<script>`` is shown as text."""
    s = secrets()
    await harness.setup([type_("n", 1, 20, name="M2MOne NZ", username=s["user_nz"],
                               api_key=s["key_nz"])])
    first = await harness.start_service()
    second = await harness.start_service()
    pids = {first.popen.pid: harness.ports[0], second.popen.pid: harness.ports[1]}
    evil = "<script>alert('x')</script>"
    await harness.publish([make_event("89990000000000000002", "M2MOne NZ", client_id=evil)])
    await harness.publish_jobs(harness.work_queue("M2MOne NZ"),
                               jobs("M2MOne NZ", 0, 5, lane="interactive"))

    async def settled_on_both() -> bool:
        for port in pids.values():
            t = by_name(await page_json(harness, port))["M2MOne NZ"]
            # 5 jobs put straight on the work queue, and the routed event that failed
            if (t["owner"] is None or t["time_to_final"]["interactive"]["count"] != 6
                    or len(t["failures"]) != 1 or len(t["standbys"]) != 1):
                return False
        return True

    await wait_until(settled_on_both, "both replicas' pages to show the owner's figures", 30,
                     poll=0.25)
    owner_pid = by_name(await page_json(harness, harness.ports[0]))["M2MOne NZ"]["owner"]["pid"]
    assert owner_pid in pids
    standby_pid = next(pid for pid in pids if pid != owner_pid)
    owner_view = by_name(await page_json(harness, pids[owner_pid]))["M2MOne NZ"]
    standby_view = by_name(await page_json(harness, pids[standby_pid]))["M2MOne NZ"]
    same = ("owner", "standbys", "failures", "time_to_final", "requests_per_second",
            "max_concurrency", "state")
    assert {k: standby_view[k] for k in same} == {k: owner_view[k] for k in same}
    assert standby_view["standbys"][0]["pid"] == standby_pid

    loaded = await browser.load(f"http://127.0.0.1:{pids[standby_pid]}/")
    state, text = loaded.types["M2MOne NZ"]
    assert state == "running"
    assert f"pid {owner_pid}" in text.split("Standbys")[0]
    assert f"pid {standby_pid}" in text.split("Standbys")[1]
    assert "interactive: p50" in text
    assert evil in text  # the client id, as text
    assert "<script>alert" not in loaded.source  # escaped in the DOM too
    assert browser.errors() == []
    assert_no_secret([loaded.source, str(await page_json(harness, pids[standby_pid]))], s)


async def test_an_idle_owner_is_found_and_a_dead_one_ages_out(harness: Harness) -> None:
    """Two replicas and no event: the page names the owner all the same (a wake token tells
    the idle owner). After kill -9 of the owner its facts are never shown older than the
    TTL, and the standby's page then shows the standby as the owner."""
    await harness.setup([type_("n", 1, 20, name="M2MOne NZ")])
    first = await harness.start_service()
    second = await harness.start_service()
    procs = {first.popen.pid: (first, harness.ports[0]),
             second.popen.pid: (second, harness.ports[1])}

    async def owner_on_both() -> bool:
        owners = {str(by_name(await page_json(harness, port))["M2MOne NZ"]["owner"])
                  for _, port in procs.values()}
        return len(owners) == 1 and owners != {"None"}

    await wait_until(owner_on_both, "both pages to name the idle type's owner", 15, poll=0.25)
    owner = by_name(await page_json(harness, harness.ports[0]))["M2MOne NZ"]["owner"]["pid"]
    standby = next(pid for pid in procs if pid != owner)
    procs[owner][0].kill9()
    killed = time.monotonic()
    ages: list[float] = []

    async def standby_owns() -> bool:
        t = by_name(await page_json(harness, procs[standby][1]))["M2MOne NZ"]
        if t["owner"] is not None and t["owner"]["pid"] == owner:
            ages.append(t["facts_age_s"])
        return t["owner"] is not None and t["owner"]["pid"] == standby

    await wait_until(standby_owns, "the standby's page to show it owns the type", 30, poll=0.2)
    took_over = time.monotonic() - killed

    async def dead_one_gone() -> bool:  # the killed process's last report ages out
        return [p["pid"] for p in (await page_json(harness, procs[standby][1]))["processes"]] \
            == [standby]

    await wait_until(dead_one_gone, "the killed process to leave the page", TTL_S + 5, poll=0.2)
    data = await page_json(harness, procs[standby][1])
    print(f"status page: the standby owns the type {took_over:.1f} s after the kill (its "
          f"anchor came back), the dead process gone after {time.monotonic() - killed:.1f} s; "
          f"its facts shown at most {max(ages, default=0):.1f} s old")
    assert max(ages, default=0.0) <= TTL_S
    assert by_name(data)["M2MOne NZ"]["standbys"] == []
