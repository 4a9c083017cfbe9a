"""The sandbox flags ``capsa serve`` and ``capsa mcp`` share, and the configuration they make:
pools, limits, network, memory (both servers take the same six fields, :func:`sandbox_options`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from capsa.errors import ConfigError

log = logging.getLogger(__name__)


def add_sandbox_flags(parser: argparse.ArgumentParser) -> None:
    """The sandbox flags ``capsa serve`` and ``capsa mcp`` share (pools, limits, network, memory)."""
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="TEMPLATE=N",
        help="keep N sandboxes of TEMPLATE booted and waiting, so create is a take; repeatable",
    )
    parser.add_argument(
        "--max-sandboxes",
        type=int,
        metavar="N",
        help="refuse to run more than N sandboxes at a time (the server answers 429; as many "
        "paused ones may wait beside them); default: what fits in the memory available at start "
        "(--memory plus overhead each, pools deducted), at most 8 per core; none with --ray",
    )
    parser.add_argument(
        "--max-timeout",
        type=int,
        metavar="SECONDS",
        help="refuse sandbox timeouts longer than this (HTTP 400); default: no cap",
    )
    parser.add_argument(
        "--dns-server",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="upstream resolver for sandboxes with a network (default: the host's); repeatable",
    )
    parser.add_argument(
        "--allow-internal-destinations",
        action="store_true",
        help="let sandboxes with a network reach loopback/private addresses (as on Gateway)",
    )
    parser.add_argument(
        "--memory", type=int, default=512, metavar="MB", help="guest memory per sandbox (default 512)"
    )


def parse_pool(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not name or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--pool takes TEMPLATE=N with N >= 1, got {text!r}")
    return name, int(count)


def max_sandboxes(args: argparse.Namespace) -> int | None:
    """``--max-sandboxes``, or the machine's default (none with ``--ray``: the nodes' slots
    bound a cluster)."""
    if args.max_sandboxes is not None:
        if args.max_sandboxes < 1:
            raise ConfigError("--max-sandboxes must be at least 1")
        return int(args.max_sandboxes)
    if getattr(args, "ray", None) is not None:
        return None
    from capsa.server.quota import machine_max_sandboxes  # noqa: PLC0415 (server extra)

    pooled = sum(parse_pool(p)[1] for p in args.pool)
    chosen, why = machine_max_sandboxes(args.memory, pooled)
    log.info("at most %d sandboxes (%s); --max-sandboxes N to change", chosen, why)
    return chosen


def max_timeout(args: argparse.Namespace) -> int | None:
    if args.max_timeout is not None and args.max_timeout < 1:
        raise ConfigError("--max-timeout must be at least 1 second")
    return None if args.max_timeout is None else int(args.max_timeout)


def sandbox_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``ServerConfig`` and ``McpConfig`` that :func:`add_sandbox_flags` sets."""
    return {
        "pools": dict(parse_pool(p) for p in args.pool),
        "max_sandboxes": max_sandboxes(args),
        "max_timeout": max_timeout(args),
        "memory_mb": args.memory,
        "dns_servers": tuple(args.dns_server),
        "allow_internal_destinations": args.allow_internal_destinations,
    }
