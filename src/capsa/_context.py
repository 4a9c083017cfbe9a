"""The two ``async with`` shapes capsa's classes share, written once.

- A handle (a VM, a sandbox, a Ray sandbox, a cluster, a volume's file helper) is its own context:
  ``async with handle:`` yields it and stops it however the block ends (:class:`StopsOnExit`).
- A builder is a context that builds: ``async with capsa.vm(boot) as vm:`` builds on entry, yields
  what it built and stops that on the way out (:class:`BuildsOnEnter`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

__all__ = ["BuildsOnEnter", "StopsOnExit"]


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


class StopsOnExit:
    """``async with handle:`` yields the handle and awaits its ``stop()`` on the way out."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self: _Stoppable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


Built = TypeVar("Built", bound=_Stoppable)


class BuildsOnEnter(Generic[Built]):
    """``async with builder as handle:`` builds on entry (``build()`` with its defaults) and stops
    what it built on the way out. One build per entry; the builder keeps it meanwhile."""

    _built: Built | None = None

    async def build(self, *args: Any, **kwargs: Any) -> Built:
        raise NotImplementedError

    async def __aenter__(self) -> Built:
        self._built = await self.build()
        return self._built

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        built, self._built = self._built, None
        if built is not None:
            await built.stop()
