"""Attacks on ``capsa serve`` between tenants (issue 23, items 4, 5 and 9): a caller with its own
valid API key reaches another tenant's sandboxes (list, inspect, read the access token, extend,
kill, connect, run commands), exceeds its tenant's limits, races the global cap, or reads sandbox
ids from ``/metrics`` without any key. Two real servers, driven through the real ``e2b`` SDK and
raw HTTP: one with tenants ``alpha``, ``beta`` and ``gamma`` (limited) and no pool, one with a
warm code-interpreter pool and ``--max-sandboxes 2`` for the race."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import NotFoundException, RateLimitException, Sandbox  # noqa: E402

from tests.server.conftest import API_KEY, Server, start_server  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

KEY_A = f"alpha-{secrets.token_hex(16)}"
KEY_B = f"beta-{secrets.token_hex(16)}"
KEY_G = f"gamma-{secrets.token_hex(16)}"
ADMIN = API_KEY  # CAPSA_API_KEY of start_server: the default tenant's admin key
UNKNOWN = "i" + "0" * 20  # a well-formed id no sandbox has
DENIED_NET = "192.0.2.0/24"  # TEST-NET-1: the victim's policy denies it, so a probe is counted
MARK = f"CAPSA_TEST_TENANTS_MARK={secrets.token_hex(8)}"  # in the environment of the server's QEMUs


def _sdk(server: Server, key: str) -> dict[str, Any]:
    return {"api_key": key, "api_url": server.url, "sandbox_url": server.url, "retries": 0}


def _hdr(key: str) -> dict[str, str]:
    return {"X-API-KEY": key}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.txt"
    keys.write_text(
        "# three tenants; CAPSA_API_KEY is the admin\n"
        f"{KEY_A} tenant=alpha\n"
        f"{KEY_B} tenant=beta\n"
        f"{KEY_G} tenant=gamma max_sandboxes=1 creates_per_minute=2\n"
    )
    name, _, value = MARK.partition("=")
    srv = start_server(
        tmp,
        *("--api-key-file", str(keys), "--memory", "256", "--max-sandboxes", "6"),
        env={name: value},
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def victim(server: Server) -> Iterator[dict[str, Any]]:
    """Tenant alpha's sandbox, created without ``secure`` (E2B's older SDKs' opt-out of the access
    token) and with a network whose policy denies ``DENIED_NET``."""
    reply = httpx.post(
        f"{server.url}/v2/sandboxes",
        headers=_hdr(KEY_A),
        json={
            "templateID": "base",
            "timeout": 600,
            "secure": False,
            "metadata": {"owner": "alpha"},
            "network": {"deny_out": [DENIED_NET]},
        },
        timeout=180,
    )
    assert reply.status_code == 201, reply.text
    created = reply.json()
    yield created
    httpx.delete(f"{server.url}/sandboxes/{created['sandboxID']}", headers=_hdr(KEY_A), timeout=60)


def _listed(server: Server, key: str) -> list[dict[str, Any]]:
    ids = []
    for path in ("/sandboxes", "/v2/sandboxes"):
        reply = httpx.get(f"{server.url}{path}", headers=_hdr(key), timeout=30)
        assert reply.status_code == 200
        ids.append(reply.json())
    assert ids[0] == ids[1]
    return list(ids[0])


def test_other_tenant_does_not_list_the_sandbox(server: Server, victim: dict[str, Any]) -> None:
    """Attack: tenant beta lists the server's sandboxes to learn alpha's ids and metadata."""
    sid = victim["sandboxID"]
    assert sid not in [s["sandboxID"] for s in _listed(server, KEY_B)]
    assert sid not in [s.sandbox_id for s in Sandbox.list(**_sdk(server, KEY_B)).next_items()]
    assert [s["sandboxID"] for s in _listed(server, KEY_A)] == [sid]
    assert [s.sandbox_id for s in Sandbox.list(**_sdk(server, KEY_A)).next_items()] == [sid]


# every control-plane route that names a sandbox, with a body that would change it
ROUTES = [
    ("GET", "/sandboxes/{}", None),
    ("POST", "/sandboxes/{}/timeout", {"timeout": 2}),
    ("POST", "/sandboxes/{}/refreshes", {"duration": 2}),
    ("POST", "/sandboxes/{}/connect", {"timeout": 2}),
    ("POST", "/v2/sandboxes/{}/connect", {"timeout": 2}),
    ("POST", "/sandboxes/{}/resume", {"timeout": 2}),
    ("GET", "/sandboxes/{}/metrics", None),
    ("POST", "/sandboxes/{}/pause", None),
    ("POST", "/sandboxes/{}/fork", None),
    ("POST", "/sandboxes/{}/snapshots", None),
    ("PUT", "/sandboxes/{}/network", {"allow_out": ["0.0.0.0/0"]}),
    ("DELETE", "/sandboxes/{}", None),
]


def test_other_tenant_gets_not_found_on_every_route(server: Server, victim: dict[str, Any]) -> None:
    """Attack: tenant beta, knowing alpha's sandbox id, inspects it (reading its access token),
    shortens or extends its timeout, connects to it, pauses, forks or kills it. Each answer must
    be the one an unknown id gets (no existence oracle), and the sandbox must be unchanged."""
    sid = victim["sandboxID"]
    before = httpx.get(f"{server.url}/sandboxes/{sid}", headers=_hdr(KEY_A)).json()
    for method, path, body in ROUTES:
        replies = [
            httpx.request(method, server.url + path.format(target), headers=_hdr(KEY_B), json=body)
            for target in (sid, UNKNOWN)
        ]
        assert replies[0].status_code == replies[1].status_code == 404, (method, path)
        assert replies[0].text.replace(sid, UNKNOWN) == replies[1].text, (method, path)
        assert victim["envdAccessToken"] not in replies[0].text
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sid, **_sdk(server, KEY_B))
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(sid, 1, **_sdk(server, KEY_B))
    with pytest.raises(NotFoundException):
        Sandbox.connect(sid, **_sdk(server, KEY_B))
    assert Sandbox.kill(sid, **_sdk(server, KEY_B)) is False
    after = httpx.get(f"{server.url}/sandboxes/{sid}", headers=_hdr(KEY_A))
    assert after.status_code == 200
    assert (after.json()["state"], after.json()["endAt"]) == ("running", before["endAt"])


def test_other_tenant_cannot_drive_envd(server: Server, victim: dict[str, Any]) -> None:
    """Attack: tenant beta drives alpha's sandbox (created with ``secure=False``) through envd
    and the code interpreter: with the token the control plane would hand out, with its own API
    key instead of a token, or with none."""
    sid = victim["sandboxID"]
    with pytest.raises(NotFoundException):  # the only way the SDK gets a token for an id
        Sandbox.connect(sid, **_sdk(server, KEY_B)).commands.run("id")
    envd = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"}
    for extra in ({}, {"X-API-KEY": KEY_B}, {"X-Access-Token": KEY_B}, {"X-Access-Token": ""}):
        reply = httpx.post(
            f"{server.url}/process.Process/List", json={}, headers={**envd, **extra}, timeout=30
        )
        assert (reply.status_code, reply.json()["code"]) == (401, "unauthenticated")
        files = httpx.get(
            f"{server.url}/files", params={"path": "/etc/hostname"}, headers={**envd, **extra}
        )
        assert files.status_code == 401
        execute = httpx.post(
            f"{server.url}/execute",
            json={"code": "1"},
            headers={**envd, "E2b-Sandbox-Port": "49999", **extra},
        )
        assert execute.status_code == 401
    own = Sandbox.connect(sid, **_sdk(server, KEY_A))  # its owner still drives it
    assert own.commands.run("echo mine").stdout == "mine\n"


def test_admin_key_sees_every_tenant(server: Server, victim: dict[str, Any]) -> None:
    """The operator's key (CAPSA_API_KEY: admin) lists and inspects every tenant's sandboxes,
    each with its tenant, while a plain tenant key sees only its own."""
    sid = victim["sandboxID"]
    [listed] = [s for s in _listed(server, ADMIN) if s["sandboxID"] == sid]
    assert (listed["tenant"], listed["metadata"]) == ("alpha", {"owner": "alpha"})
    assert Sandbox.get_info(sid, **_sdk(server, ADMIN)).metadata == {"owner": "alpha"}


@pytest.mark.timeout(240)
def test_tenant_limits(server: Server, victim: dict[str, Any]) -> None:
    """Attack: tenant gamma (max_sandboxes=1, creates_per_minute=2) holds more sandboxes than it
    may, or churns creates (create, kill, create, ...) to keep the host booting VMs."""
    opts = _sdk(server, KEY_G)
    first = Sandbox.create(timeout=120, **opts)
    try:
        with pytest.raises(RateLimitException, match="tenant 'gamma' may hold at most 1 sandbox"):
            Sandbox.create(timeout=120, **opts)
    finally:
        first.kill()
    second = Sandbox.create(timeout=120, **opts)
    second.kill()
    with pytest.raises(RateLimitException, match="at most 2 sandboxes per minute"):
        Sandbox.create(timeout=120, **opts)
    # the other tenants are not held back by gamma's limits
    assert httpx.get(f"{server.url}/sandboxes/{victim['sandboxID']}", headers=_hdr(KEY_A)).is_success


def _vms() -> int:
    """The QEMU processes of the tenants server (they inherit ``MARK`` from its environment)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"qemu-system" in (entry / "cmdline").read_bytes():
                    count += MARK.encode() in (entry / "environ").read_bytes()
            except OSError:
                continue
    return count


