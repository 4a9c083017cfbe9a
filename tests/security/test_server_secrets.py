"""Attacks on the secrets of ``capsa serve`` (issue 26): a tenant asks for a secret the operator did
not offer it, a client binds a header rule to a host its own policy denies (the proxy would decrypt
for a host the sandbox may not reach), and the guest tries to read a rule's header value (from its
environment, processes and files, by sending it to a host of its choosing, by a Host header naming
the bound host on a connection to another). A real server with the local HTTPS servers of
tests/secret_servers.py, driven through the real ``e2b`` SDK and raw HTTP."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.secret_servers import (
    API,
    FREE,
    GUEST_GET,
    RULE_VALUE,
    VALUE,
    Upstreams,
    secrets_file,
    upstreams,
)
from tests.server.conftest import API_KEY, Server, start_server

e2b = pytest.importorskip("e2b")
from e2b import Sandbox  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

BLUE = f"blue-{secrets.token_hex(16)}"  # a key of tenant "blue": KEY is offered to "default" only


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Upstreams]]:
    tmp = tmp_path_factory.mktemp("serve-secrets-attacks")
    (tmp / "keys.txt").write_text(f"{BLUE} tenant=blue\n")
    with upstreams() as up:
        server = start_server(
            tmp, "--max-sandboxes", "2", "--api-key-file", str(tmp / "keys.txt"),
            "--secrets-file", str(secrets_file(tmp / "secrets.toml", up)),
            "--upstream-ca", str(up.ca_file), "--dns-server", f"127.0.0.1:{up.dns_port}",
            "--allow-internal-destinations", env={"SECRET_VALUE": VALUE},
        )  # fmt: skip
        try:
            yield server, up
        finally:
            server.stop()


def _create(server: Server, key: str, body: dict[str, Any]) -> httpx.Response:
    reply = httpx.post(f"{server.url}/sandboxes", json=body, headers={"X-API-KEY": key}, timeout=120)
    if reply.status_code == 201:  # the attack worked: do not leave its sandbox behind
        httpx.delete(f"{server.url}/sandboxes/{reply.json()['sandboxID']}",
                     headers={"X-API-KEY": API_KEY}, timeout=60)  # fmt: skip
    return reply


def test_tenant_cannot_use_a_secret_not_offered_to_it(served: tuple[Server, Upstreams]) -> None:
    server, _ = served
    reply = _create(server, BLUE, {"templateID": "base", "capsa_secrets": ["KEY"]})
    assert reply.status_code == 403, reply.text
    assert "not offered to tenant 'blue'" in reply.json()["message"]


def test_rule_for_a_host_the_policy_denies_is_refused(served: tuple[Server, Upstreams]) -> None:
    server, _ = served
    network = {
        "allow_out": [FREE],
        "deny_out": ["0.0.0.0/0"],
        "rules": {API: [{"transform": {"headers": {"Authorization": RULE_VALUE}}}]},
    }
    reply = _create(server, API_KEY, {"templateID": "base", "network": network})
    assert reply.status_code == 400, reply.text
    assert "network policy denies" in reply.json()["message"]


def test_guest_cannot_read_a_rule_header(served: tuple[Server, Upstreams]) -> None:
    server, up = served
    sdk = {"api_key": API_KEY, "api_url": server.url, "sandbox_url": server.url}
    network: Any = {
        "allow_out": ["*.secret.test"],
        "deny_out": ["0.0.0.0/0"],
        "rules": {API: [{"transform": {"headers": {"Authorization": RULE_VALUE}}}]},
    }
    sandbox = Sandbox.create("base", network=network, **sdk)
    try:
        tag = secrets.token_hex(4)
        sandbox.files.write("/tmp/get.py", GUEST_GET)
        urls = [f"https://{API}/a-{tag}", f"https://{FREE}/f-{tag}", f"{API}@https://{FREE}/h-{tag}"]
        run = sandbox.commands.run("python3 /tmp/get.py " + " ".join(urls), timeout=90)
        seen = {s.path: {k.lower(): v for k, v in s.headers.items()} for s in up.seen}
        assert seen[f"/a-{tag}"]["authorization"] == RULE_VALUE, run.stdout  # set on the bound host
        # not on another host, nor on a connection to another host that claims the bound one
        for path in (f"/f-{tag}", f"/h-{tag}"):
            assert RULE_VALUE not in str(seen.get(path, {})), (path, run.stdout)
        assert RULE_VALUE not in run.stdout
        dump = sandbox.commands.run(
            "cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'; env", timeout=60
        ).stdout
        assert RULE_VALUE not in dump
        files = sandbox.commands.run(  # a regex: its own command line does not hold the value
            "grep -rIl 'rule-Q\\{8\\}-header' /etc /root /tmp /home 2>/dev/null; true", timeout=60
        ).stdout
        assert files.strip() == ""
    finally:
        sandbox.kill()
