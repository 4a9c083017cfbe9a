"""The ``capsa`` entry point, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CAPSA = [sys.executable, "-m", "capsa.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CAPSA, *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


@pytest.mark.vm
def test_doctor_json_reports_every_check() -> None:
    done = run("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert {"QEMU", "busybox (static)", "guest kernel", "accelerator"} <= set(checks)
    assert checks["QEMU"]["ok"] and checks["guest kernel"]["ok"]
    assert "KVM" in checks["accelerator"]["detail"] or "TCG" in checks["accelerator"]["detail"]
    assert done.returncode == (0 if all(c["ok"] for c in checks.values()) else 1)  # 1 iff one fails


def test_doctor_without_qemu_says_what_to_install(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))
    done = run("doctor", "--json", env=env)
    assert done.returncode == 1
    qemu = next(c for c in json.loads(done.stdout) if c["name"] == "QEMU")
    assert not qemu["ok"] and "qemu-system-x86" in qemu["fix"]


def test_image_build_and_busybox_json() -> None:
    done = run("image", "busybox", "--json")
    assert done.returncode == 0, done.stderr
    paths = json.loads(done.stdout)
    assert Path(paths["kernel"]).is_file() and Path(paths["initrd"]).is_file()
    done = run("image", "build", "--json")
    assert done.returncode == 0, done.stderr
    paths = json.loads(done.stdout)
    assert all(Path(paths[k]).is_file() for k in ("kernel", "initrd", "rootfs"))


def test_bad_command_is_one_line_not_a_traceback() -> None:
    done = run("image", "busybox", "--flavour", "no-such-flavour")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("capsa: ")


@pytest.mark.vm
def test_exec_streams_output_forwards_stdin_and_returns_the_exit_code() -> None:
    done = subprocess.run(
        [*CAPSA, "exec", "--env", "WHO=cli", "--cwd", "/tmp", "--", "python3", "-c",
         "import os, sys; print(os.environ['WHO'], os.getcwd()); print(sys.stdin.read().upper());"
         "print('err', file=sys.stderr); sys.exit(7)"],
        input="piped", capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 7, done.stderr
    assert done.stdout == "cli /tmp\nPIPED\n"
    assert done.stderr == "err\n"


@pytest.mark.vm
def test_exec_timeout_and_missing_program_exit_codes() -> None:
    timed_out = run("exec", "--timeout", "1", "--", "sleep", "30")
    assert timed_out.returncode == 124
    assert "timed out" in timed_out.stderr
    missing = run("exec", "--", "no-such-program")
    assert missing.returncode == 2
    assert "program 'no-such-program' not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_exec_bad_flags_are_one_line_errors() -> None:
    assert run("exec").returncode == 2
    bad_memory = run("exec", "--memory", "lots", "--", "true")
    assert bad_memory.returncode == 2 and "--memory takes a size" in bad_memory.stderr
    bad_env = run("exec", "--env", "NOEQUALS", "--", "true")
    assert bad_env.returncode == 2 and "--env takes K=V" in bad_env.stderr


@pytest.mark.vm
def test_exec_with_shares(tmp_path: Path) -> None:
    src, out = tmp_path / "src dir", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "in.txt").write_text("shared in\n")
    done = run("exec", "--share", f"{src}:/src", "--share", f"{out}:/out:rw", "--",
               "sh", "-c", "cat /src/in.txt > /out/copy.txt; touch /src/x 2>/dev/null || echo ro")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ro\n"
    assert (out / "copy.txt").read_text() == "shared in\n"
    assert run("exec", "--share", "nocolon", "--", "true").returncode == 2


@pytest.mark.vm
def test_run_attaches_the_console_and_returns_when_the_guest_powers_off() -> None:
    from capsa.image.busybox import READY_MARKER, busybox_guest

    guest = busybox_guest()
    argv = [
        *CAPSA,
        "run",
        "--kernel",
        str(guest.kernel),
        "--initrd",
        str(guest.initrd),
        "--memory",
        "256M",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    seen = b""
    while READY_MARKER.encode() not in seen:  # type only once the guest's shell is there
        chunk = proc.stdout.read1(4096)
        assert chunk, proc.stderr.read() if proc.stderr else b""
        seen += chunk
    proc.stdin.write(b"echo run-$((6 * 7))\npoweroff -f\n")
    proc.stdin.close()
    rest = proc.stdout.read()  # until capsa exits with the guest
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else b""
    assert b"run-42" in seen + rest


@pytest.mark.vm
def test_run_no_console_with_timeout_stops_the_guest() -> None:
    from capsa.image.busybox import busybox_guest

    guest = busybox_guest()
    done = run("run", "--kernel", str(guest.kernel), "--initrd", str(guest.initrd), "--no-console",
               "--timeout", "3")  # fmt: skip
    assert done.returncode == 124 and "still running after 3.0s" in done.stderr
    assert run("run", "--kernel", "/no/such/kernel").returncode == 2


def test_image_ls_path_and_rm(tmp_path: Path) -> None:
    listing = json.loads(run("image", "ls", "--json").stdout)
    assert {"kernels", "images"} <= {row["kind"] for row in listing}
    paths = json.loads(run("image", "path", "--json").stdout)
    assert all(Path(paths[k]).is_file() for k in ("kernel", "initrd", "rootfs"))
    fake = tmp_path / "cache"
    (fake / "images").mkdir(parents=True)
    (fake / "images" / "rootfs-x.sqfs").write_bytes(b"x")
    (fake / "kernels").mkdir()
    env = dict(os.environ, CAPSA_CACHE_DIR=str(fake))
    assert run("image", "rm", env=env).returncode == 0
    assert not (fake / "images").exists() and (fake / "kernels").exists()
    missing = run("image", "path", env=env)
    assert missing.returncode == 1 and "capsa image build" in missing.stderr


@pytest.mark.vm
def test_shell_runs_piped_commands_on_a_terminal() -> None:
    done = subprocess.run(
        [*CAPSA, "shell", "--", "/bin/sh"], input="tty\necho hi-$((1+1))\nexit 3\n",
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "hi-2" in done.stdout and "/dev/pts/" in done.stdout


@pytest.mark.vm
def test_exec_streams_output_while_the_command_runs() -> None:
    import time

    script = "echo first; sleep 2; echo second >&2; sleep 1; echo third"
    proc = subprocess.Popen([*CAPSA, "exec", "--", "sh", "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    seen_first = time.monotonic()
    rest = proc.stdout.read()
    ended = time.monotonic()
    assert proc.wait(timeout=60) == 0
    assert (first, rest) == (b"first\n", b"third\n")
    assert ended - seen_first > 2.5  # "first" was printed live, not at the end


@pytest.mark.vm
def test_exec_network_flags() -> None:
    probe = (
        "import os, socket\n"
        "print(os.path.exists('/sys/class/net/eth0'))\n"
        "try:\n    socket.getaddrinfo('denied.test', 80); print('resolved')\n"
        "except socket.gaierror:\n    print('nxdomain')"
    )
    allowed = run("exec", "--allow-domain", "only.test", "--", "python3", "-c", probe)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.split() == ["True", "nxdomain"]
    none = run("exec", "--", "python3", "-c", probe)
    assert none.stdout.split()[0] == "False"  # no network unless asked
    bad = run("exec", "--allow-domain", "a.*.b", "--", "true")
    assert bad.returncode == 2 and "invalid domain pattern" in bad.stderr


@pytest.mark.vm
def test_exec_forward_and_run_net() -> None:
    import socket
    import time

    from capsa.image.busybox import READY_MARKER, busybox_guest
    from capsa.image.kernels import default_kernel

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = (
        "import socket; s = socket.socket(); s.bind(('0.0.0.0', 8000)); s.listen()\n"
        "c, peer = s.accept(); c.sendall(b'hi from the sandbox'); c.close()"
    )
    proc = subprocess.Popen([*CAPSA, "exec", "--forward", f"{port}:8000", "--", "python3", "-c", server],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    received = b""
    deadline = time.monotonic() + 90
    while not received and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                received = conn.recv(100)
        except OSError:
            pass
        if not received:
            time.sleep(0.2)  # the sandbox is still starting (or not listening yet)
    assert received == b"hi from the sandbox"
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else b""

    guest = busybox_guest(kernel=default_kernel())  # virtio-net built in (the stock one is a module)
    argv = [*CAPSA, "run", "--kernel", str(guest.kernel), "--initrd", str(guest.initrd), "--net"]
    run_proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert run_proc.stdin is not None and run_proc.stdout is not None
    seen = b""
    while READY_MARKER.encode() not in seen:
        chunk = run_proc.stdout.read1(4096)
        assert chunk, run_proc.stderr.read() if run_proc.stderr else b""
        seen += chunk
    run_proc.stdin.write(b"ip link set eth0 up; udhcpc -i eth0 -n -q -f -s /bin/true; poweroff -f\n")
    run_proc.stdin.close()
    rest = run_proc.stdout.read()
    assert run_proc.wait(timeout=60) == 0
    assert b"10.0.2.2" in rest

    bad = run("exec", "--forward", "80", "--", "true")
    assert bad.returncode == 2 and "--forward takes" in bad.stderr
