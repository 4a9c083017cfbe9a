"""``capsa.cluster(network)``: several VMs on one private network, for integration tests of
distributed software.

::

    net = capsa.VirtualNetwork.with_gateway(Gateway("10.0.7.0/24").policy(NetworkPolicy.deny_all()))
    async with capsa.cluster(net) as c:
        db = await c.add("db", capsa.sandbox())        # reachable as "db" from every member
        app = await c.add("app", capsa.sandbox())
        c.partition({"db"}, {"app"}); c.heal()

One switch per cluster in capsa's network stack (:mod:`capsa.net.switch`) joins the members' links
in the host process. Members get stable addresses by name (sandboxes take theirs from the host,
raw VMs by DHCP) and a fixed MAC; the gateway's DNS answers members' names before applying the
policy to anything else. Member-to-member traffic never passes the NAT or the egress policy; traffic
leaving the cluster passes the cluster's one policy and is logged per member (:meth:`Cluster.log`).
Leaving the ``async with`` block stops every member.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from capsa._context import StopsOnExit
from capsa._guardian import new_vm_dir
from capsa.errors import ConfigError
from capsa.net.forward import ForwardedPort
from capsa.net.gateway import Gateway, PortForward, VirtualNetwork
from capsa.net.stack import ATTACH, GATEWAY_MAC, LogEntry, NetworkStack
from capsa.net.switch import Switch
from capsa.sandbox.builder import SandboxBuilder, sandbox
from capsa.sandbox.handle import Sandbox
from capsa.snapshot.store import remove_snapshot
from capsa.vm.builder import VMBuilder
from capsa.vm.handle import VM

log = logging.getLogger(__name__)

DEFAULT_ADD_TIMEOUT = 120.0
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Member:
    """One member as :meth:`Cluster.members` reports it."""

    name: str
    address: str
    kind: str  # "sandbox" or "vm"
    state: str  # the VM's run state: "running", "stopped", "failed", ...

    @property
    def alive(self) -> bool:
        return self.state == "running"


def _member_name(name: object) -> str:
    if not isinstance(name, str) or not _HOSTNAME.match(name.lower()):
        raise ConfigError(
            f"a member name must be a valid hostname, got {name!r:.80}",
            hint="letters, digits and '-', 1-63 characters, not starting or ending with '-'",
        )
    return name.lower()


class ClusterState(enum.Enum):
    """``CREATED → RUNNING`` (inside ``async with``) ``→ STOPPED``; members join only while running."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class Cluster(StopsOnExit):
    """Several VMs on one private network. Create it with ``capsa.cluster(network)`` and use it as an
    async context manager; :meth:`add` members inside the block."""

    def __init__(self, network: VirtualNetwork) -> None:
        if not isinstance(network, VirtualNetwork):
            raise ConfigError("cluster() takes a VirtualNetwork")
        if network.gateway.forwards:
            raise ConfigError(
                "a cluster's network cannot carry port forwards (which member would they reach?)",
                hint="use c.forward_tcp(host_port, member, guest_port) once the member is added",
            )
        self._network = network
        self._gateway: Gateway = network.gateway
        self._switch = Switch(self._gateway)
        self._vms: dict[str, VM] = {}
        self._builders: dict[str, SandboxBuilder | VMBuilder] = {}
        self._addresses: dict[str, ipaddress.IPv4Address] = {}
        self._macs: dict[str, bytes] = {}
        self._forwards: dict[str, list[ForwardedPort]] = {}
        self._snapshots: Path | None = None  # where the snapshots of add_forks() are kept
        self._state = ClusterState.CREATED

    # -- lifecycle --

    async def __aenter__(self) -> Cluster:
        if self._state is not ClusterState.CREATED:
            raise ConfigError("a cluster is entered once")
        self._state = ClusterState.RUNNING
        return self

    async def stop(self) -> None:
        """Stop every member (gracefully, then by force); the cluster takes no new members."""
        self._state = ClusterState.STOPPED
        vms = list(self._vms.values())
        results = await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)
        for vm, result in zip(vms, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("a cluster member did not stop cleanly (%r); killing it", result)
                await vm.kill()
        if self._snapshots is not None:
            remove_snapshot(self._snapshots)

    # -- members --

    def _check_running(self) -> None:
        if self._state is not ClusterState.RUNNING:
            raise ConfigError(
                f"the cluster is {self._state.value}: "
                "members are added inside 'async with capsa.cluster()'"
            )

    def _reserve(self, name: str) -> None:
        if name in self._addresses:
            raise ConfigError(f"the cluster already has a member named {name!r}")
        taken = set(self._addresses.values()) | {self._gateway.gateway_ip}
        address = next((ip for ip in self._gateway.network.hosts() if ip not in taken), None)
        if address is None:
            raise ConfigError(
                f"the cluster's subnet {self._gateway.subnet} has no address left for {name!r}",
                hint="use a larger subnet, e.g. Gateway('10.0.7.0/24')",
            )
        mac = GATEWAY_MAC
        while mac == GATEWAY_MAC or mac in self._macs.values():
            mac = bytes.fromhex("525400") + secrets.token_bytes(3)
        self._addresses[name] = address
        self._macs[name] = mac
        self._switch.assign(name, address)

    def _release(self, name: str) -> None:
        self._addresses.pop(name, None)
        self._macs.pop(name, None)
        self._switch.assign(name, None)

    def _port(self, name: str) -> NetworkStack:
        return NetworkStack(
            replace(self._gateway, forwards=()), hostname=name, guest_ip=self._addresses[name],
            switch=self._switch, name=name, mac=self._macs[name],
        )  # fmt: skip

    async def add(
        self, name: str, builder: SandboxBuilder | VMBuilder, timeout: float = DEFAULT_ADD_TIMEOUT
    ) -> Sandbox | VM:
        """Build ``builder`` (``capsa.sandbox()`` or ``capsa.vm(boot)``) as member ``name``: its NIC
        joins the cluster's switch (whatever network the builder had) and ``name`` resolves to its
        address for every member. Sandboxes get their address from the host, raw VMs by DHCP."""
        self._check_running()
        name = _member_name(name)
        if isinstance(builder, VM):
            raise ConfigError(
                f"member {name!r}: this VM is already built and has a network of its own",
                hint="pass a builder: c.add(name, capsa.sandbox()) or c.add(name, capsa.vm(boot))",
            )
        if not isinstance(builder, SandboxBuilder | VMBuilder):
            raise ConfigError(f"add() takes a sandbox or VM builder, got {type(builder).__name__}")
        self._reserve(name)
        try:
            vm = await self._build(name, builder, timeout)
        except BaseException:
            self._release(name)
            raise
        self._builders[name] = builder
        return vm

    async def _build(self, name: str, builder: SandboxBuilder | VMBuilder, timeout: float) -> VM:
        token = ATTACH.set(lambda gateway, guest_ip: self._port(name))
        try:
            vm: VM = await builder.network(self._network).build(timeout)
        finally:
            ATTACH.reset(token)
        try:
            if isinstance(vm, Sandbox):
                await vm.agent.refresh(name, vm.network.identity())  # its name and address
        except BaseException:
            await vm.kill()
            raise
        self._vms[name] = vm
        for forward in self._forwards.get(name, []):
            await vm.network.add_forward(_as_forward(forward))
        return vm

    async def add_forks(
        self, name: str, source: Sandbox, count: int, timeout: float = DEFAULT_ADD_TIMEOUT
    ) -> list[Sandbox]:
        """``count`` forks of the running sandbox ``source`` (a member or not; it needs a network)
        as members ``name-0`` … ``name-{count-1}``, each with a fresh MAC and address.

        The cluster keeps the snapshot the forks start from until it stops, so :meth:`restart` of
        a fork brings it back as it was when forked, with the same name, address and MAC."""
        self._check_running()
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"fork count must be a positive integer, got {count!r}")
        if not isinstance(source, Sandbox):
            raise ConfigError("add_forks() forks a running sandbox")
        if source.config.network is None:
            raise ConfigError(
                "the source sandbox has no network device, so its forks cannot join a cluster",
                hint="build the source with .network(...) or add it to the cluster first",
            )
        names = [_member_name(f"{name}-{i}") for i in range(count)]
        reserved: list[str] = []
        try:
            for member in names:
                self._reserve(member)
                reserved.append(member)
            builder = await self._fork_builder(names[0], source, timeout)
        except BaseException:
            for member in reserved:
                self._release(member)
            raise
        results = await asyncio.gather(
            *(self._build(member, builder, timeout) for member in names), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for member, result in zip(names, results, strict=True):
                if isinstance(result, VM):
                    await result.kill()
                self._vms.pop(member, None)
                self._release(member)
            assert self._snapshots is not None
            remove_snapshot(self._snapshots / names[0])
            raise failures[0]
        for member in names:
            self._builders[member] = builder
        return [r for r in results if isinstance(r, Sandbox)]

    async def _fork_builder(self, first: str, source: Sandbox, timeout: float) -> SandboxBuilder:
        """A builder restoring a snapshot of ``source`` taken now (kept until the cluster stops),
        with the time ``source`` has left to live (a fork never outlives its parent's deadline)."""
        if self._snapshots is None:
            self._snapshots = new_vm_dir("cluster-")
        snapshot = await source.snapshot(self._snapshots / first, timeout)
        builder = sandbox().from_snapshot(snapshot)
        remaining = source.lifetime_remaining
        return builder if remaining is None else builder.lifetime(max(remaining, 0.001))

    def __getitem__(self, name: str) -> VM:
        return self._vm(name)

    def _vm(self, name: str) -> VM:
        try:
            return self._vms[str(name).lower()]
        except KeyError:
            raise ConfigError(f"the cluster has no member named {name!r:.80}") from None

    def address(self, name: str) -> str:
        """The member's IPv4 address on the cluster's network."""
        self._vm(name)
        return str(self._addresses[name.lower()])

    def members(self) -> list[Member]:
        """Every member, dead ones too (a member that died does not take the others down)."""
        return [
            Member(
                name,
                str(self._addresses[name]),
                "sandbox" if isinstance(vm, Sandbox) else "vm",
                vm.status.value,
            )
            for name, vm in self._vms.items()
        ]

    @property
    def spoofed_frames(self) -> int:
        """Frames the switch dropped because a member sent them from a MAC or address not its own
        (a forged Ethernet source, IPv4 source or ARP sender); the first of each member is logged."""
        return self._switch.spoofed

    def log(self) -> list[LogEntry]:
        """Every egress decision of every member, oldest first; ``entry.member`` names the member."""
        entries: list[LogEntry] = []
        for vm in self._vms.values():
            with contextlib.suppress(Exception):
                entries += vm.network.log()
        return sorted(entries, key=lambda entry: entry.time)

    # -- rules between members --

    def _pair(self, a: str, b: str) -> tuple[str, str]:
        first, second = self._vm(a), self._vm(b)
        if first is second:
            raise ConfigError(f"{a!r} and {b!r} are the same member")
        return a.lower(), b.lower()

    def policy_between(self, a: str, b: str, *, allow: bool = False) -> None:
        """Block (``allow=False``) or allow again traffic between members ``a`` and ``b``. A blocked
        TCP connect gets an RST at once and is logged as denied."""
        self._switch.block(*self._pair(a, b), blocked=not allow)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the links between members of different groups (frames are dropped, as by a cut cable:
        connects time out). Members named in no group keep all their links. Replaces a previous
        partition; :meth:`heal` undoes it."""
        if len(groups) < 2:
            raise ConfigError("partition() takes at least two groups of member names")
        seen: set[str] = set()
        frozen: list[frozenset[str]] = []
        for group in groups:
            if isinstance(group, str):
                raise ConfigError(f"each group is a set of names, got the string {group!r}")
            names = frozenset(str(n).lower() for n in group)
            for member in names:
                self._vm(member)
            if names & seen:
                raise ConfigError(f"members {sorted(names & seen)} are in two groups")
            seen |= names
            frozen.append(names)
        self._switch.partition(*frozen)

    def heal(self) -> None:
        """Undo :meth:`partition`, :meth:`delay` and :meth:`loss` (not :meth:`policy_between`)."""
        self._switch.heal()

    def delay(self, a: str, b: str, ms: float) -> None:
        """Hold frames between ``a`` and ``b`` (both ways) for ``ms`` milliseconds; 0 removes it."""
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= 60_000:
            raise ConfigError(f"delay must be 0..60000 ms, got {ms!r}")
        self._switch.set_delay(*self._pair(a, b), ms / 1000)

    def loss(self, a: str, b: str, fraction: float) -> None:
        """Drop this fraction (0..1) of the frames between ``a`` and ``b``, at random."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise ConfigError(f"loss must be a fraction 0..1, got {fraction!r}")
        self._switch.set_loss(*self._pair(a, b), float(fraction))

    # -- faults and forwards --

    async def kill(self, name: str) -> None:
        """Kill member ``name`` at once (its address stays reserved for :meth:`restart`)."""
        await self._vm(name).kill()

    async def restart(self, name: str, timeout: float = DEFAULT_ADD_TIMEOUT) -> Sandbox | VM:
        """Kill member ``name`` if it runs, and build it again: same name, address and MAC, a fresh
        guest from its builder (a fork: restored from the snapshot it was forked from)."""
        self._check_running()
        vm = self._vm(name)
        await vm.kill()
        return await self._build(name.lower(), self._builders[name.lower()], timeout)

    async def forward_tcp(
        self, host_port: int, name: str, guest_port: int, *, host_address: str = "127.0.0.1"
    ) -> ForwardedPort:
        """Connections to ``host_address:host_port`` reach member ``name``'s ``guest_port`` (host
        port 0 picks a free one: see the returned ``host_port``). Kept across :meth:`restart`."""
        vm = self._vm(name)
        forward = Gateway().forward_tcp(host_port, guest_port, host_address=host_address).forwards[0]
        bound = await vm.network.add_forward(forward)
        self._forwards.setdefault(name.lower(), []).append(bound)
        return bound


def _as_forward(bound: ForwardedPort) -> PortForward:
    proto: Literal["tcp", "udp"] = "tcp" if bound.proto == "tcp" else "udp"
    return PortForward(proto, bound.host_port, bound.guest_port, bound.host_address)


def cluster(network: VirtualNetwork) -> Cluster:
    """Several VMs on one private network: ``async with capsa.cluster(net) as c: await c.add(...)``."""
    return Cluster(network)
