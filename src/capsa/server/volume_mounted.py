"""A volume's content API while a running sandbox mounts it: the calls go through that sandbox's
agent, since its kernel is the volume's one writer (a helper sandbox mounting it too would be a
second ext4 writer, which corrupts it; the image's lock refuses that anyway).

The walker is the helper sandbox's (:mod:`capsa.sandbox.volume_guest`: no ``..``, no symlink
followed, every step relative to a directory descriptor), with two differences, because here the
guest is the user's and runs other processes meanwhile:

- the volume's root is opened once and checked to be the volume: the root inode (2) of the block
  device whose serial is the volume's (``capsa-vol-N``); every walk starts from that descriptor.
  A sandbox that unmounted the volume, or put a symlink or another filesystem at its mount path,
  gets a 409, never its own root filesystem served as the volume's content;
- reads and writes move the bytes through the script's stdin and stdout on descriptors it opened
  with ``O_NOFOLLOW`` (a write goes to a new ``.capsa-upload-*`` file created with ``O_EXCL`` in the
  walked directory, then renamed over its target there), never by a path the agent opens later:
  a process of the sandbox swapping a directory for a symlink between the walk and the transfer
  cannot redirect them.

The sandbox's processes see the changes at once (one kernel), and may change the files under a
call too: what a content call returns is what the volume held at that moment."""

from __future__ import annotations

import json
import logging
from typing import Any

from capsa.errors import CapsaError
from capsa.sandbox import Sandbox
from capsa.sandbox.volume_files import MAX_FILE, VolumeFileError, VolumeOps
from capsa.sandbox.volume_guest import SCRIPT

log = logging.getLogger(__name__)

TIMEOUT = 120.0
_ROOT_LINE = 'ROOT = "/volume"\n'
_MAIN_LINE = "try:\n    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))\n"

# ROOT becomes the checked descriptor of the volume's root (argv 3: mount path, argv 4: serial).
_ROOT = r"""
def _volume_root(path, serial):
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        fd = None
    want = None
    for dev in os.listdir("/sys/block"):
        try:
            with open("/sys/block/%s/serial" % dev) as fh:
                if fh.read().strip() != serial:
                    continue
            with open("/sys/block/%s/dev" % dev) as fh:
                major, minor = fh.read().strip().split(":")
            want = os.makedev(int(major), int(minor))
        except (OSError, ValueError):
            continue
    st = os.fstat(fd) if fd is not None else None
    if st is None or want is None or st.st_dev != want or st.st_ino != 2:
        print(json.dumps({"error": "moved", "message": "the volume is not mounted at %s" % path}))
        sys.exit(1)
    return fd
ROOT = "/proc/self/fd/%d" % _volume_root(sys.argv[3], sys.argv[4])
"""

# meta on a descriptor (the helper's changes a path, whose last component a process of the sandbox
# could swap for a symlink after the check); read and write on descriptors: the bytes on stdout
# (read) or from stdin (write).
_TRANSFER = r"""
def meta(fd, name, args):
    f = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd) if name else os.dup(fd)
    try:
        if stat.S_ISLNK(os.fstat(f).st_mode):
            raise Fail("invalid", "cannot change a symlink's metadata")
        target = "/proc/self/fd/%d" % f
        if args.get("uid") is not None or args.get("gid") is not None:
            os.chown(target, -1 if args.get("uid") is None else int(args["uid"]),
                     -1 if args.get("gid") is None else int(args["gid"]))
        if args.get("mode") is not None:
            os.chmod(target, int(args["mode"]) & 0o7777)
    finally:
        os.close(f)

def _regular(fd, name):
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise Fail("is_dir", "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise Fail("invalid", "not a regular file (symlinks are not followed)")
    return st

def _read(path, limit):
    comps = parts(path)
    if not comps:
        raise Fail("is_dir", "the volume's root is a directory")
    fd = walk(comps)
    if _regular(fd, comps[-1]) is None:
        raise Fail("not_found", "no such file")
    f = os.open(comps[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    if not stat.S_ISREG(os.fstat(f).st_mode):
        raise Fail("invalid", "not a regular file")
    out, total = sys.stdout.buffer, 0
    while True:
        chunk = os.read(f, 1 << 20)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise Fail("too_large", "the file is larger than %d bytes" % limit)
        out.write(chunk)
    out.flush()

def _write(path, force):
    comps = parts(path)
    if not comps:
        raise Fail("is_dir", "the volume's root is a directory")
    fd = walk(comps, make=force)
    _regular(fd, comps[-1])
    upload = ".capsa-upload-" + os.urandom(8).hex()
    f = os.open(upload, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
    try:
        src = sys.stdin.buffer
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(f, view):]
        os.fsync(f)
        os.rename(upload, comps[-1], src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        os.unlink(upload, dir_fd=fd)
        raise
    finally:
        os.close(f)

if sys.argv[1] in ("read", "write"):
    try:
        _args = json.loads(sys.argv[2])
        if sys.argv[1] == "read":
            _read(_args["path"], int(_args["limit"]))
        else:
            _write(_args["path"], bool(_args.get("force")))
            print("{}")
        sys.exit(0)
    except Fail as exc:
        print("\n" + json.dumps({"error": exc.kind, "message": exc.message}))
        sys.exit(1)
    except OSError as exc:
        kinds = {2: "not_found", 17: "exists", 20: "not_dir", 21: "is_dir", 28: "no_space",
                 30: "read_only", 1: "permission", 13: "permission", 40: "not_dir"}
        reply = {"error": kinds.get(exc.errno, "io"), "message": exc.strerror or str(exc)}
        print("\n" + json.dumps(reply))
        sys.exit(1)

"""


