"""Clusters on real guests: sandboxes and a raw VM on one private network, talking by name, with the
egress policy still governing the outside world, and faults injected between members. Offline: the
only outside destination tried is denied on the host before any socket is opened."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

import capsa
from capsa import Gateway, NetworkPolicy, VirtualNetwork
from capsa.image.kernel import built_kernel

pytestmark = [pytest.mark.vm]

NET = VirtualNetwork.with_gateway(
    Gateway("10.0.7.0/24").policy(NetworkPolicy.deny_all()).dns_servers(["127.0.0.1:9"])
)

CONNECT = """
import socket, sys, time
started = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    outcome = "connected"
except OSError as exc:
    outcome = type(exc).__name__
print(outcome, round(time.monotonic() - started, 2))
"""

RECEIVE = """
import hashlib, socket
server = socket.create_server(("0.0.0.0", 9000))
conn, _ = server.accept()
digest, total = hashlib.md5(), 0
while chunk := conn.recv(1 << 20):
    digest.update(chunk); total += len(chunk)
print(total, digest.hexdigest(), flush=True)
"""

SEND = """
import hashlib, os, socket, sys
block = os.urandom(1 << 20)
digest = hashlib.md5()
with socket.create_connection((sys.argv[1], 9000), timeout=60) as conn:
    for _ in range(int(sys.argv[2])):
        conn.sendall(block); digest.update(block)
