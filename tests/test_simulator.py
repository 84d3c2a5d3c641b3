"""The Jasper simulator, over real sockets, as the service and the tests see it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from jasper_consumer.config import parse_settings
from jasper_consumer.simulator import Account, Simulator, accounts_from_settings

ICCID = "89610000000000000001"
AUTH = {"Authorization": aiohttp.encode_basic_auth("patriot-api", "secret-key")}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator()
    simulator.add_account("patriot-api", "secret-key")
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, sim: Simulator, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    """One request to ``{base_url}{path}``: its status and JSON body."""
    async with http.request(method, sim.base_url + path, **kwargs) as response:
        return response.status, await response.json()


async def put_status(http: aiohttp.ClientSession, sim: Simulator, status: str) -> tuple[int, Any]:
    return await call(http, sim, "PUT", f"/devices/{ICCID}", json={"status": status})


async def test_activate_then_get_shows_activated(sim, http):
    """A PUT to ACTIVATED answers the ICCID and a GET then shows the SIM ACTIVATED."""
    assert await put_status(http, sim, "ACTIVATED") == (200, {"iccid": ICCID})

    status, body = await call(http, sim, "GET", f"/devices/{ICCID}")

    assert (status, body["status"], body["iccid"]) == (200, "ACTIVATED", ICCID)
    assert body["dateActivated"] is not None
    assert sim.status(ICCID) == "ACTIVATED"
    assert [r.method for r in sim.calls(ICCID)] == ["PUT", "GET"]
    assert sim.calls(ICCID, "PUT")[0].requested_status == "ACTIVATED"


async def test_echo_returns_the_word(sim, http):
    """Echo answers the word it was given as ``context``."""
    assert await call(http, sim, "GET", "/echo/hello") == (200, {"context": "hello"})


async def test_wrong_key_is_invalid_credentials(sim):
    """A wrong API key gets 401 with error 10000001."""
    wrong_key = {"Authorization": aiohttp.encode_basic_auth("patriot-api", "nope")}
    async with aiohttp.ClientSession(headers=wrong_key) as http:
        status, body = await call(http, sim, "GET", "/echo/x")

    assert (status, body["errorCode"]) == (401, "10000001")


async def test_no_auth_is_401_without_error_code(sim):
    """A request without credentials gets 401 with only an ``errorMessage``."""
    async with aiohttp.ClientSession() as http:
        status, body = await call(http, sim, "GET", "/echo/x")

    assert (status, list(body)) == (401, ["errorMessage"])


async def test_unknown_iccid_is_not_found(sim, http):
    """An ICCID starting 8999 or listed as unknown gets 404 with error 20000001."""
    sim.unknown_iccids.add(ICCID)

    for iccid in ("89990000000000000000", ICCID):
        status, body = await call(http, sim, "PUT", f"/devices/{iccid}",
                                  json={"status": "ACTIVATED"})
        assert (status, body["errorCode"]) == (404, "20000001")
    assert sim.status(ICCID) is None


async def test_other_api_version_is_invalid(sim, http):
    """A call under ``/rws/api/v2`` gets 400 with error 10000024."""
    url = sim.base_url.replace("/v1", "/v2") + "/echo/x"
    async with http.get(url) as response:
        assert (response.status, (await response.json())["errorCode"]) == (400, "10000024")


async def test_pre_activation_move_is_refused(sim, http):
    """An ACTIVATED SIM cannot go back to TEST_READY: 400 with error 10000029."""
    sim.set_status(ICCID, "ACTIVATED")

    status, body = await put_status(http, sim, "TEST_READY")

    assert (status, body["errorCode"], sim.status(ICCID)) == (400, "10000029", "ACTIVATED")


async def test_malformed_json_and_unknown_status_are_rejected(sim, http):
    """A body that is not JSON gets 10000023; an unknown status gets 10000005."""
    status, body = await call(http, sim, "PUT", f"/devices/{ICCID}", data=b"{nope",
                              headers={"Content-Type": "application/json"})
    assert (status, body["errorCode"]) == (400, "10000023")

    status, body = await put_status(http, sim, "LIVE")
    assert (status, body["errorCode"]) == (400, "10000005")


async def test_already_in_status_succeeds_by_default(sim, http):
    """Setting the status a SIM already has answers 200."""
    sim.set_status(ICCID, "ACTIVATED")

    assert await put_status(http, sim, "ACTIVATED") == (200, {"iccid": ICCID})


async def test_already_in_status_can_be_an_error(sim, http):
    """With ``already_in_status_error`` the same change answers 10030000 and says why."""
    sim.already_in_status_error = True
    sim.set_status(ICCID, "DEACTIVATED")

    status, body = await put_status(http, sim, "DEACTIVATED")

    assert (status, body["errorCode"]) == (400, "10030000")
    assert body["errorMessage"] == "Cannot deactivate a SIM which is already deactivated"


async def test_fail_times_fails_then_succeeds(sim, http):
    """A fault with ``fail_times=2`` fails the next two calls with its code, then clears."""
    sim.set_fault(ICCID, fail_times=2, error_code="30000001", http_status=500)

    answers = [await put_status(http, sim, "ACTIVATED") for _ in range(3)]

    assert [(s, b["errorCode"]) for s, b in answers[:2]] == [(500, "30000001"), (500, "30000001")]
    assert answers[2] == (200, {"iccid": ICCID})
    assert sim.status(ICCID) == "ACTIVATED"


async def test_fault_message_and_padding_shape_the_error_body(sim, http):
    """A fault's ``error_message`` replaces the code's meaning; ``body_pad_bytes`` pads it."""
    sim.set_fault(ICCID, always_fail=True, error_code="10000005", http_status=400,
                  error_message="SIM is already in transition", body_pad_bytes=60_000)

    status, body = await put_status(http, sim, "ACTIVATED")

    assert (status, body["errorCode"]) == (400, "10000005")
    assert body["errorMessage"] == "SIM is already in transition" + "x" * 60_000


async def test_requests_record_the_user_agent(sim, http):
    """Each request record keeps the User-Agent header it came with."""
    await call(http, sim, "GET", "/echo/x", headers={"User-Agent": "jasper-consumer/0 (h pid 1)"})

    assert sim.requests[-1].user_agent == "jasper-consumer/0 (h pid 1)"


async def test_html_fault_answers_an_html_page(sim, http):
    """An ``html`` fault answers its HTTP status with a ``text/html`` page."""
    sim.set_fault(ICCID, always_fail=True, http_status=502, html=True)

    async with http.get(f"{sim.base_url}/devices/{ICCID}") as response:
        text = await response.text()

    assert (response.status, response.content_type) == (502, "text/html")
    assert text.startswith("<html>")


async def test_concurrent_calls_over_max_in_flight_are_rate_limited(sim, http):
    """Two overlapping calls on a one-at-a-time account: one gets 40000029."""
    sim.latency_s = 0.1

    answers = await asyncio.gather(*(call(http, sim, "GET", "/echo/x") for _ in range(2)))

    assert sorted(status for status, _ in answers) == [200, 429]
    assert "40000029" in [body.get("errorCode") for _, body in answers]
    assert (sim.violations, sim.max_in_flight_seen) == (1, {"patriot-api": 1})


async def test_burst_over_requests_per_second_is_rate_limited(sim, http):
    """Six sequential calls at once on a 5-per-second account: the sixth gets 40000029."""
    answers = [await call(http, sim, "GET", "/echo/x") for _ in range(6)]

    assert [status for status, _ in answers] == [200] * 5 + [429]
    assert (answers[5][1]["errorCode"], sim.violations) == ("40000029", 1)


async def test_paced_client_never_trips_the_rate_limit(sim, http):
    """A client that starts calls just over ``1 / requests_per_second`` apart stays under it."""
    for _ in range(6):
        assert (await call(http, sim, "GET", "/echo/x"))[0] == 200
        await asyncio.sleep(0.21)

    assert sim.violations == 0


async def test_admin_api_sets_faults_lists_requests_and_resets(sim, http):
    """The admin API sets a fault, shows the requests and stats, and resets them."""
    admin = sim.base_url.split("/rws/")[0] + "/_sim"
    async with http.put(f"{admin}/faults/{ICCID}", json={"fail_times": 1}) as response:
        assert response.status == 200
    async with http.put(f"{admin}/sims/{ICCID}", json={"status": "DEACTIVATED"}) as response:
        assert response.status == 200

    assert (await put_status(http, sim, "ACTIVATED"))[0] == 500
    async with http.get(f"{admin}/requests") as response:
        records = await response.json()
    async with http.get(f"{admin}/sims/{ICCID}") as response:
        assert (await response.json())["status"] == "DEACTIVATED"
    async with http.post(f"{admin}/reset") as response:
        assert response.status == 200
    async with http.get(f"{admin}/stats") as response:
        stats = await response.json()

    seen = [(r["method"], r["iccid"], r["http_status"], r["error_code"]) for r in records]
    assert seen == [("PUT", ICCID, 500, "30000001")]
    assert stats == {"violations": 0, "violations_by_account": {}, "max_in_flight_seen": {},
                     "requests": 0, "stalls": stats["stalls"]}
    assert sim.status(ICCID) is None


async def test_admin_api_rejects_a_bad_fault(sim, http):
    """A fault with an unknown or mistyped field is refused with 400."""
    admin = sim.base_url.split("/rws/")[0] + "/_sim"
    for body in ({"fail_time": 1}, {"fail_times": "1"}):
        async with http.put(f"{admin}/faults/{ICCID}", json=body) as response:
            assert response.status == 400


async def test_account_down_refuse_drops_the_connection(sim, http):
    """An account set ``down: refuse`` over the admin API gets no HTTP answer at all."""
    admin = sim.base_url.split("/rws/")[0] + "/_sim"
    async with http.put(f"{admin}/accounts/patriot-api", json={"down": "refuse"}) as response:
        assert response.status == 200

    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, sim, "GET", "/echo/x")
    assert sim.requests[-1].http_status == 0


async def test_account_down_html503_answers_a_proxy_page(sim, http):
    """An account set ``down: html503`` gets 503 with an HTML page."""
    sim.accounts["patriot-api"].down = "html503"

    async with http.get(f"{sim.base_url}/echo/x") as response:
        assert (response.status, response.content_type) == (503, "text/html")


async def test_body_over_64_kib_is_rejected(sim, http):
    """A request body over 64 KiB gets 413."""
    async with http.put(f"{sim.base_url}/devices/{ICCID}", data=b"x" * 70_000) as response:
        assert response.status == 413


def test_accounts_come_from_the_communicator_types():
    """Each communicator type becomes an account with its credentials and limits."""
    settings = parse_settings({"communicator_types": [{
        "name": "M2MOne NZ", "server_address": "https://jasper.example/rws/api/v1",
        "username": "nz", "api_key": "k1", "max_concurrency": 2, "requests_per_second": 3}]})

    assert accounts_from_settings(settings) == [Account("nz", "k1", 2, 3.0)]


# --- Search Devices ------------------------------------------------------------------------

SEARCH = "/devices?modifiedSince=2000-01-01T00:00:00Z"


@pytest.fixture
def fast(sim: Simulator) -> Simulator:
    """The test account allows 1,000 calls a second, so searches can follow each other."""
    sim.accounts["patriot-api"].requests_per_second = 1000
    return sim


async def test_search_pages_hold_50_sims_in_iccid_order(fast, http):
    """Search Devices answers pages of 50 in ICCID order; the full last page says lastPage."""
    iccids = fast.add_sim_range("89610000000000001000", 100, "ACTIVATED")

    first = await call(http, fast, "GET", SEARCH + "&pageSize=50&pageNumber=1")
    second = await call(http, fast, "GET", SEARCH + "&pageSize=50&pageNumber=2")
    beyond = await call(http, fast, "GET", SEARCH + "&pageNumber=3")

    assert (first[0], first[1]["pageNumber"], first[1]["lastPage"]) == (200, 1, False)
    assert (second[1]["pageNumber"], second[1]["lastPage"]) == (2, True)
    listed = [d["iccid"] for d in first[1]["devices"] + second[1]["devices"]]
    assert listed == iccids
    assert set(first[1]["devices"][0]) == {"iccid", "status", "ratePlan", "communicationPlan"}
    assert beyond[1] == {"pageNumber": 3, "lastPage": True, "devices": []}


async def test_search_with_a_short_last_page_and_a_smaller_page_size(fast, http):
    """pageSize sets the page length; a short page is the last one."""
    fast.add_sim_range("89610000000000002000", 7, "DEACTIVATED")

    status, body = await call(http, fast, "GET", SEARCH + "&pageSize=5&pageNumber=2")

    assert (status, body["lastPage"], len(body["devices"])) == (200, True, 2)


@pytest.mark.parametrize(("query", "code"), [
    ("/devices?pageSize=50&pageNumber=1", "10000011"),
    ("/devices?modifiedSince=yesterday", "10000012"),
    (SEARCH + "&pageSize=51", "10000028"),
    (SEARCH + "&pageNumber=0", "10000028"),
    (SEARCH + "&sort=iccid", "10000028"),
    (SEARCH + "&status=LIVE", "10000005"),
])
async def test_search_refuses_bad_parameters(fast, http, query, code):
    """A search without modifiedSince, or with a bad parameter, is a 400 Jasper error."""
    status, body = await call(http, fast, "GET", query)

    assert (status, body["errorCode"]) == (400, code)


async def test_search_filters_by_status_and_modified_since(fast, http):
    """status= lists only SIMs of that status; modifiedSince in the future lists none."""
    fast.add_sims({"89610000000000003001": "ACTIVATED", "89610000000000003002": "DEACTIVATED"})

    _, live = await call(http, fast, "GET", SEARCH + "&status=ACTIVATED")
    _, future = await call(http, fast, "GET", "/devices?modifiedSince=2999-01-01T00:00:00Z")

    assert [d["iccid"] for d in live["devices"]] == ["89610000000000003001"]
    assert future["devices"] == []


async def test_each_search_page_counts_against_the_rate_limit(sim, http):
    """Search pages are calls like any other: a burst over the account's rate is refused."""
    results = [await call(http, sim, "GET", SEARCH) for _ in range(6)]

    assert [s for s, _ in results].count(429) == 1
    assert sim.violations == 1
    assert {r.path for r in sim.requests} == {"/rws/api/v1/devices"}


