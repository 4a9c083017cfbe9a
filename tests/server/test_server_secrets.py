"""Secrets in ``capsa serve`` (docs/secrets.md, "capsa serve"): the operator's ``--secrets-file``
(per create with ``capsa_secrets``, per template) and E2B's ``network.rules`` header transforms, on a
real server whose sandboxes reach the local HTTPS servers of tests/secret_servers.py (their test CA
trusted through ``--upstream-ca``). The values never reach the guest nor the state dir; a resume,
also after a restart, gets the operator's secrets back (the rules' headers only within a run)."""

from __future__ import annotations

import json
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.secret_servers import (
    API,
    FREE,
    GUEST_GET,
    OTHER,
    OTHER_VALUE,
    RULE_VALUE,
    VALUE,
    Upstreams,
    secrets_file,
    upstreams,
)  # fmt: skip
from tests.server.conftest import API_KEY, Server, free_port, start_server

e2b = pytest.importorskip("e2b")
from e2b import Sandbox  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]


class Node:
    """The module's server (restarted once on its state dir) and the upstreams its sandboxes reach."""

    def __init__(self, tmp: Path, up: Upstreams) -> None:
        self.tmp, self.up, self.port = tmp, up, free_port()
        self.state = tmp / "state"
        self.server: Server | None = None
        # OTHER_KEY goes to every sandbox of the template base (a header secret)
        self.file = secrets_file(tmp / "secrets.toml", up)
        self.file.write_text(self.file.read_text() + 'templates = ["base"]\n')

    def start(self) -> Server:
        self.server = start_server(
            self.tmp, "--max-sandboxes", "2", "--state-dir", str(self.state),
            "--secrets-file", str(self.file), "--upstream-ca", str(self.up.ca_file),
            "--dns-server", f"127.0.0.1:{self.up.dns_port}", "--allow-internal-destinations",
            env={"SECRET_VALUE": VALUE}, port=self.port,
        )  # fmt: skip
        return self.server

    def stop(self) -> None:
        assert self.server is not None
        code = self.server.stop()
        assert code in (0, -signal.SIGTERM), self.server.log.read_text()[-3000:]

    def sdk(self) -> dict[str, Any]:
        assert self.server is not None
        return {"api_key": API_KEY, "api_url": self.server.url, "sandbox_url": self.server.url}

    def put(self, sandbox_id: str, body: dict[str, Any]) -> httpx.Response:
        assert self.server is not None
        return httpx.put(f"{self.server.url}/sandboxes/{sandbox_id}/network", json=body, timeout=60,
                         headers={"X-API-KEY": API_KEY})  # fmt: skip

    def create(self, body: dict[str, Any]) -> httpx.Response:
        assert self.server is not None
        return httpx.post(f"{self.server.url}/sandboxes", json=body, timeout=120,
                          headers={"X-API-KEY": API_KEY})  # fmt: skip


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with upstreams() as up:
        node = Node(tmp_path_factory.mktemp("serve-secrets"), up)
        node.start()
        try:
            yield node
        finally:
            node.stop()


def _rules(host: str, headers: dict[str, str]) -> dict[str, Any]:
    return {"rules": {host: [{"transform": {"headers": headers}}]}}


def _get(sandbox: Sandbox, *urls: str) -> dict[str, Any]:
    sandbox.files.write("/tmp/get.py", GUEST_GET)
    result = sandbox.commands.run("python3 /tmp/get.py " + " ".join(urls), timeout=90)
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _seen(up: Upstreams, path: str) -> dict[str, str]:
    found = [s.headers for s in up.seen if s.path == path]
    assert len(found) == 1, (path, [s.path for s in up.seen])
    return {k.lower(): v for k, v in found[0].items()}


