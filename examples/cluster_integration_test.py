"""An integration test of a client and a server, each in its own VM on one private network, run by
pytest through capsa's plugin (plain tests, no asyncio):

    .venv/bin/pytest examples/cluster_integration_test.py

The ``capsa_cluster`` fixture gives a :class:`capsa.sync.SyncCluster` whose policy lets nothing leave
it; it is stopped, with its members, after the test (and a failing test's report carries every
member's console transcript). The server VM runs a small key-value service over TCP; the client VM
reaches it by name ("server"). Then a partition: the client's connect fails, and after ``heal()`` it
works again. Last, the server is killed and restarted: same name and address, a fresh guest.
"""

from __future__ import annotations

import pytest

from capsa import ExecResult, sync
from capsa.sync import SyncCluster, SyncSandbox

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
io.write(f"SET colour {sys.argv[2]}\\nGET colour\\n"); io.flush()
print(io.readline().strip(), io.readline().strip())
"""


def member(c: SyncCluster, name: str) -> SyncSandbox:
    vm = c[name]
    assert isinstance(vm, SyncSandbox)
    return vm


def client(c: SyncCluster, colour: str = "blue", timeout: float = 10.0) -> ExecResult:
    args = ["-c", CLIENT, str(timeout), colour]
    return member(c, "client").agent.exec("python3").args(args).timeout(60).run()


def serve(c: SyncCluster) -> None:
    member(c, "server").agent.exec("python3").args(["-c", SERVER]).spawn()


@pytest.mark.timeout(300)
def test_the_client_talks_to_the_server_by_name_and_survives_faults(
    capsa_cluster: SyncCluster,
) -> None:
    capsa_cluster.add("server", sync.sandbox().memory_mb(256))
    capsa_cluster.add("client", sync.sandbox().memory_mb(256))
    serve(capsa_cluster)

    result = client(capsa_cluster)
    assert result.stdout.split() == ["OK", "blue"], result.stderr

    # a cut cable between the two: the connect times out; heal() restores the link
    capsa_cluster.partition({"client"}, {"server"})
    cut = client(capsa_cluster, timeout=2.0)
    assert cut.exit_code != 0 and "timed out" in cut.stderr
    capsa_cluster.heal()
    assert client(capsa_cluster, "green").stdout.split() == ["OK", "green"]

    # nothing leaves the cluster: the policy denies it, and the log names who tried
    outside = "import urllib.request as u; u.urlopen('http://example.com/', timeout=5)"
    denied = member(capsa_cluster, "client").agent.exec("python3").args(["-c", outside]).run()
    assert denied.exit_code != 0
    assert any(e.member == "client" and e.action == "deny" for e in capsa_cluster.log())

    # the server dies and comes back under its name and address (a fresh guest)
    address = capsa_cluster.address("server")
    capsa_cluster.kill("server")
    assert {m.name: m.alive for m in capsa_cluster.members()} == {"server": False, "client": True}
    capsa_cluster.restart("server")
    assert capsa_cluster.address("server") == address
    serve(capsa_cluster)
    assert client(capsa_cluster, "red").stdout.split() == ["OK", "red"]
