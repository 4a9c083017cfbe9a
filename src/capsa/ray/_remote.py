"""Caller-side proxies of the objects a host actor owns, driven by the derived surfaces.

A :class:`Remote` answers attribute reads from the snapshot the actor sent with its last reply
(plain properties, child objects such as ``sandbox.agent``), records builder calls
(``agent.exec("ls").arg("/")``) and forwards everything else by name. Output streams are iterated
through a Ray streaming generator, chunk by chunk, so ``async for chunk in proc.stdout`` streams
across nodes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from capsa._context import StopsOnExit
from capsa.ray._placement import Host, _lost_errors
from capsa.ray._surface import surface
from capsa.ray._wire import Failure, Ref, decode_error

Step = tuple[str, tuple[Any, ...], dict[str, Any]]


def unwrap(host: Host, value: Any) -> Any:
    """A reply's value with every :class:`Ref` turned into a proxy."""
    if isinstance(value, Ref):
        return RaySandbox(host, value) if value.kind == "Sandbox" else Remote(host, value)
    if isinstance(value, list | tuple):
        return type(value)(unwrap(host, v) for v in value)
    return value


class Remote:
    """A proxy of a sandbox-side object (agent, process, output stream, network, console)."""

    def __init__(self, host: Host, ref: Ref) -> None:
        self._host = host
        self._ref = ref

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        ref = self._ref
        if name in ref.children:
            return unwrap(self._host, ref.children[name])
        if name in ref.errors:
            raise decode_error(ref.errors[name], self._host.where)
        if name in ref.state:
            return ref.state[name]
        shape = surface(ref.kind)
        if name in shape.chains:
            returned = shape.chains[name]
            return _recorder(self, (), name, returned)
        if name in shape.calls:

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await self._invoke([(name, args, kwargs)])

            call.__name__ = name
            return call
        raise AttributeError(f"{ref.kind} has no attribute {name!r} through capsa.ray")

    async def _invoke(self, steps: list[Step]) -> Any:
        host = self._host
        status, value, target = await host.request(host.actor.call.remote(self._ref.oid, steps))
        if target is not None:
            self._ref = target  # fresh properties (a process's returncode after wait(), ...)
        if status == "err":
            raise decode_error(value, host.where)
        return unwrap(host, value)

    def __aiter__(self) -> AsyncIterator[bytes]:
        if not surface(self._ref.kind).iterable:
            raise TypeError(f"{self._ref.kind} is not iterable")
        return _iterate(self._host, self._ref.oid)

    def __dir__(self) -> list[str]:
        shape = surface(self._ref.kind)
        ref = self._ref
        return sorted({*shape.calls, *shape.chains, *ref.state, *ref.children, *ref.errors})

    def __repr__(self) -> str:
        return f"<remote {self._ref.kind} #{self._ref.oid} on {self._host.where}>"


async def _iterate(host: Host, oid: int) -> AsyncIterator[bytes]:
    generator = host.actor.iterate.options(num_returns="streaming").remote(oid)
    try:
        async for ref in generator:
            item = await ref
            if isinstance(item, Failure):
                raise decode_error(item.error, host.where)
            yield item
    except _lost_errors() as exc:
        raise host.lost_error(exc) from None


def _recorder(root: Remote, steps: tuple[Step, ...], name: str, kind: str) -> Callable[..., Any]:
    def record(*args: Any, **kwargs: Any) -> RemoteBuilder:
        return RemoteBuilder(root, (*steps, (name, args, kwargs)), kind)

    record.__name__ = name
    return record


class RemoteBuilder:
    """A recorded immutable builder (``ExecBuilder``): its chain methods record, its coroutine
    methods (``run``, ``spawn``) send the whole recording to the actor in one call."""

    def __init__(self, root: Remote, steps: tuple[Step, ...], kind: str) -> None:
        self._root = root
        self._steps = steps
        self._kind = kind

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        shape = surface(self._kind)
        if name in shape.chains:
            return _recorder(self._root, self._steps, name, shape.chains[name])
        if name in shape.calls:

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await self._root._invoke([*self._steps, (name, args, kwargs)])

            call.__name__ = name
            return call
        raise AttributeError(f"{self._kind} has no attribute {name!r} through capsa.ray")

    def __repr__(self) -> str:
        calls = ".".join(f"{name}(...)" for name, _, _ in self._steps)
        return f"<remote {self._kind} {calls} on {self._root._host.where}>"


class RaySandbox(StopsOnExit, Remote):
    """A sandbox running on a Ray node: the same agent API as :class:`capsa.Sandbox` (``agent``,
    ``network``, ``snapshot``, ``fork``, ``stop``...), plus ``node_id``. Calls raise
    :class:`capsa.SandboxLost` once its node or host actor has died."""

    @property
    def node_id(self) -> str:
        """Ray's hex id of the node the sandbox runs on."""
        return self._host.node_id

    def __repr__(self) -> str:
        status = self._ref.state.get("status")
        return f"<RaySandbox #{self._ref.oid} on {self._host.where} {getattr(status, 'value', '')}>"
