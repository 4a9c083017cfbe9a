"""pytest plugin (entry point ``pytest11``): sandboxes as fixtures.

::

    def test_python_runs(capsa_sandbox):
        assert capsa_sandbox.agent.exec("python3").args(["-c", "print(1)"]).run().stdout == "1\\n"

    @pytest.mark.capsa(memory_mb=1024, shares=[("./src", "/src", "ro")], image="myapp")
    def test_with_options(capsa_sandbox_factory):
        a = capsa_sandbox_factory()
        b = capsa_sandbox_factory(cpus=2, network=["pypi.org", "files.pythonhosted.org"])

    def test_client_and_server(capsa_cluster):
        server = capsa_cluster.add("server", capsa.sync.sandbox())   # reachable as "server"
        client = capsa_cluster.add("client", capsa.sync.sandbox())

The fixtures hand out :class:`capsa.sync.SyncSandbox` and :class:`capsa.sync.SyncCluster` objects,
so they work in plain (non-asyncio) tests; each sandbox and cluster is stopped after the test. When
a test fails, the console transcript and QEMU log of every sandbox (and cluster member) it used are
attached to the report. Without QEMU the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from capsa.backend.qemu.process import QEMU_BINARY, read_tail
from capsa.errors import ConfigError
from capsa.net.gateway import Gateway, VirtualNetwork
from capsa.net.policy import NetworkPolicy
from capsa.recipes.store import resolve_image
from capsa.shares.spec import AccessMode
from capsa.sync import SyncCluster, SyncSandbox, SyncSandboxBuilder, SyncVM, cluster, sandbox

_SANDBOXES = pytest.StashKey[list[SyncSandbox]]()
_CLUSTERS = pytest.StashKey[list[SyncCluster]]()
_OPTIONS = ("cpus", "memory_mb", "shares", "network", "cold", "timeout", "image")
_MODES = {"ro": AccessMode.READ_ONLY, "rw": AccessMode.READ_WRITE}

SandboxFactory = Callable[..., SyncSandbox]
ClusterFactory = Callable[..., SyncCluster]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "capsa(cpus=1, memory_mb=512, shares=[(host, guest, 'ro'|'rw')], network=None, cold=False, "
        "timeout=120, image=None): options for the capsa_sandbox fixtures; network is True (all "
        "egress), a list of allowed domains, a NetworkPolicy or a VirtualNetwork; image is a "
        "capsa.Image, a name from `capsa image import/build --name`, a .toml recipe or an archive",
    )


def _builder(options: dict[str, Any]) -> tuple[SyncSandboxBuilder, float]:
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown capsa marker options {sorted(unknown)}; known: {list(_OPTIONS)}")
    builder = sandbox()
    if "cpus" in options:
        builder = builder.cpus(options["cpus"])
    if "memory_mb" in options:
        builder = builder.memory_mb(options["memory_mb"])
    for share in options.get("shares", ()):
        host, guest, *rest = share
        mode = rest[0] if rest else "ro"
        builder = builder.share(host, guest, _MODES[mode] if isinstance(mode, str) else mode)
    network = _network(options.get("network"))
    if network is not None:
        builder = builder.network(network)
    if options.get("cold"):
        builder = builder.cold()
    image = options.get("image")
    if image is not None:
        named = isinstance(image, (str, os.PathLike))
        builder = builder.image(resolve_image(os.fspath(image)) if named else image)
    return builder, float(options.get("timeout", 120.0))


def _network(value: object) -> VirtualNetwork | None:
    if value is None or value is False:
        return None
    if value is True:
        return VirtualNetwork()
    if isinstance(value, VirtualNetwork):
        return value
    if isinstance(value, NetworkPolicy):
        return VirtualNetwork.with_gateway(Gateway().policy(value))
    if isinstance(value, (list, tuple)) and all(isinstance(d, str) for d in value):
        policy = NetworkPolicy.deny_all()
        for domain in value:
            policy = policy.allow_domain(domain)
        return VirtualNetwork.with_gateway(Gateway().policy(policy))
    raise ConfigError(
        f"the capsa marker's network must be True, a list of domains, a NetworkPolicy or a "
        f"VirtualNetwork, got {value!r}"
    )


@pytest.fixture
def capsa_sandbox_factory(request: pytest.FixtureRequest) -> Iterator[SandboxFactory]:
    """``capsa_sandbox_factory(**options)`` boots a sandbox (options as in the ``capsa`` marker,
    overriding it) and kills it after the test."""
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"capsa: {QEMU_BINARY} is not installed (apt-get install qemu-system-x86)")
    marker = request.node.get_closest_marker("capsa")
    defaults = dict(marker.kwargs) if marker else {}
    started = request.node.stash.setdefault(_SANDBOXES, [])

    def make(**options: Any) -> SyncSandbox:
        builder, timeout = _builder({**defaults, **options})
        vm = builder.build(timeout)
        started.append(vm)
        return vm

    try:
        yield make
    finally:
        for vm in started:
            vm.kill()


@pytest.fixture
def capsa_sandbox(capsa_sandbox_factory: SandboxFactory) -> SyncSandbox:
    """A fresh sandbox (configured by the ``capsa`` marker), killed after the test."""
    return capsa_sandbox_factory()


@pytest.fixture
def capsa_cluster_factory(request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """``capsa_cluster_factory(network=None)`` starts a :class:`capsa.sync.SyncCluster` (its
    members talk to each other by name; ``network`` as in the ``capsa`` marker decides what may
    leave it, by default nothing) and stops it, with every member, after the test."""
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"capsa: {QEMU_BINARY} is not installed (apt-get install qemu-system-x86)")
    marker = request.node.get_closest_marker("capsa")
    default = marker.kwargs.get("network") if marker else None
    started = request.node.stash.setdefault(_CLUSTERS, [])

    def make(network: object = None) -> SyncCluster:
        net = _network(default if network is None else network)
        if net is None:
            net = VirtualNetwork.with_gateway(Gateway().policy(NetworkPolicy.deny_all()))
        c = cluster(net).__enter__()
        started.append(c)
        return c

    try:
        yield make
    finally:
        for c in started:
            c.stop()


@pytest.fixture
def capsa_cluster(capsa_cluster_factory: ClusterFactory) -> SyncCluster:
    """A cluster whose members reach each other by name (nothing leaves it unless the ``capsa``
    marker's ``network`` allows it): ``capsa_cluster.add("db", capsa.sync.sandbox())``. Every
    member is stopped after the test."""
    return capsa_cluster_factory()


def _vms_of(item: pytest.Item) -> list[tuple[str, SyncVM]]:
    """The sandboxes and cluster members a test used, named for its report."""
    sandboxes: list[SyncSandbox] = item.stash.get(_SANDBOXES, [])
    clusters: list[SyncCluster] = item.stash.get(_CLUSTERS, [])
    vms: list[tuple[str, SyncVM]] = [
        (f"capsa sandbox {index}", vm) for index, vm in enumerate(sandboxes)
    ]
    for c in clusters:
        for member in c.members():
            vms.append((f"capsa cluster member {member.name}", c[member.name]))
    return vms


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for label, vm in _vms_of(item):
            try:
                logs = Path(vm.log_dir)
            except Exception:  # stopped: its logs are gone with it
                continue
            report.sections.append((f"{label}: console", read_tail(logs / "console.log", 200)))
            report.sections.append((f"{label}: QEMU log", read_tail(logs / "qemu.log", 50)))
    return report
