"""``capsa serve`` when the host has no room for another sandbox: admission control
(:mod:`capsa.vm.admission`) refuses the VM before QEMU starts and the client gets a 503 that says
why, not a 500 or a half-built sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, Server, start_server


@pytest.fixture(scope="module")
def full_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # a reserve larger than any machine's memory: every VM start is refused
    server = start_server(tmp_path_factory.mktemp("admission"), env={"CAPSA_MIN_FREE_MB": "100000000"})
    yield server
    server.stop()


def test_a_create_the_host_has_no_memory_for_is_a_503_naming_memory(full_host: Server) -> None:
    reply = httpx.post(
        f"{full_host.url}/sandboxes",
        json={"templateID": "base", "timeout": 60},
        headers={"X-API-KEY": API_KEY},
        timeout=60,
    )
    assert reply.status_code == 503, reply.text
    assert "memory" in reply.json()["message"]
    listed = httpx.get(f"{full_host.url}/sandboxes", headers={"X-API-KEY": API_KEY}, timeout=10)
    assert listed.json() == []  # nothing half-built is left behind
    assert httpx.get(f"{full_host.url}/health", timeout=10).status_code == 200


def test_the_refusal_is_logged(full_host: Server) -> None:
    assert "sandbox refused" in Path(full_host.log).read_text()
