"""Install Python packages in a sandbox whose network reaches only the package index.

    .venv/bin/python examples/pip_install_allowlisted.py requests
    .venv/bin/python examples/pip_install_allowlisted.py --import-name yaml pyyaml

The sandbox's egress policy allows pypi.org and files.pythonhosted.org on port 443 and nothing else:
pip can download, but code that runs during or after the install cannot reach any other host. Every
allow/deny decision is printed from the egress log at the end.

Behind a TLS-intercepting proxy, hand the sandbox your CA bundle: ``--ca-bundle
/etc/ssl/certs/ca-certificates.crt``. For a private index (or an offline test), point it elsewhere:

    ... --index-url http://pypi.internal:8080/simple --allow-domain pypi.internal \\
        --port 8080 --dns-server 10.1.2.3:53 PACKAGE
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from urllib.parse import urlsplit

import capsa
from capsa import Gateway, NetworkPolicy, VirtualNetwork
from capsa.net.policy import Action, All, Domain, Port

PYPI = ("pypi.org", "files.pythonhosted.org")

# A sandbox is disposable, so pip may install into its system Python (PEP 668 guards real hosts).
INSTALL = (
    "pip install --quiet --no-cache-dir --disable-pip-version-check --root-user-action=ignore"
    ' --break-system-packages "$@"'
)
CHECK = """
import importlib, sys, urllib.request
module = importlib.import_module(sys.argv[1])
print(f"imported {module.__name__} {getattr(module, '__version__', '')}".strip())
try:
    urllib.request.urlopen("http://example.com/", timeout=10)
    print("example.com: reachable")
except OSError as exc:
    print(f"example.com: blocked ({type(exc).__name__})")
"""


def network(args: argparse.Namespace) -> VirtualNetwork:
    policy = NetworkPolicy.deny_all()
    for domain in args.allow_domain or PYPI:  # these names, on the index's port only
        policy = policy.rule(Action.ALLOW, All(Domain(domain), Port(args.port)))
    gateway = Gateway("10.0.2.0/24").policy(policy)
    if args.dns_server:
        gateway = gateway.dns_servers(args.dns_server)
    if args.allow_internal:
        gateway = gateway.allow_internal_destinations()
    return VirtualNetwork.with_gateway(gateway)


async def install(args: argparse.Namespace) -> int:
    pip_args = [*args.packages]
    if args.index_url:
        pip_args += ["--index-url", args.index_url]
        host = urlsplit(args.index_url).hostname
        if urlsplit(args.index_url).scheme == "http" and host:
            pip_args += ["--trusted-host", host]
    builder = capsa.sandbox().memory_mb(768).network(network(args))
    async with await builder.build() as vm:
        install = vm.agent.exec("sh").args(["-c", INSTALL, "pip", *pip_args]).timeout(600)
        if args.ca_bundle:
            await vm.agent.write_file("/tmp/ca-bundle.pem", args.ca_bundle.read_bytes())
            install = install.env("PIP_CERT", "/tmp/ca-bundle.pem")
        installed = await install.run()
        sys.stderr.write(installed.stderr)
        if installed.exit_code != 0:
            return installed.exit_code
        module = args.import_name or args.packages[0].replace("-", "_")
        checked = await vm.agent.exec("python3").args(["-c", CHECK, module]).timeout(120).run()
        sys.stdout.write(checked.stdout)
        sys.stderr.write(checked.stderr)
        for entry in vm.network.log():
            where = f"{entry.domain or entry.dst_ip}:{entry.dst_port}"
            print(f"egress {entry.action:5} {entry.proto:4} {where} ({entry.rule})")
        return checked.exit_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="+", help="what to pip install")
    parser.add_argument("--import-name", help="module to import afterwards (default: the package)")
    parser.add_argument("--index-url", help="a PEP 503 index (default: PyPI)")
    parser.add_argument("--allow-domain", action="append", help="allowed domains (default: PyPI's)")
    parser.add_argument("--ca-bundle", type=Path, help="CA certificates (PEM) for the index's TLS")
    parser.add_argument("--port", type=int, default=443, help="the index's port (default: 443)")
    parser.add_argument("--dns-server", action="append", help="upstream DNS, IPv4[:port]")
    parser.add_argument(
        "--allow-internal", action="store_true", help="allow private/loopback index addresses"
    )
    args = parser.parse_args()
    try:
        return asyncio.run(install(args))
    except capsa.CapsaError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
