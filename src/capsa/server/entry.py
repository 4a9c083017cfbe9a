"""One sandbox as the server keeps it (:class:`Entry`), the errors its API answers with, and the
checks every face of the server shares (timeouts, tenant visibility, named images). Kept apart from
:mod:`capsa.server.registry` so that the modules serving a sandbox need not import the registry."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import inspect
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import capsa
from capsa.errors import CapsaError
from capsa.server.api_error import ApiError as ApiError  # noqa: PLC0414 (re-exported for its importers)
from capsa.server.tenants import DEFAULT_TENANT

if TYPE_CHECKING:
    from capsa.net.secrets import Secret
    from capsa.server.envd import ProcessTable
    from capsa.server.interpreter import Interpreter

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300  # seconds, as in E2B
# No cap by default (``--max-timeout`` sets one): only what a deadline can represent (68 years).
MAX_TIMEOUT = 2**31 - 1
# the envd features served: file metadata (0.6.2), entries in watch events (0.6.3), allowNetworkMounts
ENVD_VERSION = "0.6.4"
INTERPRETER_TEMPLATE = "code-interpreter-v1"
TEMPLATES = ("base", INTERPRETER_TEMPLATE)


class SandboxPaused(ApiError):
    """A call to a paused sandbox created without ``auto_resume``. The message says "was not
    found", the words by which the E2B SDKs tell a sandbox that is not running (their
    ``SandboxNotRunningException`` / ``SandboxNotFoundError``) from one they cannot reach."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(
            409,
            f"The sandbox {sandbox_id} was not found running: it is paused (its lifecycle has "
            "auto_resume off)",
            hint="resume it with Sandbox.connect(), or create it with auto_resume=True",
        )
        self.sandbox_id = sandbox_id


@dataclass(eq=False)
class Entry:
    """One sandbox the server runs for its clients.

    ``vm`` is a local :class:`capsa.Sandbox`, or with ``--ray`` a :class:`capsa.ray.RaySandbox`
    (``node_id`` set): the server only uses the API both share (the remote handle's surface is
    derived from ``capsa.Sandbox``), except that plain methods (``set_lifetime``,
    ``network.log()``) are awaitable on the remote one, so their callers await them if they must
    (:func:`resolved`)."""

    id: str
    template: str
    vm: capsa.Sandbox
    token: str
    metadata: dict[str, str]
    envs: dict[str, str]
    started_at: datetime.datetime
    end_at: datetime.datetime
    memory_mb: int
    processes: ProcessTable | None = None
    interpreter: Interpreter | None = None
    closing: bool = False
    policy: capsa.NetworkPolicy | None = None
    paused: Path | None = None  # the snapshot of a paused sandbox (its VM is gone)
    paused_memory: bool = True  # False: ``paused`` holds only its files (a resume boots afresh)
    node_id: str | None = None  # the Ray node it runs on (``capsa serve --ray``)
    tenant: str = DEFAULT_TENANT  # its creator's: only that tenant (and admin keys) see it
    # held by a pause or a resume: one VM per resume, not two, and never a resume mid-pause
    resume_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    extra: dict[str, Any] = field(default_factory=dict)
    auto_pause: bool = False  # E2B's on_timeout="pause": the timeout pauses instead of killing
    pause_memory: bool = True  # on_timeout's mode: False pauses at the timeout filesystem-only
    auto_resume: bool = False  # a call to the paused sandbox resumes it (else: the paused error)
    timeout: int = DEFAULT_TIMEOUT  # the last one set: an auto-resume runs for as long again
    pausing: bool = False  # a pause is saving its snapshot
    parked: bool = False  # holds a paused slot of the quota, not a running one
    resume_on_call: bool = False  # paused by a server shutdown: its next call resumes it
    # the operator's secrets it has (names: its record keeps these, never a value) and E2B's
    # network.rules header transforms (the client's values: in this process's memory only)
    secret_names: tuple[str, ...] = ()
    transforms: tuple[Secret, ...] = field(default=(), repr=False)

    @classmethod
    def start(
        cls,
        vm: capsa.Sandbox,
        *,
        template: str,
        metadata: dict[str, str] | None,
        envs: dict[str, str] | None,
        **fields: Any,
    ) -> Entry:
        """A new sandbox's entry for ``vm``: a fresh id and access token, started now (its end is
        set by :meth:`set_timeout`)."""
        started = now()
        return cls(
            id=f"i{secrets.token_hex(10)}",
            template=template,
            vm=vm,
            token=secrets.token_urlsafe(24),
            metadata=dict(metadata or {}),
            envs=dict(envs or {}),
            started_at=started,
            end_at=started,
            **fields,
        )

    @property
    def traffic_token(self) -> str:
        """The token a private sandbox's ports (ingress) want: derived one way from the envd
        ``token``, so whoever may only reach the ports (a browser, a webhook) cannot drive envd."""
        digest = hashlib.sha256(b"capsa-traffic-token\0" + self.token.encode()).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode()

    @property
    def running(self) -> bool:
        return (
            not self.closing
            and self.paused is None
            and not self.pausing
            and self.vm.status is capsa.RunState.RUNNING
        )

    @property
    def state(self) -> str:
        return "paused" if self.paused is not None or self.pausing else "running"

    async def set_timeout(self, seconds: int) -> None:
        """The E2B timeout from now: the VM's lifetime, or with ``auto_pause`` the deadline at
        which the registry pauses it (a capsa lifetime would kill it)."""
        if not self.auto_pause:
            vm: Any = self.vm  # a remote handle's set_lifetime is awaitable
            await resolved(vm.set_lifetime(seconds))
        if seconds:  # 0 (E2B's "time out now") is no timeout to run for again on an auto-resume
            self.timeout = seconds
        self.end_at = now() + datetime.timedelta(seconds=seconds)


async def resolved(value: Any) -> Any:
    """``value``, awaited if it is awaitable: a plain method of a local sandbox answers at once,
    the same method of a remote (Ray) handle answers with an awaitable."""
    return await value if inspect.isawaitable(value) else value


def named_image(name: str) -> capsa.Image | None:
    """The image registered as ``name`` (``capsa image import/build --name``), or None."""
    try:
        from capsa.recipes import store  # noqa: PLC0415 (the named-image registry, optional here)
    except ImportError:
        return None
    if store.lookup(name) is None:
        return None
    try:
        return store.resolve_image(name)
    except CapsaError as exc:
        log.warning("image %s: %s", name, exc.message)
        return None


def visible(owner: str, scope: str | None) -> bool:
    """Whether a caller whose key sees ``scope`` (a tenant; None: every tenant, for admin keys
    and ``capsa mcp``) may see something ``owner`` created. Sandboxes use it; snapshots and
    volumes, when the server keeps them, should too."""
    return scope is None or owner == scope


def close_watchers(entry: Entry) -> None:
    watchers = entry.extra.pop("watchers", None)
    if watchers is not None:
        watchers.close()


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_timeout(value: object, limit: int | None = None, *, zero: bool = False) -> int:
    """A timeout in seconds, at most ``limit`` (``--max-timeout``; None: no cap of the server's);
    with ``zero``, 0 too (``set_timeout(0)``: the sandbox times out now)."""
    top = MAX_TIMEOUT if limit is None else min(limit, MAX_TIMEOUT)
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= top:
        flag = " (--max-timeout)" if limit is not None else ""
        raise ApiError(400, f"timeout must be seconds from {low} to {top}{flag}, got {value!r:.40}")
    if 0 < value < 1:
        raise ApiError(400, f"timeout must be whole seconds from {low}, got {value!r:.40}")
    return int(value)