@pytest.mark.timeout(240)
def test_concurrent_resumes_build_one_vm(server: Server, victim: dict[str, Any]) -> None:
    """Attack: a tenant pauses its sandbox, then connects to it many times at once, so that each
    connect restores a VM of its own: all but one keep running untracked, outside every cap."""
    sandbox = Sandbox.create(timeout=120, **_sdk(server, KEY_B))
    try:
        sandbox.files.write("/root/kept", "yes")
        held = _vms()
        sandbox.pause()

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, headers=_hdr(KEY_B), timeout=120) as c:
                url = f"/sandboxes/{sandbox.sandbox_id}/connect"
                return await asyncio.gather(*(c.post(url, json={"timeout": 120}) for _ in range(4)))

        replies = asyncio.run(burst())
        assert [r.status_code for r in replies] == [200] * 4, [r.text[:100] for r in replies]
        deadline = time.monotonic() + 15
        while _vms() > held and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _vms() <= held
        again = Sandbox.connect(sandbox.sandbox_id, **_sdk(server, KEY_B))
        assert again.files.read("/root/kept") == "yes"
    finally:
        Sandbox.kill(sandbox.sandbox_id, **_sdk(server, KEY_B))


def _series(text: str, sandbox_id: str) -> list[str]:
    return [line for line in text.splitlines() if f'sandbox="{sandbox_id}"' in line]


