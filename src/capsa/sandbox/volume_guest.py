"""The guest side of a volume's content operations, run by ``python3`` in a helper sandbox that has
the volume mounted at ``ROOT``. It is shipped as text (``SCRIPT``): its code runs only in the guest.

Every path is walked component by component with ``O_NOFOLLOW`` from the volume's root, so a
symlink a guest left in the volume (``evil -> /etc``) can never lead out of it, and ``..`` is
refused before any walk. Answers are one JSON object on stdout; failures exit 1 with
``{"error": kind, "message": ...}``."""

from __future__ import annotations

ROOT = "/volume"

SCRIPT = r'''
import datetime, json, os, shutil, stat, sys
ROOT = "/volume"

class Fail(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind, self.message = kind, message

def parts(path):
    if not isinstance(path, str) or "\0" in path or len(path) > 4096:
        raise Fail("invalid", "invalid path")
    comps = [c for c in path.split("/") if c not in ("", ".")]
    if ".." in comps:
        raise Fail("invalid", "a path must not contain '..'")
    return comps

def walk(comps, make=False, mode=0o755):
    """A descriptor of the directory holding comps[-1] (of ROOT if comps is empty)."""
    fd = os.open(ROOT, os.O_PATH | os.O_DIRECTORY)
    for comp in comps[:-1]:
        try:
            nxt = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
        except FileNotFoundError:
            if not make:
                raise Fail("not_found", "no such directory")
            os.mkdir("/proc/self/fd/%d/%s" % (fd, comp), mode)
            nxt = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
        except (NotADirectoryError, OSError) as exc:
            if isinstance(exc, NotADirectoryError) or exc.errno == 40:  # ELOOP: a symlink
                raise Fail("not_dir", "a path component is not a directory (symlinks are not followed)")
            raise
        os.close(fd)
        fd = nxt
    return fd

def at(fd, name):
    return "/proc/self/fd/%d/%s" % (fd, name)

def kind(mode):
    if stat.S_ISDIR(mode): return "directory"
    if stat.S_ISREG(mode): return "file"
    if stat.S_ISLNK(mode): return "symlink"
    return "unknown"

def iso(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")

def entry(fd, name, rel):
    st = os.stat(name, dir_fd=fd, follow_symlinks=False) if name else os.fstat(fd)
    out = {"name": name or "/", "type": kind(st.st_mode), "path": "/" + rel, "size": st.st_size,
           "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
           "atime": iso(st.st_atime), "mtime": iso(st.st_mtime), "ctime": iso(st.st_ctime)}
    if stat.S_ISLNK(st.st_mode):
        out["target"] = os.readlink(name, dir_fd=fd)
    return out

def lookup(path):
    comps = parts(path)
    fd = walk(comps)
    name = comps[-1] if comps else ""
    try:
        if name:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        raise Fail("not_found", "no such file or directory")
    return comps, fd, name

def meta(fd, name, args):
    target = at(fd, name) if name else "/proc/self/fd/%d" % fd
    if name and stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
        raise Fail("invalid", "cannot change a symlink's metadata")
    if args.get("uid") is not None or args.get("gid") is not None:
        os.chown(target, -1 if args.get("uid") is None else int(args["uid"]),
                 -1 if args.get("gid") is None else int(args["gid"]))
    if args.get("mode") is not None:
        os.chmod(target, int(args["mode"]) & 0o7777)

def listing(fd, rel, depth, out):
    for name in sorted(os.listdir("/proc/self/fd/%d" % fd)):
        if len(out) >= 100000:
            raise Fail("invalid", "more than 100000 entries")
        child = (rel + "/" + name) if rel else name
        e = entry(fd, name, child)
        out.append(e)
        if depth > 1 and e["type"] == "directory":
            sub = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            try:
                listing(sub, child, depth - 1, out)
            finally:
                os.close(sub)

def main(op, args):
    path = args.get("path", "/")
    if op == "stat":
        comps, fd, name = lookup(path)
        return entry(fd, name, "/".join(comps))
    if op == "list":
        comps, fd, name = lookup(path)
        if name:
            sub = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd) if stat.S_ISDIR(
                os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode) else None
            if sub is None:
                raise Fail("not_dir", "not a directory")
            fd = sub
        out = []
        listing(fd, "/".join(comps), max(1, min(int(args.get("depth") or 1), 32)), out)
        return {"entries": out}
    if op == "mkdir":
        comps = parts(path)
        if not comps:
            raise Fail("exists", "the volume's root exists")
        fd = walk(comps, make=bool(args.get("force")))
        try:
            os.mkdir(at(fd, comps[-1]), 0o755)
        except FileExistsError:
            if not args.get("force"):
                raise Fail("exists", "already exists")
        meta(fd, comps[-1], args)
        return entry(fd, comps[-1], "/".join(comps))
    if op == "meta":
        comps, fd, name = lookup(path)
        meta(fd, name, args)
        return entry(fd, name, "/".join(comps))
    if op in ("prepare_write", "prepare_read"):
        comps = parts(path)
        if not comps:
            raise Fail("is_dir", "the volume's root is a directory")
        fd = walk(comps, make=op == "prepare_write" and bool(args.get("force")))
        try:
            st = os.stat(comps[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            if op == "prepare_read":
                raise Fail("not_found", "no such file")
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise Fail("is_dir", "is a directory")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise Fail("invalid", "not a regular file (symlinks are not followed)")
        return {"path": ROOT + "/" + "/".join(comps)}
    if op == "commit":  # an upload written beside its target replaces it in one rename
        comps, fd, name = lookup(args["upload"])
        target = parts(path)
        if comps[:-1] != target[:-1] or not name.startswith(".capsa-upload-"):
            raise Fail("invalid", "not an upload of this path")
        os.rename(name, target[-1], src_dir_fd=fd, dst_dir_fd=fd)
        return {}
    if op == "remove":
        comps, fd, name = lookup(path)
        if not comps:
            raise Fail("invalid", "cannot remove the volume's root")
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(at(fd, name))  # never follows symlinks
        else:
            os.unlink(name, dir_fd=fd)
        return {}
    if op == "df":
        st = os.statvfs(ROOT)
        return {"total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}
    raise Fail("invalid", "unknown operation")

try:
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
except Fail as exc:
    print(json.dumps({"error": exc.kind, "message": exc.message}))
    sys.exit(1)
except OSError as exc:
    kinds = {2: "not_found", 17: "exists", 20: "not_dir", 21: "is_dir", 28: "no_space", 30: "read_only",
             1: "permission", 13: "permission", 39: "not_empty", 40: "not_dir"}
    print(json.dumps({"error": kinds.get(exc.errno, "io"), "message": exc.strerror or str(exc)}))
    sys.exit(1)
'''
