"""A sandbox's side of its gateway's secrets: the guest trusts the sandbox's CA and every exec gets
the placeholders.

The CA's public certificate goes into the guest's system CA bundle (the first of the usual paths
that exists, else Debian's, created), rebuilt from a pristine copy of the image's bundle each time,
so a restored guest trusts its own CA and no longer its template's or snapshot's. ``SSL_CERT_FILE``
and ``REQUESTS_CA_BUNDLE`` name that bundle, ``NODE_EXTRA_CA_CERTS`` the CA alone. Placeholders and
those variables are added to every exec on the host side (:attr:`Agent.default_env`): the value of a
secret never reaches the guest.
"""

from __future__ import annotations

import asyncio

from capsa.agent.client import Agent
from capsa.errors import AgentError, ConfigError
from capsa.net.secrets import SecretSession

CA_DIR = "/etc/capsa"
CA_FILE = f"{CA_DIR}/sandbox-ca.pem"
PRISTINE = f"{CA_DIR}/system-ca.pem"  # the image's own bundle, as it was before capsa's CA
BUNDLE_PATH = f"{CA_DIR}/bundle-path"  # which bundle capsa extends (a restore reads it back)
BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # others
)
MAX_BUNDLE = 16 << 20


async def _install(agent: Agent, pem: str, timeout: float) -> str:
    """Write the CA and the bundle (the image's bundle + the CA) with file operations alone: no
    process is started, so arming adds a few agent round trips to a build."""
    checks = [agent.exists(p, timeout=timeout) for p in (BUNDLE_PATH, *BUNDLES)]
    armed, *found = await asyncio.gather(  # with the directories: one round trip of requests
        *checks, *(agent.mkdir(d, parents=True, timeout=timeout) for d in (CA_DIR, "/etc/ssl/certs"))
    )
    found = found[: len(BUNDLES)]
    writes = []
    if armed:  # a guest armed before (a restore): extend the same bundle's pristine copy
        bundle = (await agent.read_file(BUNDLE_PATH, timeout=timeout, limit=4096)).decode()
        base = await agent.read_file(PRISTINE, timeout=timeout, limit=MAX_BUNDLE)
    else:
        bundle = next((p for p, there in zip(BUNDLES, found, strict=True) if there), BUNDLES[0])
        base = await agent.read_file(bundle, timeout=timeout, limit=MAX_BUNDLE) if any(found) else b""
        writes = [agent.write_file(PRISTINE, base, timeout=timeout),
                  agent.write_file(BUNDLE_PATH, bundle, timeout=timeout)]  # fmt: skip
    separator = b"" if not base or base.endswith(b"\n") else b"\n"
    await asyncio.gather(
        *writes,
        agent.write_file(CA_FILE, pem, timeout=timeout),
        agent.write_file(bundle, base + separator + pem.encode(), timeout=timeout),
    )
    return bundle


async def arm_secrets(agent: Agent, session: SecretSession, *, install: bool, timeout: float) -> None:
    """Install the session's CA in the guest (unless ``install`` is false: a fork's guest has its
    parent's already) and give every exec the placeholders and CA variables."""
    bundle = session.guest_bundle or BUNDLES[0]
    if install:
        try:
            bundle = session.guest_bundle = await _install(agent, session.ca.pem, timeout)
        except AgentError as exc:
            raise ConfigError(
                f"installing the sandbox's CA in the guest failed: {exc.message}",
                hint="secrets need a guest whose /etc is writable",
            ) from exc
    env = {
        "SSL_CERT_FILE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "CURL_CA_BUNDLE": bundle,
        "NODE_EXTRA_CA_CERTS": CA_FILE,
        **session.environment(),
    }
    agent.default_env = tuple(env.items())