def _script() -> str:
    """The helper's script with the two differences above spliced in (checked: a change of the
    helper's script that moves these lines fails here, at import, not in a guest)."""
    if SCRIPT.count(_ROOT_LINE) != 1 or SCRIPT.count(_MAIN_LINE) != 1:
        raise RuntimeError("capsa.sandbox.volume_guest.SCRIPT changed: update volume_mounted")
    return SCRIPT.replace(_ROOT_LINE, _ROOT, 1).replace(_MAIN_LINE, _TRANSFER + _MAIN_LINE, 1)


MOUNTED_SCRIPT = _script()


class MountedFiles(VolumeOps):
    """The content calls of :class:`capsa.sandbox.volume_files.VolumeFiles`, done in the running
    sandbox ``vm`` that mounts the volume ``name`` at ``path`` as disk ``serial``."""

    def __init__(self, vm: Sandbox, *, name: str, path: str, serial: str) -> None:
        self._vm = vm
        self._name = name
        self._path = path
        self._serial = serial

    async def _run(self, op: str, args: dict[str, Any], stdin: bytes | None = None,
                   max_output: int = 16 << 20) -> tuple[int, bytes]:  # fmt: skip
        argv = ["-c", MOUNTED_SCRIPT, op, json.dumps(args), self._path, self._serial]
        builder = self._vm.agent.exec("python3").args(argv).user("root").timeout(TIMEOUT)
        if stdin is not None:
            builder = builder.stdin(stdin)
        try:
            done = await builder.max_output(max_output).run()
        except CapsaError as exc:
            raise VolumeFileError(
                f"volume {self._name}: {op} through its sandbox failed: {exc.message[:300]}",
                name=self._name,
                kind="io",
            ) from None
        if done.exit_code == 127:  # an image without python3
            raise VolumeFileError(
                f"volume {self._name}: its sandbox has no python3 to serve content calls",
                name=self._name,
                kind="unavailable",
            )
        return done.exit_code, done.stdout_bytes if done.exit_code == 0 else done.stdout_bytes[-4096:]

    def _failure(self, op: str, args: dict[str, Any], output: bytes) -> VolumeFileError:
        try:
            reply = json.loads(output.strip().splitlines()[-1]) if output.strip() else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            reply = {"error": "io", "message": "no answer from the sandbox"}
        message = str(reply.get("message"))[:300]
        return VolumeFileError(
            f"volume {self._name}: {op} {args.get('path', '')!r:.200}: {message}",
            name=self._name,
            kind=str(reply.get("error", "io")),
        )

    async def _op(self, op: str, **args: Any) -> dict[str, Any]:
        code, output = await self._run(op, args)
        if code != 0:
            raise self._failure(op, args, output)
        try:
            reply = json.loads(output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            reply = None
        if not isinstance(reply, dict):
            raise self._failure(op, args, b"")
        return reply

    async def read(self, path: str, *, limit: int = MAX_FILE) -> bytes:
        args = {"path": path, "limit": limit}
        code, output = await self._run("read", args, max_output=limit + 4096)
        if code != 0:
            raise self._failure("read", args, output)
        return output

    async def write(
        self, path: str, data: bytes, *, uid: int | None = None, gid: int | None = None,
        mode: int | None = None, force: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        if len(data) > MAX_FILE:
            raise VolumeFileError(
                f"at most {MAX_FILE} bytes per write", name=self._name, kind="too_large"
            )
        args = {"path": path, "force": force}
        code, output = await self._run("write", args, stdin=data)
        if code != 0:
            raise self._failure("write", args, output)
        if uid is not None or gid is not None or mode is not None:
            return await self.set_meta(path, uid=uid, gid=gid, mode=mode)
        return await self.stat(path)

    async def remove(self, path: str) -> None:
        await self._op("remove", path=path)
