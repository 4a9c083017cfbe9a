"""Attacks on read-write shares: guest root tries to leave something on the host that gives
privileges there (set-uid/set-gid files, device nodes, file capabilities), or to inject options
into the share daemon's command line through the host path.

Every attack runs as guest root on a read-write share, for both mechanisms; the verdict is read on
the host with ``os.lstat`` / ``os.listxattr``. One sandbox per mechanism serves all the attacks
(module scope), so the per-test leak check runs once, when that sandbox is closed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import capsa
from capsa import AccessMode, _guardian, sync
from tests.integration.conftest import _leftovers

pytestmark = [pytest.mark.vm]

MECHANISMS = ["virtiofs", "9p"]
GUEST_DIR = "/mnt/rw"
# A valid VFS_CAP_REVISION_2 blob: effective, permitted = CAP_NET_RAW (bit 13).
CAP_BLOB = "struct.pack('<IIIII', 0x02000001, 1 << 13, 0, 0, 0)"

# Each attack runs in its own directory $D of the share, as guest root; failures are expected.
ATTACKS = {
    "chmod_4755": "echo x > $D/f; chmod 4755 $D/f",
    "chmod_g_plus_s_file": "echo x > $D/f; chmod 755 $D/f; chmod g+s $D/f",
    "chmod_g_plus_s_dir": "mkdir $D/d; chmod g+s $D/d; mkdir $D/d/sub",
    "create_with_setuid_mode": (
        'python3 -c "import os,sys; os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o6755)); '
        'os.mkdir(sys.argv[2], 0o3777)" $D/f $D/d'
    ),
    "mknod_char_1_3": "mknod $D/mem c 1 3; mknod $D/loop b 7 0",
    "file_capability_xattr": (
        "echo x > $D/f; chmod 755 $D/f; "
        f"python3 -c \"import os,struct,sys; os.setxattr(sys.argv[1], 'security.capability', {CAP_BLOB})\" $D/f; "
        "setcap cap_net_raw+ep $D/f 2>/dev/null"
    ),
    "rename_whiteout": (
        'echo x > $D/a; python3 -c "import ctypes,sys; libc = ctypes.CDLL(None, use_errno=True); '
        "r = libc.syscall(316, -100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 4); "
        'print(r, ctypes.get_errno())" $D/a $D/b'
    ),
    "chown_root_of_setuid_file": (
        "echo x > $D/f; chmod 4755 $D/f; chown 0:0 $D/f; chmod 4755 $D/f; chown 0:0 $D/f; chmod u+s $D/f"
    ),
}


def privileged_entries(root: Path) -> list[str]:
    """Everything under ``root`` that would give privileges on the host."""
    found = []
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            found.append(f"{path}: device node {os.major(st.st_rdev)},{os.minor(st.st_rdev)}")
        if st.st_mode & stat.S_ISUID:
            found.append(f"{path}: set-uid (owner {st.st_uid})")
        if st.st_mode & stat.S_ISGID:
            found.append(f"{path}: set-gid (group {st.st_gid})")
        if not stat.S_ISLNK(st.st_mode) and "security.capability" in os.listxattr(path):
            found.append(f"{path}: file capabilities")
    return found


def attack_script(attack: str) -> str:
    return f"D={GUEST_DIR}/{attack}; mkdir -p $D; ( {ATTACKS[attack]} ) 2>&1; ls -ln $D; true"


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Overrides the per-test leak check: the module's sandbox outlives each test; it is checked
    when the sandbox closes (``share_vm``)."""
    yield


@pytest.fixture(scope="module", params=MECHANISMS)
def share_vm(request: pytest.FixtureRequest) -> Iterator[tuple[sync.SyncSandbox, Path]]:
    host = Path(tempfile.mkdtemp(prefix="capsa-sec-share-"))
    builder = (
        sync.sandbox()
        .memory_mb(384)
        .share(host, GUEST_DIR, AccessMode.READ_WRITE, mechanism=request.param)
    )
    try:
        with builder.build() as vm:
            yield vm, host
    finally:
        shutil.rmtree(host, ignore_errors=True)
    deadline = time.monotonic() + 5
    dirs, pids = _leftovers(_guardian.runtime_root())
    while (dirs or pids) and time.monotonic() < deadline:
        time.sleep(0.1)
        dirs, pids = _leftovers(_guardian.runtime_root())
    assert not dirs and not pids, f"left behind: {dirs} {pids}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_guest_root_leaves_nothing_privileged_on_the_host(
    attack: str, share_vm: tuple[sync.SyncSandbox, Path]
) -> None:
    """Attack: guest root makes a set-uid/set-gid file or directory, a device node (/dev/mem's 1,3,
    a loop device, a rename whiteout), or a file with capabilities in a read-write share, hoping a
    host user runs or opens it."""
    vm, host = share_vm
    result = vm.agent.exec("sh").args(["-c", attack_script(attack)]).timeout(60).run()
    assert (host / attack).is_dir(), result.stdout + result.stderr
    found = privileged_entries(host / attack)
    assert not found, f"{attack}: {found}\nguest said:\n{result.stdout}"


