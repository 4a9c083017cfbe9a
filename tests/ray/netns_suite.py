"""capsa.ray on a simulated multi-node Ray cluster. Run ONLY inside a network namespace with just
loopback up (Ray binds to the host's interface address): test_ray_cluster.py starts this file in
``unshare -n`` and reports each test here as one of its own. Nodes: a head without capsa slots,
"a" and "b" with 3 slots each, "b" allowing remote callers host paths under a root of its own
(``CAPSA_RAY_HOST_ROOT`` in its environment); the destructive tests (actor kill, node removal,
driver kill) come last and use node "b" or a node of their own, so the shared sandbox on "a"
survives them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import capsa
from tests.ray.cases import CASES, IDS, Case

ray = pytest.importorskip("ray")
cray = pytest.importorskip("capsa.ray")
from ray.cluster_utils import Cluster  # noqa: E402

from capsa.ray._placement import Constraint, Placer, placer  # noqa: E402
from capsa.ray._remote import RaySandbox  # noqa: E402
from capsa.ray._wire import decode_error  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

if os.environ.get("CAPSA_RAY_NETNS") != "1":
    pytest.skip(
        "run through tests/ray/test_ray_cluster.py (needs a network namespace)", allow_module_level=True
    )

log = logging.getLogger(__name__)
ROOT_ENV = "CAPSA_RAY_HOST_ROOT"  # read by a node's host actors (capsa.ray._node_policy)
MEMORY = 256
LOST_WITHIN = 15.0  # the bound for SandboxLost under Ray's default health checks
DRIVER = Path(__file__).with_name("driver_script.py")
FANOUT = Path(__file__).resolve().parents[2] / "examples" / "ray_fanout.py"


@dataclass
class Nodes:
    cluster: Any
    a: str
    b: str
    root: Path  # node b's host root (node a takes no host paths)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    root = Path(tempfile.mkdtemp(prefix="capsa-ray-root-")).resolve()
    try:
        a = cluster.add_node(num_cpus=1, resources={"capsa_slots": 3}, labels={"zone": "a"})
        os.environ[ROOT_ENV] = str(root)  # node b's raylet, and so its workers, inherit it
        try:
            b = cluster.add_node(num_cpus=1, resources={"capsa_slots": 3}, labels={"zone": "b"})
        finally:
            del os.environ[ROOT_ENV]
        ray.init(address=cluster.address, logging_level="warning")
        try:
            yield Nodes(cluster, a.node_id, b.node_id, root)
        finally:
            asyncio.run(cray.shutdown())
            ray.shutdown()
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def builder(zone: str | None = None) -> Any:
    b = cray.sandbox().memory_mb(MEMORY)
    return b.node(label=f"zone={zone}") if zone else b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(nodes: Nodes) -> AsyncIterator[Any]:
    vm = await builder("a").build()
    try:
        yield vm
    finally:
        await vm.kill()


def qemu_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline:
            alive.append(pid)
    return alive


def qemu_children(parents: list[int]) -> list[int]:
    """QEMU processes whose parent is one of these (host actor) processes, found in /proc like
    ``pgrep -P``: this test's VMs only, independent of what the actors report."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in parents and b"qemu-system" in cmdline:
                found.append(int(entry.name))
    return found


