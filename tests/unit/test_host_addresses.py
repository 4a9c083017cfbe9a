"""The host's own addresses: asked of the kernel per destination, so every interface counts and a
change is seen at once; the /proc/net/fib_trie fallback; ``is_internal`` refuses them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from capsa.net import host_addresses
from capsa.net.host_addresses import is_host_address, local_networks_from_fib_trie
from capsa.net.policy import is_internal

NOT_LOCAL = IPv4Address("198.51.100.20")  # TEST-NET-2: never an address of this host


def _primary_address() -> IPv4Address | None:
    """The address this host would send from to the outside (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.20", 9))
        except OSError:
            return None
        address = IPv4Address(probe.getsockname()[0])
    return None if address.is_unspecified else address


def test_loopback_and_this_hosts_interface_address_are_the_hosts() -> None:
    assert is_host_address(IPv4Address("127.0.0.1"))
    assert is_host_address(IPv4Address("127.3.4.5"))  # the whole of 127/8 is local
    assert not is_host_address(NOT_LOCAL)
    primary = _primary_address()
    if primary is not None:
        assert is_host_address(primary), primary
        assert is_internal(primary), "the host's own address must count as internal"
    assert not is_internal(NOT_LOCAL)


def test_every_interface_address_of_this_host_is_refused() -> None:
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                           check=True, timeout=10).stdout  # fmt: skip
    addresses = [IPv4Address(line.split()[3].split("/")[0]) for line in shown.splitlines()]
    assert addresses
    for address in addresses:
        assert is_host_address(address) and is_internal(address), address


CHANGES = """
import subprocess, time
from ipaddress import IPv4Address
from capsa.net.host_addresses import is_host_address
def ip(*args):
    subprocess.run(["ip", *args], check=True, timeout=10)
address = IPv4Address("203.0.113.7")
ip("link", "set", "lo", "up")
ip("link", "add", "capsa0", "type", "veth", "peer", "name", "capsa1")
before = is_host_address(address)
ip("addr", "add", "203.0.113.7/24", "dev", "capsa0")
added = is_host_address(address)
ip("link", "set", "capsa0", "up")
up = is_host_address(address)
ip("addr", "del", "203.0.113.7/24", "dev", "capsa0")
removed = is_host_address(address)
ip("route", "add", "local", "198.51.100.0/24", "dev", "lo")  # AnyIP: a whole local range
anyip = is_host_address(IPv4Address("198.51.100.99"))
started = time.perf_counter()
for _ in range(1000):
    is_host_address(address)
per_call = (time.perf_counter() - started) / 1000
print(before, added, up, removed, anyip, round(per_call * 1e6, 1))
"""


def _unshare() -> list[str]:
    return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]


def test_a_new_address_counts_at_once_and_a_removed_one_stops_counting() -> None:
    """In a network namespace of the test's own: no cache can hide an address added a moment ago."""
    result = subprocess.run([*_unshare(), sys.executable, "-c", CHANGES], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    before, added, up, removed, anyip, micros = result.stdout.split()
    assert (before, added, up, removed, anyip) == ("False", "True", "True", "False", "True")
    assert float(micros) < 500, f"{micros} µs per lookup"


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 172.17.0.0/16 2 0 2
        |-- 172.17.0.0
           /16 link UNICAST
        |-- 172.17.0.5
           /32 host LOCAL
     |-- 203.0.113.7
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 203.0.113.7
        /32 host LOCAL
"""


def test_the_fib_trie_fallback_reads_local_entries() -> None:
    networks = local_networks_from_fib_trie(FIB_TRIE)
    assert IPv4Network("127.0.0.0/8") in networks
    assert IPv4Network("172.17.0.5/32") in networks and IPv4Network("203.0.113.7/32") in networks
    assert IPv4Network("172.17.0.0/16") not in networks  # a route, not an address of the host
    assert IPv4Network("0.0.0.0/0") not in networks


def test_without_netlink_the_fallback_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(address: IPv4Address) -> bool:
        raise OSError("no netlink here")

    monkeypatch.setattr(host_addresses, "_route_is_local", broken)
    assert is_host_address(IPv4Address("127.0.0.1"))
    assert not is_host_address(NOT_LOCAL)
    primary = _primary_address()
    if primary is not None:
        assert is_host_address(primary)


def test_the_lookup_is_cheap() -> None:
    started = time.perf_counter()
    for _ in range(2000):
        is_host_address(NOT_LOCAL)
    per_call = (time.perf_counter() - started) / 2000
    assert per_call < 500e-6, f"{per_call * 1e6:.0f} µs per lookup"
