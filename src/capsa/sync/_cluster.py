"""Blocking face of :func:`capsa.cluster`, derived from :class:`capsa.Cluster` (see
:mod:`capsa.sync._derive`).

::

    with sync.cluster(net) as c:
        db = c.add("db", sync.sandbox())
        app = c.add("app", sync.sandbox())
        c.partition({"db"}, {"app"}); c.heal()

Members switch frames to each other on one event loop, so a cluster owns one event-loop thread and
its members run on it: the handles ``add()`` returns share it (stopping one stops that member only).
"""

from __future__ import annotations

from types import TracebackType

from capsa._portal import Portal
from capsa.cluster import Cluster
from capsa.errors import ConfigError
from capsa.net.gateway import VirtualNetwork
from capsa.sync._derive import Face
from capsa.sync._sandbox import SyncSandbox, SyncSandboxBuilder
from capsa.sync._signatures import SyncClusterMethods
from capsa.sync._vm import SyncVM, SyncVMBuilder


class SyncCluster(
    Face, SyncClusterMethods[SyncSandbox, SyncSandboxBuilder, SyncVM, SyncVMBuilder], twin=Cluster
):
    """Blocking face of :class:`capsa.Cluster`; use it as a context manager, ``add()`` members inside
    the block; leaving it stops every member."""

    _target: Cluster

    def __init__(self, network: VirtualNetwork) -> None:
        super().__init__(None, Cluster(network))

    def _closed(self) -> ConfigError:
        return ConfigError("the cluster is stopped: it takes no new members or calls")

    def __enter__(self) -> SyncCluster:
        if self._portal is not None:
            raise ConfigError("a cluster is entered once")
        self._portal = Portal("capsa-cluster")
        try:
            self._call(self._target.__aenter__())
        except BaseException:
            self._portal.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every member (gracefully, then by force) and the cluster's event-loop thread."""
        if self._portal is not None and not self._portal.closed:
            try:
                self._call(self._target.stop())
            finally:
                self._portal.close()

    def __getitem__(self, name: str) -> SyncVM:
        member = self._wrap(self._target[name])
        assert isinstance(member, SyncVM)
        return member


def cluster(network: VirtualNetwork) -> SyncCluster:
    """Blocking twin of :func:`capsa.cluster`: ``with sync.cluster(net) as c: c.add(...)``."""
    return SyncCluster(network)
