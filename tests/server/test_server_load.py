"""Load: 10 concurrent SDK clients against one real ``capsa serve`` with a warm pool, each
creating a sandbox and running 20 commands, every output checked."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import AsyncSandbox  # noqa: E402

from tests.server.conftest import API_KEY, Server, start_server  # noqa: E402

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.vm]

CLIENTS = 10
COMMANDS = 20


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("load"),
        *("--memory", "256", "--pool", "base=4", "--max-sandboxes", str(CLIENTS)),
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_ten_clients_twenty_commands_each(load_server: Server, tmp_path: Path) -> None:
    options = {"api_key": API_KEY, "api_url": load_server.url, "sandbox_url": load_server.url}

    async def client(index: int) -> tuple[list[str], float]:
        started = time.monotonic()
        sandbox = await AsyncSandbox.create(timeout=300, **options)
        created = time.monotonic() - started
        try:
            outputs = []
            for n in range(COMMANDS):
                result = await sandbox.commands.run(f"echo client-{index} command-{n}", timeout=120)
                assert result.exit_code == 0
                outputs.append(result.stdout)
            return outputs, created
        finally:
            await sandbox.kill()

    async def main() -> list[tuple[list[str], float]]:
        return await asyncio.gather(*(client(i) for i in range(CLIENTS)))

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    for index, (outputs, _) in enumerate(results):
        assert outputs == [f"client-{index} command-{n}\n" for n in range(COMMANDS)]
    creates = sorted(created for _, created in results)
    log.info(  # --log-cli-level=INFO shows the figures
        "%d clients x %d commands in %.1fs; create min/median/max %.2f/%.2f/%.2fs",
        *(CLIENTS, COMMANDS, elapsed, creates[0], creates[len(creates) // 2], creates[-1]),
    )
    metrics = httpx.get(f"{load_server.url}/metrics", headers={"X-API-KEY": API_KEY}).text
    assert f"capsa_server_commands_total {float(CLIENTS * COMMANDS)}" in metrics
    assert httpx.get(f"{load_server.url}/health").json()["sandboxes"] == 0