def test_share_still_works_after_the_attacks(share_vm: tuple[sync.SyncSandbox, Path]) -> None:
    """Not an attack: the hardening keeps ordinary modes, ownership and round trips working."""
    vm, host = share_vm
    script = (
        f"cd {GUEST_DIR} && echo data > plain && chmod 750 plain && mkdir -p dir && ln -sf plain link "
        "&& mkfifo fifo && stat -c '%a %u %F' plain dir fifo"
    )
    result = vm.agent.exec("sh").args(["-c", script]).timeout(60).run()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["750 0 regular file", "755 0 directory", "644 0 fifo"]
    assert (host / "plain").read_text() == "data\n"
    assert (host / "plain").stat().st_uid == os.getuid()
    if (host / "link").is_symlink():
        assert os.readlink(host / "link") == "plain"
    else:  # 9p mapped-xattr keeps a guest symlink as a file holding its target
        assert (host / "link").read_text() == "plain"


# --- The same attacks with capsa itself running as an unprivileged user --------------------------

UNPRIVILEGED = 65534  # nobody

_AS_USER = """
import sys
from capsa import AccessMode, sync
vfs, ninep, script = sys.argv[1], sys.argv[2], sys.argv[3]
builder = (sync.sandbox().memory_mb(384)
           .share(vfs, "/mnt/vfs", AccessMode.READ_WRITE, mechanism="virtiofs")
           .share(ninep, "/mnt/9p", AccessMode.READ_WRITE, mechanism="9p"))
with builder.build() as vm:
    result = vm.agent.exec("sh").args(["-c", script]).timeout(120).run()
    print(result.stdout, result.stderr)
    who = vm.agent.exec("sh").args(["-c", "echo x > /mnt/vfs/owner; echo x > /mnt/9p/owner"]).run()
    assert who.exit_code == 0, who.stderr
"""


def _cache_for(user: int, target: Path) -> Path:
    """A cache dir the user can use: the caller's cached images, hard-linked (so nothing is copied
    and the caller's files are not changed), in directories the user owns."""
    source = capsa._paths.cache_dir()
    for dirpath, _dirs, files in os.walk(source):
        dest = target / Path(dirpath).relative_to(source)
        dest.mkdir(parents=True, exist_ok=True)
        os.chown(dest, user, user)
        for name in files:
            try:
                os.link(Path(dirpath) / name, dest / name)
            except OSError:  # another filesystem
                shutil.copy2(Path(dirpath) / name, dest / name)
    return target


@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run capsa as another user")
def test_unprivileged_capsa_guest_root_leaves_nothing_privileged() -> None:
    """Attack: the same attacks, with capsa run by an ordinary user (virtiofsd in a user namespace,
    QEMU as that user): guest root must not leave a file set-uid/set-gid to that user either."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    work = Path(tempfile.mkdtemp(prefix="capsa-sec-user-"))
    try:
        os.chmod(work, 0o755)
        shares = {"virtiofs": work / "vfs", "9p": work / "9p"}
        for path in shares.values():
            path.mkdir()
            os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
        cache = _cache_for(UNPRIVILEGED, work / "cache")
        home = work / "home"
        home.mkdir()
        os.chown(home, UNPRIVILEGED, UNPRIVILEGED)
        script = "; ".join(
            attack_script(attack).replace(GUEST_DIR, target)
            for target in ("/mnt/vfs", "/mnt/9p")
            for attack in ATTACKS
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "CAPSA_CACHE_DIR": str(cache),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
        }
        setpriv = ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups"]
        run = subprocess.run(
            [
                *setpriv,
                sys.executable,
                "-c",
                _AS_USER,
                str(shares["virtiofs"]),
                str(shares["9p"]),
                script,
            ],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            cwd=home,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        for mechanism, path in shares.items():
            assert (path / "owner").stat().st_uid == UNPRIVILEGED, mechanism
            for attack in ATTACKS:
                assert (path / attack).is_dir(), (mechanism, attack, run.stdout[-3000:])
            found = privileged_entries(path)
            assert not found, f"{mechanism}: {found}\nguest said:\n{run.stdout[-3000:]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(240)
def test_host_path_with_commas_injects_no_options() -> None:
    """Attack: a host directory named ``x,source=/other`` (virtiofsd's ``-o``) or ``x,path=/other``
    (QEMU's ``-fsdev``) makes the daemon serve another directory than the one that was checked.
    Either the share works on the named directory, or it is refused with ConfigError."""
    base = Path(tempfile.mkdtemp(prefix="capsa-sec-comma-"))
    try:
        other = base / "other"
        other.mkdir()
        (other / "which").write_text("injected\n")
        dirs = {
            "virtiofs": base / f"v,source={other}",
            "9p": base / f"n,path={other},security_model=none",
        }
        builder = sync.sandbox().memory_mb(384)
        for mechanism, path in dirs.items():
            path.mkdir(parents=True)
            (path / "which").write_text(f"{mechanism}\n")
            builder = builder.share(
                path, f"/mnt/{mechanism}", AccessMode.READ_WRITE, mechanism=mechanism
            )
        try:
            vm = builder.build()
        except capsa.ConfigError:
            return
        with vm:
            script = "cat /mnt/virtiofs/which /mnt/9p/which; touch /mnt/virtiofs/new /mnt/9p/new"
            result = vm.agent.exec("sh").args(["-c", script]).timeout(60).run()
        assert result.stdout == "virtiofs\n9p\n", result.stdout + result.stderr
        assert (dirs["virtiofs"] / "new").exists() and (dirs["9p"] / "new").exists()
        assert sorted(p.name for p in other.iterdir()) == ["which"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