async def test_a_sim_of_an_account_is_only_that_accounts(fast, http):
    """A SIM given to an account is listed and reached only by it; a SIM of no account by all."""
    fast.add_account("other", "other-key", requests_per_second=1000)
    fast.add_sims({"89610000000000004001": "ACTIVATED"}, account="patriot-api")
    fast.add_sims({"89610000000000004002": "ACTIVATED"}, account="other")
    fast.set_status("89610000000000004003", "DEACTIVATED")

    _, mine = await call(http, fast, "GET", SEARCH)
    other_auth = {"Authorization": aiohttp.encode_basic_auth("other", "other-key")}
    async with aiohttp.ClientSession(headers=other_auth) as other:
        _, theirs = await call(other, fast, "GET", SEARCH)
        not_theirs = await call(other, fast, "GET", "/devices/89610000000000004001")

    assert [d["iccid"] for d in mine["devices"]] == ["89610000000000004001",
                                                     "89610000000000004003"]
    assert [d["iccid"] for d in theirs["devices"]] == ["89610000000000004002",
                                                       "89610000000000004003"]
    assert (not_theirs[0], not_theirs[1]["errorCode"]) == (404, "20000001")


async def test_admin_api_creates_many_sims_at_once(sim, http):
    """POST /_sim/sims creates SIMs from a map or a run of consecutive ICCIDs, for an account."""
    admin = sim.base_url.split("/rws/")[0] + "/_sim"
    async with http.post(f"{admin}/sims", json={
            "account": "patriot-api", "sims": {"89610000000000005000": "DEACTIVATED"},
            "first": "89610000000000005001", "count": 1200, "status": "ACTIVATED"}) as response:
        made = (response.status, await response.json())
    async with http.post(f"{admin}/sims", json={"first": "8961", "count": 2}) as response:
        incomplete = response.status
    async with http.post(f"{admin}/sims", json={"sims": {"8961": "LIVE"}}) as response:
        unknown_status = response.status

    assert made == (200, {"created": 1201, "last": "89610000000000006200"})
    assert sim.status("89610000000000006200") == "ACTIVATED"
    assert sim.status("89610000000000005000") == "DEACTIVATED"
    assert (incomplete, unknown_status) == (400, 400)


