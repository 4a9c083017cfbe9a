"""``vm.network.set_policy`` on a real guest: a live connection the new policy denies is reset at
once (the guest sees a reset, the host socket is closed), new connections and DNS answers follow the
new policy, and allowing again lets the guest back out. Servers on 127.0.0.1 only (the module's DNS
server maps the test names there, see :mod:`tests.integration.test_network`)."""

from __future__ import annotations

import asyncio
import time

import pytest

import capsa
from capsa import NetworkPolicy, VirtualNetwork
from tests.conftest import SandboxFactory
from tests.integration.test_network import (  # noqa: F401 (servers: the module's fixture)
    GUEST_SERVERS,
    Servers,
    servers,
)

pytestmark = [pytest.mark.vm]

# Connects, proves the connection works, then waits on it: a reset shows as the exception's name and
# the seconds it took after "held" was printed; then tries a new connect and a new lookup.
HOLD = """
import socket, sys, time
name, port = sys.argv[1], int(sys.argv[2])
address = socket.gethostbyname(name)
conn = socket.create_connection((address, port), timeout=10)
conn.sendall(b"ping\\n")
assert conn.recv(100) == b"ping\\n"
conn.settimeout(60)
print("held", address, flush=True)
started = time.monotonic()
try:
    print("recv", conn.recv(100), flush=True)
except OSError as exc:
    print("ended", type(exc).__name__, round(time.monotonic() - started, 2), flush=True)
try:
    socket.create_connection((address, port), timeout=10).close()
    print("reconnect ok")
except OSError as exc:
    print("reconnect", type(exc).__name__)
try:
    socket.gethostbyname(name)
    print("lookup ok")
except OSError as exc:
    print("lookup", type(exc).__name__)
"""

AGAIN = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
conn.sendall(b"again\\n")
print(conn.recv(100).decode().strip())
"""


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_set_policy_resets_live_flows_and_judges_new_ones(
    servers: Servers,  # noqa: F811 (the fixture imported above)
    sandbox_factory: SandboxFactory,
) -> None:
    accepted = asyncio.Event()
    host_side_closed = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        host_side_closed.set()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gateway = servers.gateway(NetworkPolicy.allow_all())
        vm = await sandbox_factory(capsa.sandbox().network(VirtualNetwork.with_gateway(gateway)))
        process = await vm.agent.exec("python3").args(["-c", HOLD, "data.test", str(port)]).spawn()
        held = await asyncio.wait_for(process.stdout.readline(), 60)
        assert held.startswith(b"held"), held
        await asyncio.wait_for(accepted.wait(), 10)

        denied = NetworkPolicy.allow_all().deny_domain("data.test")  # the pinned name, not the IP
        changed = time.monotonic()
        vm.network.set_policy(denied)
        assert vm.network.policy == denied
        await asyncio.wait_for(host_side_closed.wait(), 5)  # the host socket is closed at once
        rest = (await asyncio.wait_for(process.stdout.read(), 60)).decode()
        assert await process.wait(30) == 0, rest
        lines = rest.split("\n")
        ended = lines[0].split()
        assert ended[:2] == ["ended", "ConnectionResetError"], rest
        assert time.monotonic() - changed < 30 and float(ended[2]) < 30  # a reset, not the timeout
        assert lines[1] == "reconnect ConnectionRefusedError", rest
        assert lines[2] == "lookup gaierror", rest  # the name is now NXDOMAIN
        log = vm.network.log()
        resets = [e for e in log if e.proto == "tcp" and e.action == "deny" and "reset" in e.rule]
        assert [e.domain for e in resets] == ["data.test"], resets
        assert any(e.proto == "dns" and e.action == "deny" and e.domain == "data.test" for e in log)

        vm.network.set_policy(NetworkPolicy.allow_all())
        again = await vm.agent.exec("python3").args(["-c", AGAIN, "data.test", str(port)]).run()
        assert again.stdout.strip() == "again", again.stderr

        with pytest.raises(capsa.ConfigError):
            vm.network.set_policy("deny all")  # type: ignore[arg-type]
    finally:
        server.close()


# One UDP flow, used once per line on stdin: the reply, or the error the guest gets.
UDP_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(10)
sock.connect(("udp.test", int(sys.argv[1])))
for line in sys.stdin:
    sock.send(b"x")
    try:
        print("got", sock.recv(100).decode(), flush=True)
    except OSError as exc:
        print("error", type(exc).__name__, flush=True)
"""


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_set_policy_drops_udp_flows_and_keeps_port_forwards(
    servers: Servers,  # noqa: F811 (the fixture imported above)
    sandbox_factory: SandboxFactory,
) -> None:
    """A UDP flow the new policy denies is dropped (the guest's next datagram is refused with an
    ICMP unreachable); connections the host opened through a port forward are not egress and
    stay, even under deny-all."""
    gateway = servers.gateway(NetworkPolicy.allow_all()).forward_tcp(0, 8000)
    vm = await sandbox_factory(capsa.sandbox().network(VirtualNetwork.with_gateway(gateway)))
    (forward,) = vm.network.forwards()
    guest_server = await vm.agent.exec("python3").args(["-u", "-c", GUEST_SERVERS]).spawn()
    assert (await asyncio.wait_for(guest_server.stdout.readline(), 60)).strip() == b"ready"
    reader, writer = await asyncio.open_connection("127.0.0.1", forward.host_port)
    assert await asyncio.wait_for(reader.readline(), 30) == b"from 10.0.2.1\n"
    client = await vm.agent.exec("python3").args(["-c", UDP_CLIENT, str(servers.udp_port)]).spawn()
    await client.write_stdin(b"go\n")
    assert await asyncio.wait_for(client.stdout.readline(), 30) == b"got echo:x\n"

    vm.network.set_policy(NetworkPolicy.deny_all())
    dropped = [e for e in vm.network.log() if e.proto == "udp" and "(dropped)" in e.rule]
    assert [(e.action, e.domain) for e in dropped] == [("deny", "udp.test")]
    await client.write_stdin(b"go\n")
    assert await asyncio.wait_for(client.stdout.readline(), 30) == b"error ConnectionRefusedError\n"
    writer.write(b"still here\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 30) == b"STILL HERE\n"  # the forward stays
    writer.close()
    await client.close_stdin()
    assert await client.wait(30) == 0
