"""An example test suite whose checks run inside capsa sandboxes, through the pytest plugin that
comes with capsa (no conftest needed).

    .venv/bin/pytest examples/pytest_suite

Each test gets a fresh sandbox (``capsa_sandbox``), configured by the ``capsa`` marker; it is killed
after the test, and a failing test's report carries the guest's console transcript and QEMU log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from capsa.sync import SyncSandbox

HERE = Path(__file__).resolve().parent


def test_python_in_a_fresh_sandbox(capsa_sandbox: SyncSandbox) -> None:
    version = "import sys; print(sys.version_info[0])"
    result = capsa_sandbox.agent.exec("python3").args(["-c", version]).run()
    assert (result.exit_code, result.stdout) == (0, "3\n")


@pytest.mark.parametrize("round_", [1, 2])
def test_nothing_survives_from_one_test_to_the_next(capsa_sandbox: SyncSandbox, round_: int) -> None:
    assert not capsa_sandbox.agent.exists("/tmp/left-behind")
    capsa_sandbox.agent.write_file("/tmp/left-behind", b"round %d" % round_)


@pytest.mark.capsa(memory_mb=384, shares=[(str(HERE), "/suite", "ro")])
def test_the_suite_is_shared_read_only(capsa_sandbox: SyncSandbox) -> None:
    assert capsa_sandbox.agent.read_file("/suite/test_sandboxed.py").startswith(b'"""')
    write = capsa_sandbox.agent.exec("sh").args(["-c", "echo x > /suite/new-file"]).run()
    assert write.exit_code != 0 and not (HERE / "new-file").exists()


@pytest.mark.capsa(network=["pypi.org"])
def test_egress_is_limited_to_allowed_domains(capsa_sandbox: SyncSandbox) -> None:
    probe = (
        "import socket\n"
        "try:\n    socket.getaddrinfo('example.com', 443); print('resolved')\n"
        "except socket.gaierror:\n    print('refused')"
    )
    result = capsa_sandbox.agent.exec("python3").args(["-c", probe]).run()
    assert result.stdout == "refused\n"  # denied names never leave the host
