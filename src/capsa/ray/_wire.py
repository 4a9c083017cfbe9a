"""What crosses between the caller and a host actor: references to remote objects and errors.

capsa's exceptions take keyword-only arguments, which plain pickling cannot rebuild, and Ray would
wrap them in its own ``RayTaskError`` anyway. So the actor sends each error as (class, message,
attributes) and the caller re-raises an instance of the very same class, with its data and hint.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

from capsa.errors import CapsaError

log = logging.getLogger(__name__)


@dataclass
class Ref:
    """A remote object: its id in the actor's table, its class name (see ``_surface.PROXIED``), a
    snapshot of its plain properties, its proxied attributes, and the errors its properties raised
    (raised again when read on the caller's side)."""

    oid: int
    kind: str
    state: dict[str, Any] = field(default_factory=dict)
    children: dict[str, Ref] = field(default_factory=dict)
    errors: dict[str, EncodedError] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedError:
    cls: type[BaseException] | None  # None: not importable on the caller's side
    message: str
    attributes: dict[str, Any]
    type_name: str


def encode_error(exc: BaseException) -> EncodedError:
    message = exc.message if isinstance(exc, CapsaError) else str(exc)
    attributes: dict[str, Any] = {}
    for key, value in vars(exc).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        attributes[key] = value
    cls: type[BaseException] | None = type(exc)
    try:
        pickle.dumps(cls)
    except Exception:
        cls = None
    return EncodedError(cls, message, attributes, f"{type(exc).__module__}.{type(exc).__qualname__}")


def decode_error(encoded: EncodedError, where: str) -> BaseException:
    """The actor's exception, rebuilt as the same class; ``where`` names the node in a note."""
    cls = encoded.cls
    if cls is None or not issubclass(cls, Exception):
        error: BaseException = CapsaError(f"{encoded.type_name}: {encoded.message}")
    else:
        error = cls.__new__(cls)
        Exception.__init__(error, encoded.message)
        if isinstance(error, CapsaError):
            error.message = encoded.message
            error.hint = None
        with contextlib.suppress(AttributeError):  # a class with __slots__: the message will do
            error.__dict__.update(encoded.attributes)
    error.add_note(f"(raised in a capsa host actor on {where})")
    return error


@dataclass(frozen=True)
class Failure:
    """Yielded by a streaming generator in place of a chunk when the iteration failed."""

    error: EncodedError
