"""The network flags shared by ``exec``, ``shell`` and ``run``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import capsa
from capsa.errors import ConfigError


def add_network_arguments(parser: argparse.ArgumentParser, *, secrets: bool = True) -> None:
    """``secrets``: offer ``--secret`` (sandboxes only: a raw VM has no agent to give the guest the
    placeholders and the CA)."""
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
    if not secrets:
        return
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME=ENVVAR@HOST[,HOST]",
        help="the guest gets NAME=<placeholder>; the gateway swaps in the value of this host's "
        "ENVVAR only in HTTPS requests to HOST (docs/secrets.md); implies --net; repeatable",
    )


def parse_forward(text: str) -> tuple[str, int, int]:
    proto, _, rest = text.partition(":") if text.count(":") == 2 else ("tcp", "", text)
    host, sep, guest = rest.partition(":")
    if proto not in ("tcp", "udp") or not sep or not host.isdigit() or not guest.isdigit():
        raise ConfigError(f"--forward takes [udp:]HOST_PORT:GUEST_PORT, got {text!r}")
    return proto, int(host), int(guest)


def parse_secret(text: str, environ: Mapping[str, str]) -> tuple[str, str, list[str]]:
    """``NAME=ENVVAR@HOST[,HOST]``: the value is read from the environment, never the command line
    (where ``ps`` would show it)."""
    name, eq, rest = text.partition("=")
    variable, at, hosts = rest.partition("@")
    if not eq or not at or not name or not variable or not hosts:
        raise ConfigError(f"--secret takes NAME=ENVVAR@HOST[,HOST], got {text!r}")
    value = environ.get(variable)
    if not value:
        raise ConfigError(
            f"--secret {name}: the environment variable {variable} is not set",
            hint=f"export {variable}=... first: the value is read from capsa's environment",
        )
    return name, value, hosts.split(",")


def network_from_args(args: argparse.Namespace) -> capsa.VirtualNetwork | None:
    """None (no NIC) unless --net, --allow-domain, --forward or --secret asked for one."""
    secrets = getattr(args, "secret", [])
    if not (args.net or args.allow_domain or args.forward or secrets):
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
    for item in secrets:
        name, value, hosts = parse_secret(item, os.environ)
        gateway = gateway.secret(name, value, hosts=hosts)
    return capsa.VirtualNetwork.with_gateway(gateway)
