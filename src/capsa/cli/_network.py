"""The network flags shared by ``exec``, ``shell`` and ``run``."""

from __future__ import annotations

import argparse

import capsa
from capsa.errors import ConfigError


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    # Exclusive: --net means "all egress allowed", --allow-domain "only these"; both at once used to
    # keep only the allow-list silently.
    egress = parser.add_mutually_exclusive_group()
    egress.add_argument("--net", action="store_true", help="a network with all egress allowed")
    egress.add_argument(
        "--allow-domain",
        action="append",
        default=[],
        metavar="D",
        help="a network that reaches only these domains (exact, or *.suffix); repeatable",
    )
    parser.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="[udp:]HOST_PORT:GUEST_PORT",
        help="forward 127.0.0.1:HOST_PORT to the guest's port (TCP unless udp:); implies --net",
    )


def parse_forward(text: str) -> tuple[str, int, int]:
    proto, _, rest = text.partition(":") if text.count(":") == 2 else ("tcp", "", text)
    host, sep, guest = rest.partition(":")
    if proto not in ("tcp", "udp") or not sep or not host.isdigit() or not guest.isdigit():
        raise ConfigError(f"--forward takes [udp:]HOST_PORT:GUEST_PORT, got {text!r}")
    return proto, int(host), int(guest)


def network_from_args(args: argparse.Namespace) -> capsa.VirtualNetwork | None:
    """None (no NIC) unless --net, --allow-domain or --forward asked for one."""
    if not (args.net or args.allow_domain or args.forward):
        return None
    gateway = capsa.Gateway()
    if args.allow_domain:
        policy = capsa.NetworkPolicy.deny_all()
        for domain in args.allow_domain:
            policy = policy.allow_domain(domain)
        gateway = gateway.policy(policy)
    for item in args.forward:
        proto, host, guest = parse_forward(item)
        forward = gateway.forward_tcp if proto == "tcp" else gateway.forward_udp
        gateway = forward(host, guest)
    return capsa.VirtualNetwork.with_gateway(gateway)
