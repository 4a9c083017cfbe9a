"""Attacks on the CPU of the server's event loop, which every sandbox and client shares: work a
guest or a client can make the host do per byte, per rule or per poll must be linear or bounded.

The timing tests compare a size with four times that size (linear: about 4x, quadratic: 16x) or
use bounds several times what the fixed code needs, so a loaded machine does not fail them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import httpx
import pytest

from capsa.agent.exec import OutputStream
from capsa.net.dns import MAX_PINS, PinTable
from capsa.net.policy import Flow, NetworkPolicy
from tests.server.conftest import API_KEY, Server, start_server

e2b = pytest.importorskip("e2b")

# -- readline: OutputStream on chunks as the agent channel hands them over ------------------------------


class _Chunks:
    """What an :class:`OutputStream` reads from (a call's stream from the guest), replaying the
    chunks a guest sent."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    async def read(self) -> bytes | None:
        return next(self._chunks, None)


def _readline_seconds(make_chunks: Callable[[], list[bytes]]) -> float:
    """The best of three runs of reading every line of the chunks."""

    async def read_all(chunks: list[bytes]) -> float:
        stream = OutputStream(_Chunks(chunks))
        started = time.perf_counter()
        while await stream.readline(1 << 24):
            pass
        return time.perf_counter() - started

    return min(asyncio.run(read_all(make_chunks())) for _ in range(3))


def test_readline_on_a_byte_trickle_is_linear() -> None:
    """Attack: the guest writes a long line one byte at a time; a host consumer reading lines (the
    code interpreter's) re-copied the whole line per byte: quadratic, on the shared loop."""
    small = _readline_seconds(lambda: [b"x"] * 100_000 + [b"\n"])
    large = _readline_seconds(lambda: [b"x"] * 400_000 + [b"\n"])
    assert large / small < 8, (small, large)


def test_readline_of_many_lines_in_one_chunk_is_linear() -> None:
    """Attack: one chunk of many short lines; each line read copied the rest of the chunk."""
    small = _readline_seconds(lambda: [b"x\n" * 40_000])
    large = _readline_seconds(lambda: [b"x\n" * 160_000])
    assert large / small < 8, (small, large)


# -- the egress policy -----------------------------------------------------------------------------------


def test_a_policy_of_20000_rules_builds_in_linear_time() -> None:
    """Attack: 20,000 allow entries; each added rule copied all the rules before it (about 2 s
    of the shared loop before the request was even checked against --max-sandboxes)."""
    started = time.perf_counter()
    policy = NetworkPolicy.deny_all()
    for i in range(20_000):
        policy = policy.allow_domain(f"host{i}.example.test")
    built = time.perf_counter() - started
    assert built < 0.6, built
    started = time.perf_counter()
    assert policy.decide_name("host19999.example.test").allowed  # builds the indexes
    for i in range(1000):
        assert not policy.decide_name(f"n{i}.other.test").allowed
        assert policy.decide(Flow("tcp", None, 443, frozenset({f"host{i}.example.test"}))).allowed
    assert time.perf_counter() - started < 0.5


def test_dns_verdicts_on_a_large_address_allowlist_are_fast() -> None:
    """Attack: a guest asks for a name under a policy of 2,000 allowed IPs; the verdict tried
    each rule at every address bound of every rule (1.5 s per question; 2 minutes at 20,000)."""
    policy = NetworkPolicy.deny_all()
    for i in range(2000):
        policy = policy.allow_ip(f"11.0.{i // 256}.{i % 256}")
    policy = policy.allow_domain("*.corp.test")
    started = time.perf_counter()
    assert not policy.decide_name("a.other.test").allowed
    assert policy.decide_name("a.corp.test").allowed
    assert time.perf_counter() - started < 0.25


def test_a_full_pin_table_keeps_flow_decisions_cheap() -> None:
    """Attack: the guest resolves thousands of names, filling its pin table, then opens flows
    (SYNs to any port): each new flow looked its destination up by a pass over every pin; and
    thousands of names on one address made each flow to it weigh them all."""
    pins = PinTable()
    for i in range(MAX_PINS):
        pins.add(f"n{i}.corp.test", IPv4Address(0x0B000000 + i), 300)
    started = time.perf_counter()
    for i in range(2000):
        assert pins.names_for(IPv4Address(0x0B000000 + i)) == {f"n{i}.corp.test"}
    assert time.perf_counter() - started < 0.25  # a pass over the pins per lookup: about 4 s
    shared = PinTable()
    for i in range(MAX_PINS):
        shared.add(f"n{i}.corp.test", IPv4Address("203.0.113.7"), 300)
    names = shared.names_for(IPv4Address("203.0.113.7"))
    assert len(names) <= 64 and f"n{MAX_PINS - 1}.corp.test" in names  # the newest are kept


# -- the server: network lists, admission order, watchers ------------------------------------------------


@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("cpu"), "--max-sandboxes", "1", "--memory", "256")
    try:
        yield server
    finally:
        server.stop()


