"""What a remote handle may do, derived from capsa's async classes (never a hand-written mirror).

Each class reachable from a sandbox (the sandbox, its agent, a spawned process and its output
streams, its network stack, its console) gets a :class:`Surface` computed by introspection:

- ``calls``: public methods, forwarded by name to the host actor. Coroutine methods stay awaitable;
  plain methods (``network.log()``, ``set_lifetime``) become awaitable too, since their answer
  comes from another process.
- ``chains``: plain methods whose return annotation is a builder class (``Agent.exec`` returns an
  ``ExecBuilder``, ``ExecBuilder.arg`` another one): recorded on the caller's side and replayed in
  the actor when a terminal coroutine (``run()``, ``spawn()``) is awaited.
- ``iterable``: the class defines ``__aiter__`` (output streams): iterated through a Ray streaming
  generator.

Only the plumbing that cannot mean anything across processes is denied (``_PLUMBING``): sockets and
frame-level methods of the network stack, which the VM itself uses. Anything new a contributor adds
to these classes' public API is reachable through Ray without touching this package.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import ipaddress
from dataclasses import dataclass
from functools import cache
from pathlib import PurePath
from typing import Any

from capsa.agent.client import Agent
from capsa.agent.exec import ExecBuilder, OutputStream, Process
from capsa.console import Console
from capsa.net.stack import NetworkStack
from capsa.sandbox.builder import SandboxBuilder
from capsa.sandbox.handle import Sandbox

# The classes whose instances live in a host actor and are reached through a proxy.
PROXIED: dict[str, type] = {
    cls.__name__: cls for cls in (Sandbox, Agent, Process, OutputStream, NetworkStack, Console)
}
# Immutable builders: their calls are recorded, then replayed in the actor.
BUILDERS: dict[str, type] = {cls.__name__: cls for cls in (ExecBuilder, SandboxBuilder)}

# Plumbing the VM uses internally; meaningless (or unsafe) from another process.
_PLUMBING: dict[str, frozenset[str]] = {
    "Sandbox": frozenset({"port_socket"}),
    "Agent": frozenset({"channel", "open_connection"}),  # asyncio streams stay in their loop
    "NetworkStack": frozenset(
        {"start", "close", "send_frame", "send_ip", "on_gateway_frame", "record", "switch", "link"}
    ),
}
# Sandbox calls that end it: the actor forgets its objects and frees its slot afterwards.
ENDING_CALLS = frozenset({"stop", "kill"})


@dataclass(frozen=True)
class Surface:
    name: str
    calls: frozenset[str]
    chains: dict[str, str]  # method -> the builder class name it returns
    properties: frozenset[str]
    iterable: bool


def _returns(func: Any) -> str:
    annotation = getattr(func, "__annotations__", {}).get("return")
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return str(name).strip("'\"")


@cache
def surface(name: str) -> Surface:
    """The remote surface of the proxied or builder class ``name``."""
    cls = PROXIED.get(name) or BUILDERS[name]
    denied = _PLUMBING.get(name, frozenset())
    calls: set[str] = set()
    chains: dict[str, str] = {}
    properties: set[str] = set()
    for attr, value in inspect.getmembers(cls):
        if attr.startswith("_") or attr in denied:
            continue
        if isinstance(value, property):
            properties.add(attr)
        elif inspect.isfunction(value):
            returned = _returns(value)
            if returned == "Self":  # a shared base's option (capsa.vm.options) returns its class
                returned = name
            if not inspect.iscoroutinefunction(value) and returned in BUILDERS:
                chains[attr] = returned
            else:
                calls.add(attr)
    return Surface(
        name=name,
        calls=frozenset(calls),
        chains=chains,
        properties=frozenset(properties),
        iterable=hasattr(cls, "__aiter__"),
    )


def proxied_name(value: object) -> str | None:
    """The proxied class name of ``value`` (the most derived one), or None."""
    for klass in type(value).__mro__:
        if PROXIED.get(klass.__name__) is klass:
            return klass.__name__
    return None


_PLAIN = (
    type(None), bool, int, float, str, bytes, enum.Enum, PurePath,
    ipaddress.IPv4Address, ipaddress.IPv4Network, ipaddress.IPv6Address, ipaddress.IPv6Network,
)  # fmt: skip


def is_plain(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is plain data that can be copied to the caller as it is (a snapshot of a
    property): scalars, enums, paths, and tuples/lists/dicts/dataclasses of them."""
    if depth > 4:
        return False
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, tuple | list):
        return len(value) <= 1000 and all(is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 1000 and all(
            is_plain(k, depth + 1) and is_plain(v, depth + 1) for k, v in value.items()
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(is_plain(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    return False
