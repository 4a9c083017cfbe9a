"""Derive the blocking faces of capsa's async classes, instead of hand-copying them.

A face is declared in one line, ``class SyncAgent(Face, SyncAgentMethods[SyncExecBuilder,
SyncProcess], twin=Agent)`` (the declarations' type parameters are the faces they name), and
:meth:`Face.__init_subclass__` fills it in from its twin (the async class) at import time:

- a coroutine method becomes a method that runs the coroutine on the face's event-loop thread (its
  :class:`~capsa._portal.Portal`) and blocks until it finishes; the coroutine's own ``timeout=``
  bounds it, exactly as in the async API;
- a plain method runs on that loop thread too (where the object changes), or in the caller's thread
  for objects that belong to no loop (builders) and once the loop has closed;
- a property reads the async property.

Arguments that are faces are unwrapped to their async objects (a face from another loop thread is
refused), and results that are async objects are wrapped in their faces by type (``list[Sandbox]``
becomes ``list[SyncSandbox]``). The derived methods keep their twin's name, docstring and signature
(return and parameter types rewritten to the faces), so ``help()`` shows them. What genuinely differs
is written by hand in the face: context managers, iterators over streaming output, instance
attributes, and calls that close the loop thread.

Type checkers cannot see methods made at import time, so the faces also inherit declarations
generated from the same rules (``_signatures.py``: ``python scripts/sync_signatures.py`` in a source
checkout rewrites it, as ``python -m capsa.sync._derive`` still does;
``tests/unit/test_sync_faces.py`` fails when it is stale, and mypy checks every hand-written
override against it).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from capsa._portal import Portal
from capsa.errors import CapsaError, ConfigError, VMNotRunning

T = TypeVar("T")

# async class -> its face, filled as the faces are defined
FACES: dict[type, type[Face]] = {}


class _DerivedProperty(property):
    """A property made by the derivation (so a face's subclass may derive it again)."""


async def _on_loop(call: Callable[[], T]) -> T:
    return call()


def public_names(cls: type) -> list[str]:
    """The public API of an async class: its public methods and properties, inherited ones too."""
    return sorted(
        name
        for name in dir(cls)
        if not name.startswith("_")
        and (
            isinstance(inspect.getattr_static(cls, name), property)
            or inspect.isfunction(inspect.getattr_static(cls, name))
        )
    )


class Face:
    """Base of every sync face: ``_target`` is the async object, ``_portal`` the event-loop thread it
    lives on (``None`` for objects of no loop, such as builders)."""

    _twin: ClassVar[type]
    _skipped: ClassVar[Mapping[str, str]] = {}
    _plain_in_caller: ClassVar[bool] = False  # immutable objects: plain calls need no loop thread

    def __init__(self, portal: Portal | None, target: Any) -> None:
        self._portal = portal
        self._target = target

    def __init_subclass__(
        cls, twin: type | None = None, skip: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if twin is None:
            return
        cls._twin = twin
        cls._skipped = dict(skip or {})
        FACES[twin] = cls
        for name in public_names(twin):
            if name in cls._skipped or _explicit(cls, name):
                continue
            setattr(cls, name, _derive(cls, twin, name))

    @classmethod
    def _adopt(cls, portal: Portal | None, target: Any) -> Face:
        """The face of ``target``, an object that the derivation returns (it owns no loop thread)."""
        return cls(portal, target)

    # -- running calls --

    def _closed(self) -> CapsaError:
        """The error of a call after the loop thread closed (the VM was stopped)."""
        return VMNotRunning(
            f"this {type(self).__name__} is stopped", hint="build a new one to run more calls"
        )

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this face's loop thread (a throwaway one for objects of no loop)."""
        if self._portal is not None:
            if self._portal.closed:
                coro.close()
                raise self._closed()
            return self._portal.call(coro)
        portal = Portal("capsa-call")
        try:
            return portal.call(coro)
        finally:
            portal.close()

    def _run(self, call: Callable[[], T]) -> T:
        """Run a plain call on the loop thread while it runs (the object changes there)."""
        if self._plain_in_caller or self._portal is None or self._portal.closed:
            return call()
        return self._portal.call(_on_loop(call))

    def _unwrap(self, value: Any) -> Any:
        if isinstance(value, Face):
            if None not in (value._portal, self._portal) and value._portal is not self._portal:
                raise ConfigError(
                    f"this {type(value).__name__} runs on another event-loop thread than the "
                    f"{type(self).__name__} it is passed to",
                    hint="in capsa.sync, a cluster's members are the handles its add() returned",
                )
            return value._target
        if type(value) in (list, tuple):  # not a named tuple's own type
            return type(value)(self._unwrap(v) for v in value)
        return value

    def _wrap(self, value: Any) -> Any:
        return wrap(self._portal, value)


def wrap(portal: Portal | None, value: Any) -> Any:
    """``value`` with every async object (also in a list or tuple) replaced by its face."""
    if type(value) in (list, tuple):  # not a named tuple's own type
        return type(value)(wrap(portal, v) for v in value)
    for klass in type(value).__mro__:
        face = FACES.get(klass)
        if face is not None:
            return face._adopt(portal, value)
    return value


def _explicit(cls: type, name: str) -> bool:
    """Whether ``name`` is written by hand in the face ``cls`` or a face it extends."""
    for klass in cls.__mro__:
        if klass.__dict__.get("_capsa_signatures") or name not in klass.__dict__:
            continue
        member = klass.__dict__[name]
        return not (isinstance(member, _DerivedProperty) or getattr(member, "_capsa_derived", False))
    return False


def _derive(face: type, twin: type, name: str) -> Any:
    member = inspect.getattr_static(twin, name)
    if isinstance(member, property):

        def read(self: Face) -> Any:
            return self._wrap(getattr(self._target, name))

        read.__doc__ = member.__doc__
        return _DerivedProperty(read, doc=member.__doc__)
    if inspect.iscoroutinefunction(member):

        def call(self: Face, *args: Any, **kwargs: Any) -> Any:
            method = getattr(self._target, name)
            coro = method(*self._unwrap(args), **{k: self._unwrap(v) for k, v in kwargs.items()})
            return self._wrap(self._call(coro))

        method: Any = call
    else:

        def plain(self: Face, *args: Any, **kwargs: Any) -> Any:
            method = getattr(self._target, name)
            args, kwargs = self._unwrap(args), {k: self._unwrap(v) for k, v in kwargs.items()}
            return self._wrap(self._run(lambda: method(*args, **kwargs)))

        method = plain
    functools.update_wrapper(method, member)
    del method.__wrapped__
    method.__qualname__ = f"{face.__qualname__}.{name}"
    method.__module__ = face.__module__
    method.__signature__ = face_signature(member, face)
    method._capsa_derived = True
    return method


# -- signatures: the async ones, with async classes replaced by their faces --


def finish() -> None:
    """Give every derived method its signature, once every face is defined (``capsa.sync`` calls
    it): a face's annotations may name faces defined after it."""
    for face in FACES.values():
        for name, member in vars(face).items():
            if getattr(member, "_capsa_derived", False):
                member.__signature__ = face_signature(inspect.getattr_static(face._twin, name), face)


def _face_names() -> dict[str, str]:
    return {twin.__name__: face.__name__ for twin, face in FACES.items()}


def _rename(annotation: Any) -> Any:
    if annotation is inspect.Parameter.empty:
        return annotation
    if not isinstance(annotation, str):  # a module without ``from __future__ import annotations``
        annotation = inspect.formatannotation(annotation)
    names = _face_names()
    return re.sub(r"\b[A-Za-z_]\w*\b", lambda m: names.get(m.group(0), m.group(0)), annotation)


def face_signature(func: Any, face: type | None = None) -> inspect.Signature:
    """``func``'s signature with the async classes in its annotations replaced by their faces, and
    ``Self`` (a shared base's option, :mod:`capsa.vm.options`) by ``face``, the face it is on."""
    signature = inspect.signature(func)
    params = [p.replace(annotation=_rename(p.annotation)) for p in signature.parameters.values()]
    returns = _rename(signature.return_annotation)
    if face is not None and isinstance(returns, str):
        returns = re.sub(r"\bSelf\b", face.__name__, returns)
    return signature.replace(parameters=params, return_annotation=returns)


if __name__ == "__main__":  # the former command; the generator is scripts/sync_signatures.py
    import runpy

    runpy.run_path(
        str(Path(__file__).resolve().parents[3] / "scripts" / "sync_signatures.py"), run_name="__main__"
    )


__all__ = ["FACES", "Face", "face_signature", "finish", "public_names", "wrap"]