@pytest.mark.parametrize(
    ("rules", "words"),
    [
        ({"*.secret.test": [{"transform": {"headers": {"X-A": "v"}}}]}, "not a single host name"),
        ({"10.0.0.1": [{"transform": {"headers": {"X-A": "v"}}}]}, "IP address"),
        ({f"h{i}.test": [] for i in range(33)}, "at most 32 hosts"),
        ({API: [{"transform": {"headers": {f"X-{i}": "v" for i in range(17)}}}]}, "at most 16"),
        ({API: [{"transform": {"headers": {"X-A": "v\r\nX-Injected: 1"}}}]}, "cannot go in an HTTP"),
        ({API: [{"transform": {"headers": {"X A": "v"}}}]}, "HTTP token"),
        ({API: [{"transform": {"headers": {"Content-Length": "5"}}}]}, "frames or routes"),
        ({API: [{"transform": {"headers": {"X-A": "v" * 9000}}}]}, "at most 8192"),
        ({API: [{"transform": {"body": "x"}}]}, "only headers"),
    ],
)
def test_bad_rules_are_refused(node: Node, rules: dict[str, Any], words: str) -> None:
    reply = node.create({"templateID": "base", "network": {"rules": rules}})
    assert reply.status_code == 400, reply.text
    assert words in reply.json()["message"]


def test_unknown_secret_is_refused_with_the_offered_names(node: Node) -> None:
    reply = node.create({"templateID": "base", "capsa_secrets": ["NOPE"]})
    assert reply.status_code == 400, reply.text
    assert "unknown secret 'NOPE'" in reply.json()["message"]
    assert "KEY, OTHER_KEY" in reply.json()["message"]


@pytest.fixture(scope="module")
def sandbox_id(node: Node) -> str:
    """A sandbox with the operator's KEY (asked for), OTHER_KEY (its template's) and a rule setting
    X-Rule on requests to OTHER; no network settings: it reaches the secrets' hosts alone."""
    reply = node.create(
        {
            "templateID": "base",
            "capsa_secrets": ["KEY"],
            "network": _rules(OTHER, {"X-Rule": RULE_VALUE}),
        }
    )
    assert reply.status_code == 201, reply.text
    return str(reply.json()["sandboxID"])


def test_secrets_and_rules_reach_their_hosts_only(node: Node, sandbox_id: str) -> None:
    sandbox = Sandbox.connect(sandbox_id, **node.sdk())
    tag = secrets.token_hex(4)
    out = _get(sandbox, f"https://{API}/a-{tag}", f"https://{OTHER}/o-{tag}", f"https://{FREE}/f-{tag}")
    assert out[f"https://{API}/a-{tag}"][0] == "ok", out
    assert out[f"https://{FREE}/f-{tag}"][0] == "failed", out  # not a secret's host: denied
    placeholder = out["KEY"]
    assert placeholder and placeholder != VALUE and len(placeholder) >= 40
    api = _seen(node.up, f"/a-{tag}")
    assert api["authorization"] == f"Bearer {VALUE}"  # the placeholder swapped
    assert "x-other-key" not in api and api["x-rule"] == "guest-own"  # no other host's header
    other = _seen(node.up, f"/o-{tag}")
    assert other["x-other-key"] == OTHER_VALUE  # the template's header secret
    assert other["x-rule"] == RULE_VALUE  # the rule's header replaced the guest's
    assert other["authorization"] == f"Bearer {placeholder}"  # KEY is not bound to OTHER
    env = sandbox.commands.run("cat /proc/*/environ | tr '\\0' '\\n'; env").stdout
    assert placeholder in env
    for value in (VALUE, OTHER_VALUE, RULE_VALUE):
        assert value not in env


NEW_RULE = "Bearer updated-" + "W" * 8 + "-rule-value-abcdef0123456789"
ALLOWED = {"allow_out": [API, OTHER], "deny_out": ["0.0.0.0/0"]}


def test_update_network_replaces_the_rules_live(node: Node, sandbox_id: str) -> None:
    sandbox = Sandbox.connect(sandbox_id, **node.sdk())
    sandbox.update_network({**ALLOWED, "rules": _rules(API, {"X-Rule": NEW_RULE})["rules"]})  # type: ignore[typeddict-item]
    tag = secrets.token_hex(4)
    _get(sandbox, f"https://{API}/ua-{tag}", f"https://{OTHER}/uo-{tag}")
    assert _seen(node.up, f"/ua-{tag}")["x-rule"] == NEW_RULE
    other = _seen(node.up, f"/uo-{tag}")
    assert other["x-rule"] == "guest-own"  # its rule replaced: gone
    assert other["x-other-key"] == OTHER_VALUE  # the operator's stays
    # a host its guest has no CA for cannot get rules while it runs
    wider = {"allow_out": [API, OTHER, FREE], "deny_out": ["0.0.0.0/0"]}
    reply = node.put(sandbox_id, {**wider, "rules": _rules(FREE, {"X-Rule": NEW_RULE})["rules"]})
    assert reply.status_code == 409, reply.text
    assert "cannot be added to the running sandbox" in reply.json()["message"]
    assert node.put(sandbox_id, {**ALLOWED, **_rules(OTHER, {"X-Rule": RULE_VALUE})}).status_code == 204


