"""Attacks on a Ray node through capsa's host actor: a hostile driver calls the actor's methods
directly (not through capsa.ray's handle) with the node's files and ports as arguments. The actor
is driven here without a cluster; tests/ray/netns_suite.py repeats the attack through a real Ray
cluster (test_a_hostile_driver_gets_no_host_path_and_no_slot_over_the_limit) and checks that two
drivers cannot over-fill a node's slots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import capsa
from capsa.net.gateway import PortForward
from capsa.net.stack import NetworkStack
from capsa.ray._host import HostActor
from capsa.ray._wire import decode_error
from capsa.sandbox.builder import SandboxConfig
from capsa.sandbox.handle import Sandbox

pytestmark = pytest.mark.asyncio

ENV = ("CAPSA_RAY_HOST_ROOT", "CAPSA_RAY_FORWARD_PORTS", "CAPSA_RAY_ALLOW_INTERNAL")


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A node whose owner allows host paths under ``tmp_path/root`` only (nothing else)."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("the node's secret")
    (root / "out").symlink_to(tmp_path / "outside")
    monkeypatch.setenv("CAPSA_RAY_HOST_ROOT", str(root))
    return root


def _error(reply: object) -> BaseException:
    assert isinstance(reply, tuple) and reply[0] == "err", reply
    return decode_error(reply[1], "node x")


async def test_a_hostile_driver_cannot_boot_host_files_as_kernel_or_disk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: a driver asks the node's actor to boot /etc/shadow as its root disk (which the guest
    would read as /dev/vda) or /etc/passwd as its kernel, on a node that allows no host paths. The
    answer must be the same ConfigError whether the file exists or not (no existence oracle), and
    no VM may start."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    host = HostActor(slots=4)
    errors = [
        _error(await host.build([("kernel", ("/etc/passwd",), {})], 5)),
        _error(await host.build([("kernel", ("/no/such/kernel",), {})], 5)),
        _error(await host.build([("__config__", (SandboxConfig(rootfs=Path("/etc/shadow")),), {})], 5)),
    ]
    for error in errors:
        assert isinstance(error, capsa.ConfigError), repr(error)
        assert "takes no host paths" in str(error) and "CAPSA_RAY_HOST_ROOT" in (error.hint or "")
    assert await host.vm_pids() == [] and await host.load() == (0, 4)


async def test_a_hostile_driver_cannot_share_or_snapshot_outside_the_root(
    node: Path, tmp_path: Path
) -> None:
    """Attack: with a root configured, a driver shares /etc (or the root's symlink out of it, or
    ``../outside``) into its guest, or writes a snapshot outside the root through such a path."""
    host = HostActor(slots=4)
    for path in ("/etc", "out", "../outside", str(node / "out")):
        error = _error(await host.build([("share", (path, "/mnt/x"), {})], 5))
        assert isinstance(error, capsa.ConfigError) and "outside this Ray node's host root" in str(
            error
        ), repr(error)
    vm = Sandbox.__new__(Sandbox)  # no VM: the path check comes before the sandbox is used
    oid = host._register(vm, -1)  # (registered as a child, so the actor does not poll its state)
    for target in (tmp_path / "outside" / "snap", "out/snap", "/tmp/capsa-ray-face-snap"):
        error = _error(await host.call(oid, [("snapshot", (str(target),), {})]))
        assert isinstance(error, capsa.ConfigError), repr(error)
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret"]
    assert not Path("/tmp/capsa-ray-face-snap").exists()


async def test_a_hostile_driver_cannot_bind_node_ports(node: Path) -> None:
    """Attack: a driver makes the node listen on 0.0.0.0:2222 (its guest's ssh on the node's
    network), on a node that allows remote callers no port forwards."""
    host = HostActor(slots=4)
    stack = NetworkStack.__new__(NetworkStack)
    oid = host._register(stack, None)
    forward = PortForward("tcp", 2222, 22, "0.0.0.0")
    error = _error(await host.call(oid, [("add_forward", (forward,), {})]))
    assert isinstance(error, capsa.ConfigError) and "port forwards are off" in str(error)


async def test_host_paths_resolve_inside_the_root_only(node: Path, tmp_path: Path) -> None:
    """Attack: paths that name the root but resolve elsewhere (``..``, a symlink, a NUL byte, a
    non-path object) are refused; paths inside it are handed on resolved."""
    from capsa.ray._node_policy import NodePolicy

    policy = NodePolicy.from_environ()
    (node / "data").mkdir()
    assert policy.host_path("data", "x") == node / "data"
    assert policy.host_path(str(node / "data" / "new"), "x") == node / "data" / "new"
    assert policy.host_path(node, "x") == node
    for bad in ("../outside/secret", "out/secret", "data/../../outside", "a\0b", 7, b"/etc"):
        with pytest.raises(capsa.ConfigError):
            policy.host_path(bad, "x")
    with pytest.raises(capsa.ConfigError):
        policy.host_path(tmp_path / "root" / ".." / "outside", "x")


async def test_images_forwards_internal_and_writable_shares_follow_the_node(
    node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: an image, made field by field, that imports the node's files (an archive, copy() of a
    folder, a file: apt source or pip index, a local .deb as a package name), a forward on the node's network, the node's internal networks, and a
    writable share (with which the guest could plant a snapshot's metadata under the root)."""
    from capsa.ray._node_policy import NodePolicy
    from capsa.recipes.image import Image
    from capsa.recipes.steps import Step

    policy = NodePolicy.from_environ()
    debian = Image.debian()
    for image in (
        Image("oci", Path("/var/lib/docker/secret.tar"), "x"),
        Image("debian", Path("/"), "x", (Step("copy", ("/root", "/r")),)),
        Image("debian", Path("/"), "x", (Step("copy", (str(node / "out"), "/r")),)),
        debian.apt_install("hello", sources="deb [trusted=yes] file:/var/cache/apt/archives ./"),
        Image(
            "debian", Path("/"), "x", (Step("pip", ("attrs",), (("index_url", "file:///root/wheels"),)),)
        ),
        Image("debian", Path("/"), "x", (Step("pip", ("attrs",), (("find_links", "/root"),)),)),
        Image("any", Path("/etc/shadow"), "x"),  # a kind of its own: its archive is read too
        Image("debian", Path("/"), "x", (Step("apt", ("/root/secret.deb",)),)),  # a local .deb
        Image("debian", Path("/"), "x", (Step("exfil", ("/etc",)),)),  # type: ignore[arg-type]
    ):
        with pytest.raises(capsa.ConfigError):
            policy.image(image)
    ok = debian.apt_install("hello", sources="deb [trusted=yes] http://127.0.0.1:8000/ ./")
    ok = ok.pip_install("attrs", index_url="https://example.invalid/simple")
    assert policy.image(ok) == ok
    gateway = capsa.Gateway()
    for network in (
        capsa.VirtualNetwork.with_gateway(gateway.forward_tcp(2222, 22, host_address="0.0.0.0")),
        capsa.VirtualNetwork.with_gateway(gateway.forward_tcp(0, 22)),
        capsa.VirtualNetwork.with_gateway(gateway.allow_internal_destinations()),
    ):
        with pytest.raises(capsa.ConfigError):
            policy.network(network)
    monkeypatch.setenv("CAPSA_RAY_FORWARD_PORTS", "20000-20009")
    ranged = NodePolicy.from_environ()
    assert ranged.forward(PortForward("tcp", 20005, 22)).host_port == 20005
    for refused in (PortForward("tcp", 20005, 22, "0.0.0.0"), PortForward("tcp", 0, 22)):
        with pytest.raises(capsa.ConfigError):
            ranged.forward(refused)
    (node / "data").mkdir()
    writable = capsa.sandbox().share(node / "data", "/mnt/data", capsa.AccessMode.READ_WRITE)
    with pytest.raises(capsa.ConfigError, match="read-only"):
        policy.config(writable.config)
    readable = policy.config(capsa.sandbox().share(node / "data", "/mnt/data").config)
    assert readable.shares[0].host_path == node / "data"
    for bad in ("relative", "/no/such/dir"):
        monkeypatch.setenv("CAPSA_RAY_HOST_ROOT", bad)
        with pytest.raises(capsa.ConfigError):
            NodePolicy.from_environ()
    assert os.environ["CAPSA_RAY_FORWARD_PORTS"] == "20000-20009"


async def test_a_hostile_driver_cannot_attach_a_host_file_as_a_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: a driver hands the node's actor a ``Volume`` whose image is /etc/shadow (through the
    builder's ``volume()`` or a whole ``SandboxConfig``): the guest would get the node's file as a
    read-write disk. Volumes are refused through the Ray face, before anything is opened."""
    from capsa.volume.spec import VolumeMount
    from capsa.volume.store import Volume

    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    host = HostActor(slots=4)
    shadow = Volume(name="shadow", path=Path("/etc/shadow"))
    config = SandboxConfig(volumes=(VolumeMount(shadow, "/data"),))
    errors = [
        _error(await host.build([("volume", (shadow, "/data"), {})], 5)),
        _error(await host.build([("__config__", (config,), {})], 5)),
    ]
    for error in errors:
        assert isinstance(error, capsa.ConfigError), repr(error)
        assert "volumes are not available through capsa's Ray face" in str(error)
    assert await host.vm_pids() == [] and await host.load() == (0, 4)