def test_metrics_need_a_key_and_show_only_own_sandboxes(server: Server, victim: dict[str, Any]) -> None:
    """Attack: anyone who can reach the port reads ``/metrics`` without a key and learns the
    sandbox ids (the per-sandbox egress series); a tenant's scrape learns other tenants' ids."""
    sid = victim["sandboxID"]
    owner = Sandbox.connect(sid, **_sdk(server, KEY_A))
    owner.commands.run("timeout 5 bash -c 'exec 3<>/dev/tcp/192.0.2.1/80' || true", timeout=60)
    anonymous = httpx.get(f"{server.url}/metrics")
    assert anonymous.status_code == 401
    assert sid not in anonymous.text
    wrong = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    scrapes = {
        key: httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"})
        for key in (KEY_A, KEY_B, ADMIN)
    }
    assert all(reply.status_code == 200 for reply in scrapes.values())
    assert _series(scrapes[KEY_A].text, sid), scrapes[KEY_A].text
    assert _series(scrapes[ADMIN].text, sid)
    assert sid not in scrapes[KEY_B].text
    assert "capsa_server_sandboxes_running" in scrapes[KEY_B].text  # server-wide series stay


def test_other_tenant_cannot_read_guest_metrics(server: Server, victim: dict[str, Any]) -> None:
    """Attack: tenant beta reads alpha's guest samples (CPU, memory, disk: what alpha's code is
    doing) through the batch endpoint, which takes any list of ids, or the per-sandbox route."""
    sid = victim["sandboxID"]
    url = f"{server.url}/sandboxes/metrics"
    deadline = time.monotonic() + 60  # the server samples every 5 s
    own: dict[str, Any] = {}
    while sid not in own and time.monotonic() < deadline:
        time.sleep(0.5)
        reply = httpx.get(url, params={"sandbox_ids": sid}, headers=_hdr(KEY_A))
        assert reply.status_code == 200, reply.text
        own = reply.json()["sandboxes"]
    assert own[sid]["memTotal"] > 0
    for ids in (sid, f"{UNKNOWN},{sid}"):
        stolen = httpx.get(url, params={"sandbox_ids": ids}, headers=_hdr(KEY_B))
        assert stolen.status_code == 200
        assert stolen.json() == {"sandboxes": {}}
    with pytest.raises(NotFoundException):
        Sandbox.get_metrics(sid, **_sdk(server, KEY_B))
    assert Sandbox.get_metrics(sid, **_sdk(server, KEY_A))