def test_a_sandbox_from_a_snapshot_keeps_the_secrets(node: Node, sandbox_id: str) -> None:
    source = Sandbox.connect(sandbox_id, **node.sdk())
    snapshot = source.create_snapshot()
    copy = Sandbox.create(snapshot.snapshot_id, **node.sdk())
    try:
        tag = secrets.token_hex(4)
        out = _get(copy, f"https://{API}/sa-{tag}", f"https://{OTHER}/so-{tag}")
        assert out["KEY"] != _get(source)["KEY"]  # placeholders of its own
        assert _seen(node.up, f"/sa-{tag}")["authorization"] == f"Bearer {VALUE}"
        other = _seen(node.up, f"/so-{tag}")
        assert other["x-rule"] == RULE_VALUE and other["x-other-key"] == OTHER_VALUE
    finally:
        copy.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id, **node.sdk())


def _holds(root: Path, needles: list[bytes]) -> set[bytes]:
    """Which needles some file under ``root`` holds (read in overlapping chunks)."""
    found: set[bytes] = set()
    overlap = max(len(n) for n in needles)
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        with path.open("rb") as data:
            tail = b""
            while chunk := data.read(8 << 20):
                window = tail + chunk
                found.update(n for n in needles if n in window)
                tail = window[-overlap:]
    return found


def test_state_dir_never_holds_a_value(node: Node, sandbox_id: str) -> None:
    sandbox = Sandbox.connect(sandbox_id, **node.sdk())
    placeholder = _get(sandbox)["KEY"]
    sandbox.beta_pause()
    # a paused sandbox takes new rules at its resume (any host: the resume makes a new CA)
    rules = {"rules": {OTHER: _rules(OTHER, {"X-Rule": RULE_VALUE})["rules"][OTHER],
                       API: _rules(API, {"X-Rule": NEW_RULE})["rules"][API]}}  # fmt: skip
    assert node.put(sandbox_id, {**ALLOWED, **rules}).status_code == 204
    values = [VALUE.encode(), OTHER_VALUE.encode(), RULE_VALUE.encode(), NEW_RULE.encode()]
    found = _holds(node.state, [placeholder.encode(), *values])
    assert placeholder.encode() in found  # the guest's memory is there: the search can see it
    assert not found & set(values)


def test_resume_after_restart_gets_the_operators_secrets_back(node: Node, sandbox_id: str) -> None:
    sandbox = Sandbox.connect(sandbox_id, **node.sdk())  # resumed (within this run)
    tag = secrets.token_hex(4)
    _get(sandbox, f"https://{OTHER}/r-{tag}", f"https://{API}/ra-{tag}")
    assert _seen(node.up, f"/r-{tag}")["x-rule"] == RULE_VALUE
    assert _seen(node.up, f"/ra-{tag}")["x-rule"] == NEW_RULE  # set while it was paused
    node.stop()  # pauses it into the state dir
    node.start()
    sandbox = Sandbox.connect(sandbox_id, **node.sdk())
    out = _get(sandbox, f"https://{API}/a2-{tag}", f"https://{OTHER}/o2-{tag}")
    assert _seen(node.up, f"/a2-{tag}")["authorization"] == f"Bearer {VALUE}"
    other = _seen(node.up, f"/o2-{tag}")
    assert other["x-other-key"] == OTHER_VALUE
    assert other["x-rule"] == "guest-own"  # the rule's value was never stored: gone
    assert "without its network.rules headers" in (node.server.log.read_text() if node.server else "")
    assert out["KEY"] and out["KEY"] != VALUE
    sandbox.kill()