print(int(sys.argv[2]) << 20, digest.hexdigest())
"""


async def _connect(vm: capsa.Sandbox, host: str, port: int, timeout: float = 3.0) -> tuple[str, float]:
    args = ["-c", CONNECT, host, str(port), str(timeout)]
    result = await vm.agent.exec("python3").args(args).timeout(60).run()
    outcome, seconds = result.stdout.split()
    return outcome, float(seconds)


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_sandboxes_talk_by_name_under_one_policy_and_faults() -> None:
    async with capsa.cluster(NET) as c:
        db = await c.add("db", capsa.sandbox())
        app = await c.add("app", capsa.sandbox())
        third = await c.add("third", capsa.sandbox())
        assert isinstance(db, capsa.Sandbox) and isinstance(app, capsa.Sandbox)
        assert isinstance(third, capsa.Sandbox)
        assert len({m.address for m in c.members()}) == 3
        assert [m.name for m in c.members()] == ["db", "app", "third"]

        # HTTP between two members, by name, with a deny-all policy
        server = await db.agent.exec("python3").args(["-m", "http.server", "8000"]).spawn()
        fetch = "import urllib.request as u; print(u.urlopen('http://db:8000/', timeout=30).status)"
        for _ in range(30):  # the server takes a moment to listen under TCG
            r = await app.agent.exec("python3").args(["-c", fetch]).timeout(60).run()
            if r.exit_code == 0:
                break
            await asyncio.sleep(0.5)
        assert r.stdout.strip() == "200", r.stderr
        assert (await app.agent.exec("hostname").run()).stdout.strip() == "app"

        # the outside world: denied by the cluster's policy, logged for the member that tried
        outcome, seconds = await _connect(third, "192.0.2.1", 80)
        assert outcome == "ConnectionRefusedError" and seconds < 2
        denied = [e for e in c.log() if e.action == "deny" and e.proto == "tcp"]
        assert [(e.member, e.dst_ip) for e in denied] == [("third", "192.0.2.1")]
        assert not [e for e in c.log() if e.member == "app" and e.proto == "tcp"]  # switched

        # a partition makes a connect fail within 5 s; heal restores it
        c.partition({"app"}, {"db"})
        outcome, seconds = await _connect(app, "db", 8000)
        assert outcome in ("TimeoutError", "timeout", "OSError") and seconds < 5
        c.heal()
        assert (await _connect(app, "db", 8000))[0] == "connected"

        # delay holds frames both ways (a connect takes a round trip), loss drops them
        c.delay("app", "db", 300)
        outcome, seconds = await _connect(app, "db", 8000)
        assert outcome == "connected" and seconds >= 0.6
        c.loss("db", "app", 1.0)
        assert (await _connect(app, "db", 8000, timeout=2.0))[0] in ("TimeoutError", "timeout")
        c.heal()
        outcome, seconds = await _connect(app, "db", 8000)
        assert outcome == "connected" and seconds < 0.5

        # a pair blocked by policy: refused at once, the others unaffected
        c.policy_between("third", "db", allow=False)
        outcome, seconds = await _connect(third, "db", 8000)
        assert outcome == "ConnectionRefusedError" and seconds < 2
        assert (await _connect(app, "db", 8000))[0] == "connected"
        c.policy_between("third", "db", allow=True)
        assert (await _connect(third, "db", 8000))[0] == "connected"

        # a port forward from the host to a member
        forward = await c.forward_tcp(0, "db", 8000)
        url = f"http://127.0.0.1:{forward.host_port}/"
        status = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).status)
        assert status == 200

        # 200 MiB between two members, checksummed at both ends
        receiver = await db.agent.exec("python3").args(["-c", RECEIVE]).spawn()
        await asyncio.sleep(1.0)
        started = time.monotonic()
        sent = await app.agent.exec("python3").args(["-c", SEND, "db", "200"]).timeout(300).run()
        received = await asyncio.wait_for(receiver.stdout.readline(), 120)
        seconds = time.monotonic() - started
        assert sent.exit_code == 0, sent.stderr
        assert received.decode().split() == sent.stdout.split()
        assert await receiver.wait(timeout=30) == 0
        assert sent.stdout.split()[0] == str(200 << 20)
        print(f"200 MiB member to member in {seconds:.1f} s")

        # a member that dies is reported and takes nobody down; restart brings it back as it was
        await c.kill("third")
        states = {m.name: m.alive for m in c.members()}
        assert states == {"db": True, "app": True, "third": False}
        assert (await _connect(app, "db", 8000))[0] == "connected"
        third = await c.restart("third")
        assert isinstance(third, capsa.Sandbox)
        assert (await _connect(third, "db", 8000))[0] == "connected"
        await server.kill()
    assert all(m.state in ("stopped", "failed") for m in c.members())


@pytest.mark.asyncio
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    built_kernel() is None,
    reason="the busybox guest has virtio-net only with capsa's kernel built (scripts/setup.sh)",
)
async def test_a_raw_vm_joins_by_dhcp_and_pings_a_sandbox() -> None:
    from capsa.image.busybox import PROMPT, READY_MARKER, busybox_guest
    from capsa.image.kernels import default_kernel

    guest = busybox_guest(kernel=default_kernel())
    async with capsa.cluster(NET) as c:
        await c.add("db", capsa.sandbox())
        raw = await c.add("node3", capsa.vm(capsa.LinuxDirectBoot(guest.kernel, guest.initrd)))
        assert [(m.name, m.kind) for m in c.members()] == [("db", "sandbox"), ("node3", "vm")]
        await raw.console.wait_for(READY_MARKER, timeout=60)
        await raw.console.wait_for(PROMPT, timeout=30)
        address = c.address("node3")
        lease = await raw.console.exec_line(
            "ip link set eth0 up; udhcpc -i eth0 -n -q -f -s /bin/true 2>&1", 60
        )
        assert address in lease
        await raw.console.exec_line(f"ip addr add {address}/24 dev eth0")
        ping = await raw.console.exec_line(f"ping -c 1 -W 5 {c.address('db')}", 30)
        assert "1 packets received" in ping


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_forks_of_a_member_join_with_their_own_addresses_and_restart() -> None:
    async with capsa.cluster(NET) as c:
        app = await c.add("app", capsa.sandbox())
        assert isinstance(app, capsa.Sandbox)
        await app.agent.write_file("/tmp/before-fork", b"from the source")
        workers = await c.add_forks("worker", app, 4)
        addresses = {c.address(f"worker-{i}") for i in range(4)}
        assert len(addresses | {c.address("app")}) == 5
        for index, worker in enumerate(workers):
            assert (await worker.agent.exec("hostname").run()).stdout.strip() == f"worker-{index}"
            await worker.agent.exec("python3").args(["-m", "http.server", "8000"]).spawn()
        probe = (
            "import socket, sys, time\n"
            "for name in sys.argv[1:]:\n"
            "    for _ in range(60):\n"
            "        try:\n"
            "            socket.create_connection((name, 8000), timeout=5).close(); break\n"
            "        except OSError:\n"
            "            time.sleep(0.5)\n"
            "    else:\n"
            "        print('unreachable', name)\n"
            "print('done')\n"
        )
        names = [f"worker-{i}" for i in range(4)]
        result = await app.agent.exec("python3").args(["-c", probe, *names]).timeout(120).run()
        assert result.stdout.strip() == "done", (result.stdout, result.stderr)

        # a fork restarts as it was forked: same name, address and MAC, the source's files, not
        # what it did since (restarting a fork used to fail: it had no builder)
        await workers[1].agent.write_file("/tmp/after-fork", b"gone after a restart")
        address = c.address("worker-1")
        await c.kill("worker-1")
        assert [m.name for m in c.members() if not m.alive] == ["worker-1"]
        again = await c.restart("worker-1")
        assert isinstance(again, capsa.Sandbox) and again is not workers[1]
        assert c.address("worker-1") == address and c["worker-1"] is again
        assert (await again.agent.exec("hostname").run()).stdout.strip() == "worker-1"
        assert await again.agent.read_file("/tmp/before-fork") == b"from the source"
        assert not await again.agent.exists("/tmp/after-fork")
        await again.agent.exec("python3").args(["-m", "http.server", "8000"]).spawn()
        result = await app.agent.exec("python3").args(["-c", probe, "worker-1"]).timeout(120).run()
        assert result.stdout.strip() == "done", (result.stdout, result.stderr)