def _create(server: Server, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{server.url}/sandboxes", json=body, headers={"X-API-Key": API_KEY}, timeout=30)


def test_the_api_refuses_a_100k_entry_allow_out(cpu_server: Server) -> None:
    """Attack: a create request listing 100,000 allow_out entries, each one more rule for the
    server to build on its loop and for every DNS question to weigh."""
    entries = [f"h{i}.example.test" for i in range(100_000)]
    started = time.monotonic()
    reply = _create(cpu_server, {"network": {"allow_out": entries, "deny_out": ["0.0.0.0/0"]}})
    assert reply.status_code == 413, reply.text  # 1.8 MB: past the control plane's body cap
    assert time.monotonic() - started < 10
    started = time.monotonic()  # within the body cap, past the list cap
    reply = _create(cpu_server, {"network": {"allow_out": entries[:1001], "deny_out": ["0.0.0.0/0"]}})
    assert reply.status_code == 400, reply.text
    assert "at most 1000" in reply.json()["message"]
    assert time.monotonic() - started < 10
    long_entry = {"network": {"deny_out": ["a" * 300 + ".test"]}}
    assert _create(cpu_server, long_entry).status_code == 400


@pytest.fixture(scope="module")
def sandbox(cpu_server: Server) -> Iterator[e2b.Sandbox]:
    sbx = e2b.Sandbox.create(
        timeout=600, api_key=API_KEY, api_url=cpu_server.url, sandbox_url=cpu_server.url
    )
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.mark.vm
@pytest.mark.timeout(240)
def test_at_capacity_no_policy_is_built(cpu_server: Server, sandbox: e2b.Sandbox) -> None:
    """Attack: at --max-sandboxes, create requests with long network lists still made the server
    build each policy before refusing them; now they are refused (429) before it looks at the
    entries (the last one here is malformed, which a built policy would have reported)."""
    entries = [f"h{i}.example.test" for i in range(999)] + ["bad domain!"]
    reply = _create(cpu_server, {"network": {"allow_out": entries}})
    assert reply.status_code == 429, reply.text


@pytest.mark.vm
@pytest.mark.timeout(240)
def test_a_sandbox_gets_at_most_16_watchers(cpu_server: Server, sandbox: e2b.Sandbox) -> None:
    """Attack: a client opens watcher after watcher on one sandbox (64 CreateWatcher ones, and
    WatchDir streams without any limit), each re-listing up to 20,000 paths every half second on
    the shared loop. Now 16 per sandbox, streams included; a stream's slot is freed when its
    client stops it."""
    sandbox.files.make_dir("/tmp/w")
    handles = [sandbox.files.watch_dir("/tmp/w") for _ in range(15)]

    async def one_stream_more() -> None:
        sbx = await e2b.AsyncSandbox.connect(
            sandbox.sandbox_id, api_key=API_KEY, api_url=cpu_server.url, sandbox_url=cpu_server.url
        )
        watch = await sbx.files.watch_dir("/tmp/w", lambda event: None)  # the 16th
        with pytest.raises(e2b.SandboxException, match="16 directory watchers"):
            await sbx.files.watch_dir("/tmp/w", lambda event: None)
        await watch.stop()

    asyncio.run(one_stream_more())
    deadline = time.monotonic() + 20
    while True:  # the stream's slot comes back once the server sees its client gone
        try:
            handles.append(sandbox.files.watch_dir("/tmp/w"))
            break
        except e2b.SandboxException:
            assert time.monotonic() < deadline, "the stopped stream still holds its slot"
            time.sleep(0.2)
    with pytest.raises(e2b.SandboxException, match="16 directory watchers"):
        sandbox.files.watch_dir("/tmp/w")
    handles.pop().stop()
    handles.append(sandbox.files.watch_dir("/tmp/w"))  # a removed watcher's slot is free at once
    for handle in handles:
        handle.stop()