async def test_account_fail_every_answers_every_nth_call_without_a_violation(sim, http):
    """An account's ``fail_every`` makes every n-th call answer the injected error; those
    injected answers are not counted as violations."""
    admin = sim.base_url.split("/rws/")[0] + "/_sim"
    body = {"fail_every": 2, "fail_http_status": 429, "fail_code": "40000029"}
    async with http.put(f"{admin}/accounts/patriot-api", json=body) as response:
        assert response.status == 200
    sim.accounts["patriot-api"].requests_per_second = 1000

    answers = [(await call(http, sim, "GET", "/echo/x"))[0] for _ in range(4)]

    async with http.get(f"{admin}/stats") as response:
        stats = await response.json()
    assert (answers, stats["violations"], stats["violations_by_account"]) == (
        [200, 429, 200, 429], 0, {})


async def test_account_latency_ends_when_the_caller_hangs_up(sim, http):
    """A call held by the account's ``latency_s`` ends, unanswered and out of the account's
    calls in flight, once its caller gives up: a call right behind it is no violation."""
    account = sim.accounts["patriot-api"]
    account.latency_s, account.requests_per_second = 30.0, 1000

    with pytest.raises(TimeoutError):
        await call(http, sim, "GET", "/echo/x", timeout=aiohttp.ClientTimeout(total=0.3))
    account.latency_s = 0.0
    status, _ = await call(http, sim, "GET", "/echo/y")

    held = sim.requests[0]
    assert (status, sim.violations, held.http_status) == (200, 0, 0)
    assert held.finished - held.started < 1.5
    # it ends as the next call arrives (the account no longer counts it in flight: no
    # violation above), not after that call's answer
    assert held.finished <= sim.requests[1].finished


async def test_admin_requests_since_lists_only_later_requests(sim, http):
    """``/_sim/requests?since=T`` lists only the requests that started at or after T."""
    sim.accounts["patriot-api"].requests_per_second = 1000
    await call(http, sim, "GET", "/echo/a")
    middle = time.monotonic()
    await call(http, sim, "GET", "/echo/b")
    admin = sim.base_url.split("/rws/")[0] + "/_sim"

    async with http.get(f"{admin}/requests", params={"since": str(middle)}) as response:
        records = await response.json()

    assert [r["path"] for r in records] == ["/rws/api/v1/echo/b"]
