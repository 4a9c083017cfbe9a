"""Checks for the fields of a request, before the agent acts on any of them.

Everything a request carries is checked for type and range here, so that no value can reach a
syscall, ``struct.pack`` or an ``int``/``float`` conversion that would raise something the agent
does not expect: a bad field is a :class:`BadRequest`, answered with a ``bad_request`` error. The
limits are those of the kernel interfaces behind each field (a ``winsize`` holds 16-bit values,
signals stop at ``SIGRTMAX``, a path at ``PATH_MAX``).
"""

from __future__ import annotations

import math
import signal
from typing import Any

from capsa.agent.guest.sessions import BadRequest, Message, safe_text

MAX_ID = (1 << 63) - 1  # request ids: positive and within msgpack's signed range
MAX_PATH = 4096  # PATH_MAX, in bytes
MAX_ARG = 131072 - 1  # MAX_ARG_STRLEN (32 pages) less the NUL: `bash -c` takes long scripts
MAX_HOSTNAME = 64  # HOST_NAME_MAX
MAX_TERMINAL = 0xFFFF  # struct winsize holds unsigned shorts
MAX_SIGNAL = int(getattr(signal, "SIGRTMAX", 64))
MAX_TIME = float(1 << 33)  # seconds since the epoch (year 2242): far below any overflow
MAX_ENTROPY = 4096


def request_id(value: object) -> int | None:
    """``value`` as a request id, or ``None`` if it cannot be one (a reply to it would be refused
    by the host, so a request without a valid id is dropped, not answered)."""
    if type(value) is int and 0 < value <= MAX_ID:
        return value
    return None


def integer(m: Message, key: str, default: int, low: int, high: int) -> int:
    value = m.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{key!r} must be an integer from {low} to {high}")
    return value


def flag(m: Message, key: str, default: bool = False) -> bool:
    value = m.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key!r} must be true or false")
    return value


def text(value: object, what: str, *, empty: bool = False, limit: int = MAX_PATH) -> str:
    """A string without NUL bytes of at most ``limit`` UTF-8 bytes."""
    if not isinstance(value, str) or (not value and not empty) or "\0" in value:
        raise BadRequest(f"{what} must be a{'' if empty else ' non-empty'} string without NUL")
    if len(value) > limit or len(value.encode("utf-8", "surrogatepass")) > limit:
        raise BadRequest(f"{what} is longer than {limit} bytes")
    return value


def path(m: Message, key: str = "path") -> str:
    value = text(m.get(key), repr(key))
    if not value.startswith("/"):
        raise BadRequest(f"{key!r} must be an absolute path")
    return value


def signal_number(m: Message) -> int:
    return integer(m, "signal", int(signal.SIGKILL), 1, MAX_SIGNAL)


def terminal_size(value: object) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise BadRequest("a terminal size must be [rows, cols]")
    rows, cols = value
    for n in (rows, cols):
        if type(n) is not int or not 1 <= n <= MAX_TERMINAL:
            raise BadRequest(f"terminal rows and cols must be integers from 1 to {MAX_TERMINAL}")
    return rows, cols


def argv(m: Message) -> list[str]:
    value = m.get("argv")
    if not isinstance(value, list) or not value:
        raise BadRequest("'argv' must be a non-empty list of strings")
    return [
        text(arg, "each argument", empty=index > 0, limit=MAX_ARG) for index, arg in enumerate(value)
    ]


def environment(m: Message) -> dict[str, str]:
    value = m.get("env")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'env' must be a map of strings")
    env: dict[str, str] = {}
    for key, item in value.items():
        name = text(key, "an environment variable name")
        if "=" in name:
            raise BadRequest(f"invalid environment variable name {name[:80]!r}")
        env[name] = text(item, f"the value of {name[:80]}", empty=True, limit=1 << 20)
    return env


def working_directory(m: Message) -> str:
    value = m.get("cwd")
    if value is None or value == "":
        return "/"
    return path(m, "cwd")


def mode(m: Message, default: int) -> int:
    return integer(m, "mode", default, 0, 0o7777)


def hostname(m: Message) -> str:
    value = text(m.get("hostname"), "'hostname'", limit=MAX_HOSTNAME)
    if not all(c.isascii() and (c.isalnum() or c in "-.") for c in value):
        raise BadRequest("'hostname' may hold only letters, digits, '-' and '.'")
    return value


def clock(m: Message) -> float:
    value = m.get("time")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest("'time' must be a number of seconds since the epoch")
    if not (0 <= value <= MAX_TIME and (isinstance(value, int) or math.isfinite(value))):
        raise BadRequest(f"'time' must be from 0 to {MAX_TIME:.0f}")
    return float(value)


def entropy(m: Message) -> bytes:
    value = m.get("entropy")
    if not isinstance(value, bytes) or not 32 <= len(value) <= MAX_ENTROPY:
        raise BadRequest(f"'entropy' must be 32 to {MAX_ENTROPY} bytes")
    return value


def safe_value(value: Any) -> Any:
    """``value`` with every string made encodable (for a reply that failed to encode because of a
    name that is not UTF-8)."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, list | tuple):
        return [safe_value(item) for item in value]
    if isinstance(value, dict):
        return {safe_text(str(k)): safe_value(v) for k, v in value.items()}
    return value
