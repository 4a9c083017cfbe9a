"""The shared sandbox cases (cases.py) on a local sandbox: the baseline the Ray run must match."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import capsa
from tests.ray.cases import CASES, IDS, Case

pytestmark = [pytest.mark.vm]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_sandbox() -> AsyncIterator[capsa.Sandbox]:
    vm = await capsa.sandbox().memory_mb(256).build()
    try:
        yield vm
    finally:
        await vm.kill()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_case_on_local_sandbox(local_sandbox: capsa.Sandbox, case: Case) -> None:
    await case(local_sandbox)
