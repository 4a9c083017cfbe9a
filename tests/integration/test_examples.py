"""Every example script runs for real."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = [pytest.mark.vm]


def test_raw_vm_console_example() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "raw_vm_console.py"), "echo", "from-the-guest;", "uname", "-r"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "from-the-guest"
    assert lines[1].endswith("-amd64")


def test_run_untrusted_python_example() -> None:
    snippet = "import os, sys; print(os.uname().nodename, 6 * 7); sys.exit(3)"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "run_untrusted_python.py"), snippet],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert re.fullmatch(r"capsa-[0-9a-f]{6} 42\n", done.stdout)


def test_ci_job_in_sandbox_example(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_math.py").write_text(
        "import unittest\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(1 + 1, 2)\n"
    )
    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "ci_job_in_sandbox.py"), str(project), str(reports)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "passed\n"
    assert "test_add" in (reports / "unittest.log").read_text()
    assert sorted(p.name for p in project.iterdir()) == ["test_math.py"]  # the source is untouched


class _PypiResolver(BaseResolver):
    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        reply = request.reply()
        if str(request.q.qname).rstrip(".").lower() == "pypi.test" and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
        return reply


def _wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, so the index needs nothing from the internet."""
    files = {
        "capsa_demo/__init__.py": b'__version__ = "1.0"\nGREETING = "installed from an allowlisted index"\n',
        "capsa_demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: capsa-demo\nVersion: 1.0\n",
        "capsa_demo-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: capsa-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("capsa_demo-1.0.dist-info/RECORD,,")
    path = directory / "capsa_demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("capsa_demo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def local_index(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A PEP 503 index on 127.0.0.1 and a resolver that names it pypi.test: (http port, dns port)."""
    wheel = _wheel(tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = tmp_path / "simple" / "capsa-demo"
    project.mkdir(parents=True)
    (project / "index.html").write_text(
        f'<html><body><a href="../../{wheel.name}#sha256={digest}">{wheel.name}</a></body></html>'
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    dns = DNSServer(_PypiResolver(), address="127.0.0.1", port=0)
    dns.start_thread()
    yield http_server.server_address[1], dns.server.server_address[1]
    http_server.shutdown()
    http_server.server_close()
    dns.stop()


def test_pip_install_allowlisted_example(local_index: tuple[int, int]) -> None:
    http_port, dns_port = local_index
    argv = [sys.executable, str(EXAMPLES / "pip_install_allowlisted.py"),
            "--index-url", f"http://pypi.test:{http_port}/simple", "--allow-domain", "pypi.test",
            "--port", str(http_port), "--dns-server", f"127.0.0.1:{dns_port}", "--allow-internal",
            "capsa-demo"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "imported capsa_demo 1.0"
    assert lines[1].startswith("example.com: blocked")
    assert any(line.startswith(f"egress allow tcp  pypi.test:{http_port}") for line in lines), lines
    assert any(line.startswith("egress deny  dns  example.com:53") for line in lines), lines


def test_pytest_suite_example() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLES / "pytest_suite"), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout


@pytest.mark.timeout(600)
def test_cluster_integration_test_example() -> None:
    """A client and a server VM exercised by a plain pytest test through the plugin's cluster."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLES / "cluster_integration_test.py"), "-q",
         "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
