"""What a remote caller may ask of a node's host: its files and its ports, as the node's owner allows.

Everything a host actor receives comes from some driver on the cluster, and locally capsa takes
host paths and host ports at their word (the caller is the host's own user). Through Ray the caller
is anyone with a driver, so the actor checks every argument that names something of the host before
it touches it. The node's owner decides, in the environment of ``ray start`` (which the actor's
worker inherits; the driver does not choose it):

- ``CAPSA_RAY_HOST_ROOT=DIR``: host paths (``kernel``, ``initrd``, ``rootfs``, ``share``,
  ``from_snapshot``, ``snapshot(path)``, an image's archive, ``copy()`` sources and wheel folders)
  must lie inside ``DIR`` once resolved, symlinks included; a relative path is taken relative to
  ``DIR``. The resolved path is what the builder gets, so a link cannot be followed out later by
  name. Unset: no host path at all. Shares are read-only: a writable one would let a guest plant
  files (a snapshot's metadata, which names QEMU arguments and disks) that a later path trusts.
- ``CAPSA_RAY_FORWARD_PORTS=LOW-HIGH``: port forwards may bind those host ports, on 127.0.0.1 only.
  Unset: no port forward (a forward binds a port on the node, maybe one a node service expects).
- ``CAPSA_RAY_ALLOW_INTERNAL=1``: sandboxes may use ``allow_internal_destinations()`` (the node's
  loopback and private networks, where Ray's own ports are). Unset: refused.

Which parameters name host things is derived from the annotations of the remote surface (a ``Path``,
``Snapshot``, ``PortForward``, ``VirtualNetwork``, ``Image`` or ``SandboxConfig`` parameter), so a
new method taking a path is checked without touching this module; a value of another type where a
path is expected is refused. Image recipe URLs (``pip_install(index_url=...)``, ``apt_install(
sources=...)``) must be http(s): a ``file:`` one would read the node's files.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capsa.errors import ConfigError
from capsa.net.gateway import PortForward, VirtualNetwork
from capsa.recipes.image import Image
from capsa.recipes.pip import pip_step
from capsa.recipes.steps import Step as RecipeStep
from capsa.recipes.steps import apt_step, copy_step, env_step, run_step, workdir_step
from capsa.sandbox.builder import SandboxConfig
from capsa.shares.spec import AccessMode
from capsa.snapshot.store import Snapshot

ROOT_ENV = "CAPSA_RAY_HOST_ROOT"
FORWARDS_ENV = "CAPSA_RAY_FORWARD_PORTS"
INTERNAL_ENV = "CAPSA_RAY_ALLOW_INTERNAL"

# SandboxConfig fields that name nothing of the host (checked against the dataclass in the tests,
# so a new field must be placed here or checked in ``NodePolicy.config``).
PLAIN_CONFIG_FIELDS = frozenset(
    {"cpus", "memory_mb", "accelerator", "name", "cold", "lifetime", "warmup", "warmup_timeout"}
)
_URL_SCHEMES = ("http", "https")
_APT_URI = re.compile(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)")
_WORD = re.compile(r"[A-Za-z_]\w*")


def _hint_root(what: str) -> str:
    return (
        f"{what} through capsa.ray needs the node's owner to allow it: start the node with "
        f"{ROOT_ENV}=DIR in `ray start`'s environment and use paths inside DIR (docs/scale-out.md)"
    )


@dataclass(frozen=True)
class NodePolicy:
    """The node owner's limits on remote callers (see the module's docstring)."""

    root: Path | None = None
    forward_ports: tuple[int, int] | None = None
    allow_internal: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> NodePolicy:
        """The policy of the node this process runs on; ``ConfigError`` for a malformed setting (a
        host actor that cannot tell its limits does not start)."""
        env = os.environ if environ is None else environ
        root = None
        if env.get(ROOT_ENV):
            given = Path(env[ROOT_ENV])
            if not given.is_absolute() or not given.is_dir():
                raise ConfigError(f"{ROOT_ENV} must be an existing absolute directory, got {given}")
            root = Path(os.path.realpath(given))
        ports = None
        if env.get(FORWARDS_ENV):
            low, sep, high = env[FORWARDS_ENV].partition("-")
            try:
                ports = (int(low), int(high if sep else low))
            except ValueError:
                ports = (0, -1)
            if not 1 <= ports[0] <= ports[1] <= 65535:
                raise ConfigError(f"{FORWARDS_ENV} must be LOW-HIGH ports, got {env[FORWARDS_ENV]!r}")
        return cls(root, ports, env.get(INTERNAL_ENV, "") == "1")

    # -- single values --

    def host_path(self, value: object, what: str) -> Path:
        """``value`` resolved (symlinks included) inside the root, or ``ConfigError`` before the
        file is touched; the message is the same whether or not the path exists."""
        if isinstance(value, Snapshot):
            value = value.path
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"{what}: a host path must be a str or Path, got {type(value).__name__}")
        text = os.fspath(value)
        if not isinstance(text, str) or "\0" in text:
            raise ConfigError(f"{what}: invalid host path {text!r:.80}")
        if self.root is None:
            raise ConfigError(
                f"{what}: this Ray node takes no host paths from remote callers ({text!r:.80})",
                hint=_hint_root("a host path"),
            )
        path = Path(text) if os.path.isabs(text) else self.root / text
        resolved = Path(os.path.realpath(path))
        if resolved != self.root and self.root not in resolved.parents:
            raise ConfigError(
                f"{what}: {text!r:.80} is outside this Ray node's host root {self.root}",
                hint=f"use a path inside {self.root} (symlinks out of it are resolved and refused)",
            )
        return resolved

    def forward(self, forward: object) -> PortForward:
        if not isinstance(forward, PortForward):
            raise ConfigError(f"a port forward must be a PortForward, got {type(forward).__name__}")
        if self.forward_ports is None:
            raise ConfigError(
                "this Ray node binds no host ports for remote callers (port forwards are off)",
                hint=f"the node's owner may allow some with {FORWARDS_ENV}=LOW-HIGH in `ray start`'s "
                "environment (on 127.0.0.1 only); or reach the guest with agent.exec",
            )
        low, high = self.forward_ports
        if forward.host_address != "127.0.0.1" or not low <= forward.host_port <= high:
            raise ConfigError(
                f"port forward {forward.host_address}:{forward.host_port}: this Ray node allows "
                f"remote callers host ports {low}-{high} on 127.0.0.1 only",
                hint=f"forward_tcp(port, guest_port) with a port from {low} to {high}",
            )
        return forward

    def network(self, network: object) -> VirtualNetwork:
        if not isinstance(network, VirtualNetwork):
            raise ConfigError(f"network() takes a VirtualNetwork, got {type(network).__name__}")
        for forward in network.gateway.forwards:
            self.forward(forward)
        if network.gateway.internal_allowed and not self.allow_internal:
            raise ConfigError(
                "allow_internal_destinations() is off for remote callers on this Ray node (the "
                "node's loopback and private networks hold Ray's own ports)",
                hint=f"the node's owner may allow it with {INTERNAL_ENV}=1 in `ray start`'s environment",
            )
        return network

    def image(self, image: object) -> Image:
        """``image`` rebuilt from its parts through capsa's own step constructors (a driver can
        send an ``Image`` made field by field), with its host inputs checked and resolved."""
        if not isinstance(image, Image) or not isinstance(image.steps, tuple):
            raise ConfigError(f"image() takes a capsa.Image, got {type(image).__name__}")
        source = image.source
        if image.kind != "debian":  # an archive is read for any other kind
            source = self.host_path(image.source, "the image archive")
        steps = tuple(self._recipe_step(step) for step in image.steps)
        return dataclasses.replace(image, source=source, steps=steps)

    def volume(self, volume: object) -> None:
        """Volumes are refused through Ray: a ``Volume`` names an image file and a lock on the
        node, which a driver could point at any file the node's user may open."""
        raise ConfigError(
            "volumes are not available through capsa's Ray face",
            hint="mount a volume in a sandbox built on its own node (capsa.sandbox().volume(...))",
        )

    def _recipe_step(self, step: object) -> RecipeStep:
        if not isinstance(step, RecipeStep) or not all(isinstance(a, str) for a in step.args):
            raise ConfigError("an image's steps must be capsa recipe steps")
        kind, args, options = step.kind, step.args, dict(step.options)
        if kind == "copy" and len(args) == 2:
            source = self.host_path(args[0], "copy()'s source")  # inside the root, or ConfigError
            return copy_step(source.parent, source, args[1])
        if kind == "env" and len(args) == 2:
            return env_step(args[0], args[1])
        if kind == "workdir" and len(args) == 1:
            return workdir_step(args[0])
        if kind == "run" and len(args) == 1:
            try:
                timeout = float(options.get("timeout", "1800"))
            except ValueError:
                raise ConfigError("run(): invalid timeout") from None
            return run_step(args[0], timeout, options.get("network") == "1")
        if kind == "apt":
            for line in options.get("sources", "").splitlines():
                match = _APT_URI.match(line)
                if match is not None:
                    self._url(match.group(1), "apt_install()'s sources")
            return apt_step(args, options.get("sources"))  # package names checked again
        if kind == "pip":
            self._url(options.get("index_url"), "pip_install()'s index_url")
            links: str | Path | None = options.get("find_links")
            if links and "://" in str(links):
                self._url(str(links), "pip_install()'s find_links")
            elif links:
                links = self.host_path(links, "pip_install()'s find_links")
            context = links.parent if isinstance(links, Path) else None
            return pip_step(args, options.get("index_url"), links, context)
        raise ConfigError(f"an image step {kind!r} with {len(args)} arguments is no capsa recipe step")

    @staticmethod
    def _url(url: str | None, what: str) -> None:
        if url is not None and urlsplit(url).scheme.lower() not in _URL_SCHEMES:
            raise ConfigError(
                f"{what}: {url!r:.80} is not an http(s) URL (a remote caller cannot read the node's "
                "files through it)",
                hint="serve the packages over http(s), or give a wheel folder inside the node's root",
            )

    def config(self, config: object) -> SandboxConfig:
        """A whole sandbox configuration (``cray.remote(local_builder)``), with its host paths
        resolved; ``ConfigError`` for anything the node does not allow."""
        if not isinstance(config, SandboxConfig):
            raise ConfigError("a remote builder's configuration must be a SandboxConfig")
        changes: dict[str, Any] = {}
        for name in ("kernel", "initrd", "rootfs", "snapshot"):
            value = getattr(config, name)
            if value is not None:
                changes[name] = self.host_path(value, name)
        shares = []
        for share in config.shares:
            if share.mode is not AccessMode.READ_ONLY:
                raise ConfigError(
                    f"share {share.guest_path}: remote callers get read-only shares on a Ray node",
                    hint="a writable share would let the guest plant files on the node that later "
                    "paths trust; copy results out with agent.read_file",
                )
            host = self.host_path(share.host_path, "share")
            shares.append(dataclasses.replace(share, host_path=host))
        changes["shares"] = tuple(shares)
        if config.image is not None:
            changes["image"] = self.image(config.image)
        for mount in config.volumes:
            self.volume(mount)
        if config.network is not None:
            changes["network"] = self.network(config.network)
        return dataclasses.replace(config, **changes)

    # -- calls --

    def arguments(
        self, method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``args`` and ``kwargs`` for ``method`` with every host-naming parameter checked (host
        paths replaced by their resolved form); ``ConfigError`` before anything is touched."""
        name = getattr(method, "__name__", "method")
        try:
            bound = inspect.signature(method).bind(*args, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"{name}(): {exc}") from None
        for param_name, value in list(bound.arguments.items()):
            param = bound.signature.parameters[param_name]
            check = self._check_for(param.annotation, f"{name}({param_name})")
            if check is None:
                continue
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                bound.arguments[param_name] = tuple(check(v) for v in value)
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                bound.arguments[param_name] = {k: check(v) for k, v in value.items()}
            else:
                bound.arguments[param_name] = check(value)
        return bound.args, bound.kwargs

    def _check_for(self, annotation: object, what: str) -> Callable[[Any], Any] | None:
        words = _words(annotation)
        kind = next((kind for kind in HOST_TYPES if kind in words), None)
        if kind is None:
            return None
        checks: dict[str, Callable[[Any], Any]] = {
            "SandboxConfig": self.config,
            "VirtualNetwork": self.network,
            "PortForward": self.forward,
            "Image": self.image,
            "ImageSource": self.image,
            "Volume": self.volume,
        }

        def path(value: Any) -> Path:
            return self.host_path(value, what)

        check: Callable[[Any], Any] = checks.get(kind, path)  # Snapshot, Path

        def optional(value: Any) -> Any:
            return None if value is None else check(value)

        return optional if "None" in words else check


# The annotations that make a parameter name something of the host, most specific first.
HOST_TYPES = (
    "SandboxConfig",
    "VirtualNetwork",
    "PortForward",
    "ImageSource",
    "Image",
    "Volume",
    "Snapshot",
    "Path",
)


def _words(annotation: object) -> set[str]:
    return set(_WORD.findall(annotation if isinstance(annotation, str) else repr(annotation)))


def host_parameters(method: Callable[..., Any]) -> list[str]:
    """The parameters of ``method`` that name something of the host (for the tests' inventory)."""
    parameters = inspect.signature(method).parameters.items()
    return [name for name, param in parameters if _words(param.annotation) & set(HOST_TYPES)]
