"""A volume's content from the host, without trusting what a guest wrote into it.

The host never parses a volume's filesystem (a guest may have left anything in it): a small helper
sandbox mounts the volume at ``/volume`` and its own kernel and agent do the work, confined to the
volume by ``volume_guest`` (no ``..``, no symlink followed). :class:`VolumeFiles` is that helper;
``capsa volume cp`` and the server's volume content API use it. The helper holds the volume's
exclusive lock while it runs, like any sandbox that mounts it read-write."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from typing import Any

from capsa._context import StopsOnExit
from capsa.errors import CapsaError, VolumeError
from capsa.sandbox import Sandbox, sandbox
from capsa.sandbox.volume_guest import ROOT, SCRIPT
from capsa.vm.runstate import RunState
from capsa.volume.store import Volume

log = logging.getLogger(__name__)

HELPER_MEMORY_MB = 256
DEFAULT_TIMEOUT = 120.0
MAX_FILE = 1 << 30  # what one read or write may move through the helper (held in host memory)


class VolumeFileError(VolumeError):
    """A content operation failed in the guest: ``kind`` is ``not_found``, ``exists``, ``not_dir``,
    ``is_dir``, ``no_space``, ``read_only``, ``permission``, ``not_empty``, ``invalid`` or ``io``."""

    def __init__(self, message: str, *, name: str, kind: str) -> None:
        super().__init__(message, name=name)
        self.kind = kind


class VolumeOps:
    """The operations both ways into a volume share: the helper sandbox's (:class:`VolumeFiles`)
    and the mounting sandbox's (``capsa.server.volume_mounted``). Each runs them through its own
    ``_op`` (the walker script in its guest)."""

    async def _op(self, op: str, **args: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def stat(self, path: str) -> dict[str, Any]:
        return await self._op("stat", path=path)

    async def list(self, path: str, depth: int = 1) -> list[dict[str, Any]]:
        return list((await self._op("list", path=path, depth=depth))["entries"])

    async def make_dir(
        self, path: str, *, uid: int | None = None, gid: int | None = None, mode: int | None = None,
        force: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        return await self._op("mkdir", path=path, uid=uid, gid=gid, mode=mode, force=force)

    async def set_meta(
        self, path: str, *, uid: int | None = None, gid: int | None = None, mode: int | None = None
    ) -> dict[str, Any]:
        return await self._op("meta", path=path, uid=uid, gid=gid, mode=mode)


class VolumeFiles(StopsOnExit, VolumeOps):
    """Files of one volume through a helper sandbox. ``async with VolumeFiles(vol) as files:``."""

    def __init__(self, volume: Volume, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.volume = volume
        self._timeout = timeout
        self._vm: Sandbox | None = None

    async def start(self) -> None:
        builder = sandbox().memory_mb(HELPER_MEMORY_MB).volume(self.volume, ROOT)
        self._vm = await builder.build(self._timeout)

    async def stop(self) -> None:
        vm, self._vm = self._vm, None
        if vm is not None:
            await vm.stop()

    @property
    def running(self) -> bool:
        return self._vm is not None and self._vm.status is RunState.RUNNING

    async def __aenter__(self) -> VolumeFiles:
        await self.start()
        return self

    def _agent_vm(self) -> Sandbox:
        if self._vm is None:
            raise VolumeError(f"the helper of volume {self.volume.name} is not running")
        return self._vm

    async def _op(self, op: str, **args: Any) -> dict[str, Any]:
        vm = self._agent_vm()
        done = (
            await vm.agent.exec("python3")
            .args(["-c", SCRIPT, op, json.dumps(args)])
            .timeout(self._timeout)
            .run()
        )
        try:
            reply = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise VolumeError(
                f"volume {self.volume.name}: {op} failed: {done.stderr.strip()[-300:]}",
                name=self.volume.name,
            )
        if done.exit_code != 0:
            kind = str(reply.get("error", "io"))
            message = str(reply.get("message", ""))[:300]
            raise VolumeFileError(
                f"volume {self.volume.name}: {op} {args.get('path', '')!r:.200}: {message}",
                name=self.volume.name,
                kind=kind,
            )
        return reply

    async def read(self, path: str, *, limit: int = MAX_FILE) -> bytes:
        target = (await self._op("prepare_read", path=path))["path"]
        try:
            return await self._agent_vm().agent.read_file(target, timeout=self._timeout, limit=limit)
        except CapsaError as exc:
            raise VolumeFileError(exc.message, name=self.volume.name, kind="io") from None

    async def write(
        self, path: str, data: bytes, *, uid: int | None = None, gid: int | None = None,
        mode: int | None = None, force: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        if len(data) > MAX_FILE:
            raise VolumeFileError(
                f"at most {MAX_FILE} bytes per write", name=self.volume.name, kind="too_large"
            )
        target = (await self._op("prepare_write", path=path, force=force))["path"]
        # Written beside the target, then renamed over it: a failed or interrupted write (a full
        # volume, a crash) leaves the old file whole, and no partial one.
        head, _, _ = target.rpartition("/")
        upload = f"{head}/.capsa-upload-{secrets.token_hex(8)}"
        relative = upload.removeprefix(ROOT)
        try:
            await self._agent_vm().agent.write_file(upload, data, timeout=self._timeout)
            await self._op("commit", path=path, upload=relative)
        except CapsaError as exc:
            with contextlib.suppress(CapsaError):
                await self._op("remove", path=relative)
            if isinstance(exc, VolumeFileError):
                raise
            text = str(exc)
            kind = "no_space" if "No space left" in text or "ENOSPC" in text else "io"
            raise VolumeFileError(
                f"volume {self.volume.name}: writing {path!r:.200} failed: {exc.message[:300]}",
                name=self.volume.name,
                kind=kind,
            ) from None
        if uid is not None or gid is not None or mode is not None:
            return await self.set_meta(path, uid=uid, gid=gid, mode=mode)
        return await self.stat(path)

    async def remove(self, path: str) -> None:
        await self._op("remove", path=path)

    async def usage(self) -> dict[str, int]:
        reply = await self._op("df")
        return {"total": int(reply["total"]), "free": int(reply["free"])}