# -- the --max-sandboxes race (item 5) --

RACE_CAP = 2
RACE_CREATES = 6


@pytest.fixture(scope="module")
def race_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``--max-sandboxes 2`` with two code-interpreter sandboxes kept warm: a create from them
    suspends (sending the create's envVars to the interpreter) after the VM is taken."""
    tmp = tmp_path_factory.mktemp("race")
    srv = start_server(
        tmp,
        *("--memory", "256", "--pool", f"code-interpreter-v1={RACE_CAP}"),
        *("--max-sandboxes", str(RACE_CAP)),
    )
    try:
        _wait_for_log(srv.log, f"interpreter sandboxes warm: {RACE_CAP} of {RACE_CAP}", 150)
        yield srv
    finally:
        srv.stop()


def _wait_for_log(log: Path, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.timeout(300)
def test_concurrent_creates_do_not_pass_the_cap(race_server: Server) -> None:
    """Attack: a client fires many creates at once, so that several pass the ``--max-sandboxes``
    check before any of them is counted (on main: 4 sandboxes under a cap of 2)."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=race_server.url, headers=_hdr(ADMIN), timeout=240) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/v2/sandboxes",
                        json={"templateID": "code-interpreter-v1", "envVars": {"N": str(n)}},
                    )
                    for n in range(RACE_CREATES)
                )
            )

    replies = asyncio.run(burst())
    created = [r.json()["sandboxID"] for r in replies if r.status_code == 201]
    try:
        refused = [r for r in replies if r.status_code == 429]
        assert len(created) == RACE_CAP, [(r.status_code, r.text[:100]) for r in replies]
        assert len(refused) == RACE_CREATES - RACE_CAP
        assert all("--max-sandboxes" in r.json()["message"] for r in refused)
        assert len(_listed(race_server, ADMIN)) == RACE_CAP
    finally:
        for sid in created:
            httpx.delete(f"{race_server.url}/sandboxes/{sid}", headers=_hdr(ADMIN), timeout=60)
    assert _listed(race_server, ADMIN) == []
