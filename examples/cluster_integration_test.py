"""An integration test of a client and a server, each in its own VM on one private network.

    .venv/bin/pytest examples/cluster_integration_test.py

The server VM runs a small key-value service over TCP; the client VM reaches it by name ("server").
The cluster's policy denies everything outside the cluster, so the test also shows the client cannot
leave it. Then a partition: the client's connect fails, and after ``heal()`` it works again.
(Clusters are asynchronous: these tests use pytest-asyncio, which capsa's test extras install.)
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

import capsa
from capsa import Gateway, NetworkPolicy, VirtualNetwork

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed"
)

SERVER = """
import socketserver
store = {}
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            op, key, *value = line.decode().split()
            if op == "SET":
                store[key] = value[0]
                self.wfile.write(b"OK\\n")
            else:
                self.wfile.write((store.get(key, "-") + "\\n").encode())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 7000), Handler).serve_forever()
"""

CLIENT = """
import socket, sys, time
for _ in range(60):  # the server may still be starting
    try:
        conn = socket.create_connection(("server", 7000), timeout=float(sys.argv[1]))
        break
    except ConnectionRefusedError:
        time.sleep(0.5)
io = conn.makefile("rw")
io.write("SET colour blue\\nGET colour\\n"); io.flush()
print(io.readline().strip(), io.readline().strip())
"""

NET = VirtualNetwork.with_gateway(Gateway("10.0.9.0/24").policy(NetworkPolicy.deny_all()))


async def client(c: capsa.Cluster, timeout: float = 10.0) -> capsa.ExecResult:
    vm = c["client"]
    assert isinstance(vm, capsa.Sandbox)
    return await vm.agent.exec("python3").args(["-c", CLIENT, str(timeout)]).timeout(60).run()


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_the_client_talks_to_the_server_by_name_and_survives_a_partition() -> None:
    async with capsa.cluster(NET) as c:
        server = await c.add("server", capsa.sandbox())
        await c.add("client", capsa.sandbox())
        assert isinstance(server, capsa.Sandbox)
        await server.agent.exec("python3").args(["-c", SERVER]).spawn()

        result = await client(c)
        assert result.stdout.split() == ["OK", "blue"], result.stderr

        c.partition({"client"}, {"server"})
        cut = await client(c, timeout=2.0)
        assert cut.exit_code != 0 and "timed out" in cut.stderr
        c.heal()
        await asyncio.sleep(0.1)
        assert (await client(c)).stdout.split() == ["OK", "blue"]

        # nothing leaves the cluster: the policy denies it, and the log names who tried
        outside = "import urllib.request as u; u.urlopen('http://example.com/', timeout=5)"
        vm = c["client"]
        assert isinstance(vm, capsa.Sandbox)
        denied = await vm.agent.exec("python3").args(["-c", outside]).timeout(60).run()
        assert denied.exit_code != 0
        assert any(e.member == "client" and e.action == "deny" for e in c.log())
