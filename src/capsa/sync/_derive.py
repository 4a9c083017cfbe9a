"""Derive the blocking faces of capsa's async classes, instead of hand-copying them.

A face is declared in one line, ``class SyncAgent(Face, SyncAgentMethods, twin=Agent)``, and
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
generated from the same rules (``_signatures.py``: ``python -m capsa.sync._derive`` rewrites it;
``tests/unit/test_sync_faces.py`` fails when it is stale, and mypy checks every hand-written
override against it).
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import re
import subprocess
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from capsa._portal import Portal
from capsa.errors import CapsaError, ConfigError, VMNotRunning

T = TypeVar("T")

# async class -> its face, filled as the faces are defined
FACES: dict[type, type[Face]] = {}

# Names a type annotation may use that are not classes (and so name no module of their own).
_ALIASES = {
    "Pattern": "capsa.console",
    "Mechanism": "capsa.shares.spec",
    "DiskFormat": "capsa.vm.config",
    "Accelerator": "capsa.vm.config",
}
_BUILTINS = {"None", "int", "float", "str", "bytes", "bool", "list", "tuple", "dict", "set", "object"}


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
    method.__signature__ = face_signature(member)
    method._capsa_derived = True
    return method


# -- signatures: the async ones, with async classes replaced by their faces --


def finish() -> None:
    """Give every derived method its signature, once every face is defined (``capsa.sync`` calls
    it): a face's annotations may name faces defined after it."""
    for face in FACES.values():
        for name, member in vars(face).items():
            if getattr(member, "_capsa_derived", False):
                member.__signature__ = face_signature(inspect.getattr_static(face._twin, name))


def _face_names() -> dict[str, str]:
    return {twin.__name__: face.__name__ for twin, face in FACES.items()}


def _rename(annotation: Any) -> Any:
    if annotation is inspect.Parameter.empty:
        return annotation
    if not isinstance(annotation, str):  # a module without ``from __future__ import annotations``
        annotation = inspect.formatannotation(annotation)
    names = _face_names()
    return re.sub(r"\b[A-Za-z_]\w*\b", lambda m: names.get(m.group(0), m.group(0)), annotation)


def face_signature(func: Any) -> inspect.Signature:
    """``func``'s signature with the async classes in its annotations replaced by their faces."""
    signature = inspect.signature(func)
    params = [p.replace(annotation=_rename(p.annotation)) for p in signature.parameters.values()]
    return signature.replace(parameters=params, return_annotation=_rename(signature.return_annotation))


# -- the generated declarations for type checkers (_signatures.py) --

SIGNATURES = Path(__file__).with_name("_signatures.py")
_HEADER = '''"""Declarations of the derived sync methods, for type checkers (:mod:`capsa.sync._derive`).

Generated by ``python -m capsa.sync._derive`` from the async classes: do not edit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

'''


class _Imports:
    def __init__(self) -> None:
        self.lines: set[str] = set()  # for annotations only
        self.runtime: set[str] = set()  # for default values
        self.faces: set[str] = set()

    def annotation(self, text: str, func: Any) -> str:
        faces = set(_face_names().values())
        for name in re.findall(r"\b[A-Za-z_][\w.]*\b", text):
            head = name.split(".")[0]
            if head in _BUILTINS or head == "Literal":
                continue
            if head in faces:
                self.faces.add(head)
                continue
            self.lines.add(self._source(head, func))
        return text

    def _source(self, name: str, func: Any) -> str:
        if name in _ALIASES:
            return f"from {_ALIASES[name]} import {name}"
        value = func.__globals__.get(name)
        if inspect.ismodule(value):
            return f"import {value.__name__}"
        module = getattr(value, "__module__", None)
        if isinstance(value, type) and module and getattr(sys.modules[module], name, None) is value:
            return f"from {module} import {name}"
        raise ConfigError(f"the signature generator cannot place {name!r} of {func.__qualname__}")

    def default(self, value: Any) -> str:
        if isinstance(value, enum.Enum):
            kind = type(value)
            self.runtime.add(f"from {kind.__module__} import {kind.__name__}")
            return f"{kind.__name__}.{value.name}"
        if value is None or isinstance(value, bool | int | float | str | bytes):
            return repr(value)
        raise ConfigError(f"the signature generator cannot write the default {value!r}")


def _declaration(face: type[Face], name: str, imports: _Imports) -> list[str]:
    member = inspect.getattr_static(face._twin, name)
    if isinstance(member, property):
        assert member.fget is not None
        returns = _rename(inspect.signature(member.fget).return_annotation)
        imports.annotation(returns, member.fget)
        body = "        raise NotImplementedError"
        return ["    @property", f"    def {name}(self) -> {returns}:", body]
    signature = face_signature(member)
    params = []
    star = False
    for param in signature.parameters.values():
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text, star = f"*{param.name}", True
        elif param.kind is param.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        if param.annotation is not param.empty:
            text += f": {imports.annotation(param.annotation, member)}"
        if param.default is not param.empty:
            text += f" = {imports.default(param.default)}"
        params.append(text)
    returns = imports.annotation(signature.return_annotation, member)
    return [f"    def {name}({', '.join(params)}) -> {returns}:", "        raise NotImplementedError"]


def signatures_source() -> str:
    """The text ``_signatures.py`` must have for the faces as they are now."""
    imports = _Imports()
    body: list[str] = []
    for face in sorted(FACES.values(), key=lambda f: f.__name__):
        body += ["", "", f"class {face.__name__}Methods:", "    _capsa_signatures = True"]
        for name in public_names(face._twin):
            if name not in face._skipped:
                body += ["", *_declaration(face, name, imports)]
    where = {face.__name__: face.__module__ for face in FACES.values()}
    faces = [f"from {where[f]} import {f}" for f in sorted(imports.faces)]
    typing_only = (imports.lines - imports.runtime) | set(faces)
    checking = [f"    {line}" for line in sorted(typing_only)] or ["    pass"]
    head = [*sorted(imports.runtime), "", "if TYPE_CHECKING:", *checking]
    return _HEADER + "\n".join(head) + "\n".join(body) + "\n"


def _main() -> None:
    """Rewrite ``_signatures.py`` (then tidy it with ruff when it is installed)."""
    # Run as a script, this file is a second copy of the module: use the one the faces registered in.
    derive = importlib.import_module(__spec__.name if __spec__ else __name__)  # + every face

    derive.SIGNATURES.write_text(derive.signatures_source())
    ruff = Path(sys.executable).with_name("ruff")
    if ruff.exists():
        target = str(derive.SIGNATURES)
        subprocess.run([ruff, "check", "--fix", "--select", "I", "-q", target], check=False)
        subprocess.run([ruff, "format", "-q", target], check=False)


if __name__ == "__main__":
    _main()


__all__ = ["FACES", "Face", "face_signature", "finish", "public_names", "signatures_source", "wrap"]
