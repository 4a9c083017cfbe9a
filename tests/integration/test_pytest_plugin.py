"""The pytest plugin, exercised with pytester: fixtures, marker options, failure reports, skip."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

pytestmark = [pytest.mark.vm]


def test_fixtures_marker_and_failure_report(pytester: pytest.Pytester) -> None:
    shared = pytester.mkdir("shared")
    (shared / "data.txt").write_text("from the host\n")
    pytester.makepyfile(
        f"""
        import pytest

        def test_default_sandbox(capsa_sandbox):
            result = capsa_sandbox.agent.exec("python3").args(["-c", "print(6 * 7)"]).run()
            assert result.stdout == "42\\n"

        @pytest.mark.capsa(memory_mb=384, shares=[("{shared}", "/mnt/shared", "ro")])
        def test_marker_options(capsa_sandbox_factory):
            vm = capsa_sandbox_factory()
            assert vm.agent.read_file("/mnt/shared/data.txt") == b"from the host\\n"
            other = capsa_sandbox_factory(cpus=2)
            assert other.agent.info().cpus == 2
            assert 300 << 20 < vm.agent.info().memory_bytes <= 384 << 20

        @pytest.mark.capsa(network=["only.test"])
        def test_network_option(capsa_sandbox):
            probe = ("import os, socket\\n"
                     "try:\\n    socket.getaddrinfo('denied.test', 80); print('resolved')\\n"
                     "except socket.gaierror:\\n    print('nxdomain')\\n"
                     "print(os.path.exists('/sys/class/net/eth0'))")
            out = capsa_sandbox.agent.exec("python3").args(["-c", probe]).run().stdout
            assert out.split() == ["nxdomain", "True"]

        def test_failure_attaches_the_console(capsa_sandbox):
            capsa_sandbox.agent.exec("true").run()
            assert False, "deliberate"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=600)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*capsa sandbox 0: console*", "*capsa sandbox 0: QEMU log*"])


def test_skips_with_a_reason_without_qemu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        def test_needs_qemu(capsa_sandbox):
            pass
        """
    )
    monkeypatch.setenv("PATH", "/nonexistent")
    result = pytester.runpytest_subprocess("-rs", timeout=120)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*qemu-system-x86_64 is not installed*"])