async def wait_gone(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while qemu_alive(pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return qemu_alive(pids)


async def vm_pids(node_id: str) -> tuple[Any, list[int]]:
    host = placer().hosts[node_id]
    return host, await host.actor.vm_pids.remote()


async def test_placement_spreads_over_distinct_nodes_and_follows_labels(nodes: Nodes) -> None:
    """Two builds on an idle cluster land on the two nodes with slots (never the head); a label
    pins a build to its node."""
    first, second = await asyncio.gather(builder().build(), builder().build())
    pinned = await cray.remote(capsa.sandbox().memory_mb(MEMORY)).node(label="zone=b").build()
    try:
        assert {first.node_id, second.node_id} == {nodes.a, nodes.b}
        assert pinned.node_id == nodes.b
        usage = {n["node_id"]: n["used"] for n in await cray.nodes()}
        assert usage == {nodes.a: 1, nodes.b: 2}
    finally:
        await asyncio.gather(first.stop(), second.stop(), pinned.stop())
    assert {n["used"] for n in await cray.nodes()} == {0}


def _start_serve(address: str, tmp: Path) -> tuple[Any, str, Path]:
    """``capsa serve --ray ADDRESS`` as a subprocess (a second Ray driver on this cluster)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp / "serve.log"
    env = {**os.environ, "CAPSA_API_KEY": SERVE_KEY}
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "capsa.cli", "serve", "--ray", address, "--port", str(port),
             "--memory", str(MEMORY), "--pool", "base=1", "--state-dir", str(tmp / "state")],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=DRIVER.parents[2],
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}", out


async def _healthy(proc: Any, url: str, out: Path, within: float) -> None:
    httpx = pytest.importorskip("httpx")
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"capsa serve --ray exited:\n{out.read_text()[-3000:]}")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    pytest.fail(f"capsa serve --ray did not become healthy:\n{out.read_text()[-3000:]}")


SERVE_KEY = "capsa-ray-serve-key"


@pytest.mark.timeout(300)
async def test_serve_ray_fronts_the_cluster_through_the_e2b_sdk(nodes: Nodes, tmp_path: Path) -> None:
    """``capsa serve --ray`` on the cluster, driven by the real e2b SDK: two sandboxes land on the
    two nodes with slots (their node id is in the SDK's metadata), run commands with streamed
    output, write and read files, and are killed; SIGTERM ends the server cleanly."""
    e2b = pytest.importorskip("e2b")
    proc, url, out = _start_serve(nodes.cluster.address, tmp_path)
    opts = {"api_key": SERVE_KEY, "api_url": url, "sandbox_url": url}
    try:
        await _healthy(proc, url, out, 150)
        first = await e2b.AsyncSandbox.create(timeout=120, metadata={"n": "1"}, **opts)
        second = await e2b.AsyncSandbox.create(timeout=120, metadata={"n": "2"}, **opts)
        infos = [await sbx.get_info() for sbx in (first, second)]
        placed = {info.metadata["capsa_ray_node_id"] for info in infos}
        assert placed == {nodes.a, nodes.b}, infos
        assert [info.metadata["n"] for info in infos] == ["1", "2"]
        chunks: list[str] = []
        result = await first.commands.run(
            "for i in 1 2 3; do echo line$i; done; echo err >&2", on_stdout=chunks.append
        )
        assert result.exit_code == 0 and result.stdout == "line1\nline2\nline3\n"
        assert "".join(chunks) == result.stdout and result.stderr == "err\n"
        assert (await second.commands.run("echo $((6 * 7))")).stdout == "42\n"
        await second.files.write("/tmp/ray-serve.txt", "through the cluster")
        assert await second.files.read("/tmp/ray-serve.txt") == "through the cluster"
        listed = await e2b.AsyncSandbox.list(**opts).next_items()
        assert {s.sandbox_id for s in listed} == {first.sandbox_id, second.sandbox_id}
        await first.kill()
        await second.kill()
        assert await e2b.AsyncSandbox.list(**opts).next_items() == []
        pooled = server_qemu()
        assert len(pooled) >= 2  # base=1 warm on each node
        proc.send_signal(signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
        except TimeoutError:
            proc.kill()
            raise
    assert code == 0, out.read_text()[-3000:]
    assert await wait_gone(pooled, 10.0) == []  # SIGTERM: pools and host actors ended with it


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ours(pid: int) -> bool:
    """Whether ``pid`` descends from this process (the cluster's raylets are its children): the
    machine may run other Ray clusters, whose actors are never touched here."""
    while pid > 1:
        pid = _parent(pid)
        if pid == os.getpid():
            return True
    return False


def server_actors() -> list[int]:
    """Host actor processes of this suite's cluster that are not this test driver's (the
    server's, here)."""
    mine = {host.pid for host in placer().hosts.values()} if ray.is_initialized() else set()
    actors = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in mine:
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::HostActor"):
                    actors.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in actors if _ours(pid)]


def server_qemu() -> list[int]:
    """QEMU processes of host actors that are not this test driver's (the server's, here)."""
    return qemu_children(server_actors())


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_case_through_ray(shared: Any, case: Case) -> None:
    """The local sandbox cases (cases.py), through a host actor on another node."""
    await case(shared)


async def test_snapshot_fork_and_network_log_on_the_same_node(nodes: Nodes) -> None:
    net = capsa.VirtualNetwork.with_gateway(
        capsa.Gateway("10.0.2.0/24").policy(capsa.NetworkPolicy.deny_all())
    )
    vm = await builder("b").network(net).build()
    clones: list[Any] = []
    try:
        await vm.agent.write_file("/tmp/mark", b"before fork")
        snap = await vm.snapshot("snap")  # relative to node b's host root
        assert Path(snap.path) == nodes.root / "snap"
        clones = await vm.fork(1)
        assert [c.node_id for c in clones] == [nodes.b]
        assert await clones[0].agent.read_file("/tmp/mark") == b"before fork"
        script = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
            "s.connect(('203.0.113.5', 9)); s.send(b'x')\n"
            "try:\n    s.recv(10)\nexcept OSError as e:\n    print(type(e).__name__)"
        )
        await vm.agent.exec("python3").args(["-c", script]).timeout(30).run()
        assert str(vm.network.guest_ip).startswith("10.0.2.")  # a property, copied with replies
        log = await vm.network.log()
        assert any(e.proto == "udp" and e.action == "deny" for e in log), log
    finally:
        await asyncio.gather(vm.stop(), *(c.stop() for c in clones))


async def test_a_hostile_driver_calling_the_actor_gets_no_host_path(nodes: Nodes, shared: Any) -> None:
    """Attack: a driver calls the host actors' methods itself (not through capsa.ray's handle) to
    share /etc into a guest on node b (whose root is elsewhere), boot node a's /etc/passwd as a
    kernel (node a takes no host paths), snapshot the shared sandbox to /tmp on node a, and bind
    0.0.0.0:2222 on node b. Each is a ConfigError from the actor, and nothing is built or written."""
    host_a, host_b = placer().hosts[nodes.a], placer().hosts[nodes.b]
    target = Path(tempfile.gettempdir()) / f"capsa-hostile-{os.getpid()}"
    forward = capsa.VirtualNetwork.with_gateway(
        capsa.Gateway().forward_tcp(2222, 22, host_address="0.0.0.0")
    )
    before = sorted(nodes.root.iterdir())
    attempts = [
        (host_b, host_b.actor.build.remote([("share", ("/etc", "/mnt/etc"), {})], 60)),
        (host_b, host_b.actor.build.remote([("share", ("../../etc", "/mnt/etc"), {})], 60)),
        (host_a, host_a.actor.build.remote([("kernel", ("/etc/passwd",), {})], 60)),
        (host_a, host_a.actor.call.remote(shared._ref.oid, [("snapshot", (str(target),), {})])),
        (host_b, host_b.actor.build.remote([("network", (forward,), {})], 60)),
    ]
    for host, call in attempts:
        status, error, _ = await host.request(call, 60)
        assert status == "err"
        decoded = decode_error(error, host.where)
        assert isinstance(decoded, capsa.ConfigError), decoded
    assert not target.exists() and sorted(nodes.root.iterdir()) == before
    assert {n["node_id"]: n["used"] for n in await cray.nodes()}[nodes.b] == 0
    with pytest.raises(capsa.ConfigError, match="outside this Ray node's host root"):
        await builder("b").share("/root", "/mnt/root").build()  # the handle's way: the same


async def test_two_drivers_cannot_fill_a_node_twice(nodes: Nodes) -> None:
    """Two drivers (two placers, each with its own host actors and counts) build 2 sandboxes each
    on node b, which has 3 capsa_slots: Ray grants 3, the fourth build gets NoSlotError after its
    wait, and every slot is Ray's again once they stop."""
    other = Placer(job_id="second-driver")
    free = ray.available_resources().get("capsa_slots", 0)

    async def second() -> Any:
        host, ref = await other.place([("memory_mb", (MEMORY,), {})], Constraint(label="zone=b"), 8, 120)
        return RaySandbox(host, ref)

    builds = [builder("b").placement_timeout(8).build() for _ in range(2)] + [second(), second()]
    results = await asyncio.gather(*builds, return_exceptions=True)
    built = [r for r in results if isinstance(r, RaySandbox)]
    try:
        assert len(built) <= 3 and any(isinstance(r, cray.NoSlotError) for r in results), results
        assert all(vm.node_id == nodes.b for vm in built)
    finally:
        await asyncio.gather(*(vm.stop() for vm in built), return_exceptions=True)
        for host in other.hosts.values():
            with contextlib.suppress(Exception):
                await host.request(host.actor.close.remote(), 60)
            ray.kill(host.actor, no_restart=True)
    deadline = time.monotonic() + 20
    while ray.available_resources().get("capsa_slots", 0) < free and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert ray.available_resources().get("capsa_slots", 0) >= free


async def test_no_free_slot_is_a_clear_error_after_a_bounded_wait(nodes: Nodes, shared: Any) -> None:
    started = time.monotonic()
    with pytest.raises(cray.NoSlotError) as nowhere:
        await builder("nowhere").placement_timeout(1).build()
    assert "zone=nowhere" in str(nowhere.value) and nowhere.value.hint
    used = {n["node_id"]: n["used"] for n in await cray.nodes()}[nodes.a]
    fill = [await builder("a").build() for _ in range(3 - used)]
    try:
        started = time.monotonic()
        with pytest.raises(cray.NoSlotError) as full:
            await builder("a").placement_timeout(1.5).build()
        assert 1.5 <= time.monotonic() - started < 10
        assert (nodes.a, 3, 3) in full.value.nodes and "capsa_slots" in (full.value.hint or "")
    finally:
        await asyncio.gather(*(vm.stop() for vm in fill))


async def test_warm_pool_serves_builds_on_the_node(nodes: Nodes) -> None:
    recipe = builder("b").cpus(1)
    await cray.warm(recipe, per_node=1)
    try:
        deadline = time.monotonic() + 60
        host = placer().hosts[nodes.b]
        while len(await host.actor.vm_pids.remote()) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        started = time.monotonic()
        vm = await recipe.build()
        took = time.monotonic() - started
        assert (await vm.agent.exec("true").run()).exit_code == 0
        await vm.stop()
        assert took < 2.0, took  # a pooled VM, not a restore plus Ray start-up
    finally:
        await cray.warm(recipe, per_node=0)


async def test_fanout_example_spreads_over_both_nodes(nodes: Nodes) -> None:
    """examples/ray_fanout.py as a second driver on this cluster (8 sandboxes, not 20: time)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FANOUT), "--address", nodes.cluster.address, "--count", "8",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    counts = {
        line.split()[1].rstrip(":"): int(line.split()[2])
        for line in text.splitlines()
        if line.startswith("node ")
    }
    assert sum(counts.values()) == 8 and len(counts) == 2, text[-3000:]
    assert {nodes.a[:12], nodes.b[:12]} == set(counts)


async def test_killed_host_actor_takes_its_qemu_and_raises_sandbox_lost(nodes: Nodes) -> None:
    """kill -9 of a host actor: its QEMU dies with it (PR_SET_PDEATHSIG, not Ray's cleanup), calls
    raise SandboxLost (never retried), and the node gets a new actor for new sandboxes."""
    free = ray.available_resources().get("capsa_slots", 0)
    vm = await builder("b").build()
    host, pids = await vm_pids(nodes.b)
    assert pids and sorted(qemu_children([host.pid])) == sorted(pids)
    os.kill(host.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(capsa.SandboxLost) as lost:
        await vm.agent.exec("true").run()
    log.info("SandboxLost %.1fs after the host actor was killed", time.monotonic() - started)
    assert time.monotonic() - started < LOST_WITHIN
    assert lost.value.node_id == nodes.b
    assert await wait_gone(pids, 5.0) == []
    again = await builder("b").build()
    assert again.node_id == nodes.b
    await again.stop()
    deadline = time.monotonic() + 20  # the dead actor's slot reservation is removed by the driver
    while ray.available_resources().get("capsa_slots", 0) < free and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert ray.available_resources().get("capsa_slots", 0) >= free


async def test_removed_node_raises_sandbox_lost_and_new_sandboxes_go_to_survivors(
    nodes: Nodes,
) -> None:
    c = nodes.cluster.add_node(num_cpus=1, resources={"capsa_slots": 2}, labels={"zone": "c"})
    vm = await builder("c").build()
    assert vm.node_id == c.node_id
    _, pids = await vm_pids(c.node_id)
    nodes.cluster.remove_node(c, allow_graceful=False)
    started = time.monotonic()
    with pytest.raises(capsa.SandboxLost) as lost:
        while time.monotonic() - started < LOST_WITHIN:  # until Ray has noticed, calls may work
            await vm.agent.exec("true").run()
            await asyncio.sleep(0.2)
    log.info("SandboxLost %.1fs after the node was removed", time.monotonic() - started)
    assert time.monotonic() - started < LOST_WITHIN and lost.value.node_id == c.node_id
    assert await wait_gone(pids, 10.0) == []
    survivors = [await builder().build() for _ in range(2)]
    try:
        assert {s.node_id for s in survivors} <= {nodes.a, nodes.b}
    finally:
        await asyncio.gather(*(s.stop() for s in survivors))


@pytest.mark.timeout(300)
async def test_serve_ray_records_a_sandbox_lost_with_its_host_as_node_lost(
    nodes: Nodes, tmp_path: Path
) -> None:
    """``capsa serve --ray``: a sandbox whose host actor dies with its QEMU (kill -9; a node's
    death surfaces the same way, as SandboxLost) is recorded ended with the reason ``node_lost``
    (``/capsa/ends``, ``/metrics``), and the server runs on."""
    e2b = pytest.importorskip("e2b")
    httpx = pytest.importorskip("httpx")
    proc, url, out = _start_serve(nodes.cluster.address, tmp_path)
    opts = {"api_key": SERVE_KEY, "api_url": url, "sandbox_url": url}
    headers = {"X-API-KEY": SERVE_KEY}
    try:
        await _healthy(proc, url, out, 150)
        sandbox = await e2b.AsyncSandbox.create(timeout=300, **opts)
        assert (await sandbox.commands.run("echo up")).stdout == "up\n"
        actors = server_actors()
        assert actors, out.read_text()[-3000:]
        for pid in actors:  # the server's host actors on both nodes: the sandbox's among them
            os.kill(pid, signal.SIGKILL)
        row: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=10, headers=headers) as client:
            while not row and time.monotonic() < deadline:
                ends = (await client.get(f"{url}/capsa/ends")).json()
                row = next((r for r in ends if r["sandboxID"] == sandbox.sandbox_id), {})
                await asyncio.sleep(0.5)
            assert row.get("reason") == "node_lost", (row, out.read_text()[-3000:])
            assert row["detail"], row
            metrics = (await client.get(f"{url}/metrics")).text
            assert 'capsa_server_sandbox_ends_total{reason="node_lost"} 1.0' in metrics
            assert (await client.get(f"{url}/health")).status_code == 200
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
        except TimeoutError:
            proc.kill()
            raise


async def test_driver_sigkill_leaves_no_qemu(nodes: Nodes) -> None:
    """A driver killed with SIGKILL (sandboxes and a warm pool on both nodes): Ray ends its
    non-detached host actors and every QEMU dies with them."""
    driver = await asyncio.create_subprocess_exec(
        sys.executable, str(DRIVER), nodes.cluster.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert driver.stdout is not None and driver.stderr is not None
    try:
        async with asyncio.timeout(180):
            line = await driver.stdout.readline()
            while line and not line.startswith(b"{"):  # Ray may forward its logs to stdout
                line = await driver.stdout.readline()
        if not line:
            err = await driver.stderr.read()
            pytest.fail(f"the driver script failed:\n{err.decode(errors='replace')[-3000:]}")
        report = json.loads(line)
        actors, pids = report["actor_pids"], report["vm_pids"]
        assert len(pids) >= 4 and qemu_alive(pids) == pids  # 2 sandboxes + a pool VM per node
        assert sorted(qemu_children(actors)) == sorted(pids)
    finally:
        driver.send_signal(signal.SIGKILL)
        await asyncio.wait_for(driver.wait(), 10)
    deadline = time.monotonic() + 60
    while (qemu_alive(pids) or qemu_children(actors)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert qemu_alive(pids) == [] and qemu_children(actors) == []
