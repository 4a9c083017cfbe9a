"""A sandbox's side of its gateway's secrets: the guest trusts the sandbox's CA and every exec gets
the placeholders.

The CA's public certificate is appended to the guest's system CA bundle (the first of the usual
paths that exists, else Debian's, created) after removing the one a previous arming appended (a
restored snapshot's), so a restored guest trusts its own CA and no longer its template's or
snapshot's. ``SSL_CERT_FILE`` and ``REQUESTS_CA_BUNDLE`` name that bundle, ``NODE_EXTRA_CA_CERTS``
the CA alone (``capsa-sandbox-ca.pem`` beside the bundle: its directory exists, so no mkdir).
Placeholders and those variables are added to every exec on the host side
(:attr:`Agent.default_env`): the value of a secret never reaches the guest.

Arming is on the critical path of every ``build()`` with secrets, and a freshly restored guest runs
each agent operation slowly (its code is cold), so it costs as few as possible: the bundle as the
image has it is remembered per snapshot (the guest's files are the snapshot's until its first exec),
so a sandbox restored from a template this process has seen before only writes two files at once:
no read, no probe, no directory to make.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from capsa.agent.client import Agent
from capsa.errors import AgentError, ConfigError, GuestFileNotFoundError
from capsa.net.secrets import SecretSession

CA_NAME = "capsa-sandbox-ca.pem"  # the CA alone, in the bundle's directory
BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # others
)
MAX_BUNDLE = 16 << 20
MAX_KNOWN = 16  # snapshots whose image bundle is remembered (public certificates, ~200 KiB each)
MAX_KNOWN_SIZE = 1 << 20  # a larger bundle (the guest's to make) is read again each time


def ca_file(bundle: str) -> str:
    return f"{bundle.rpartition('/')[0]}/{CA_NAME}"


# snapshot identity -> (the bundle's path, its content without capsa's CA)
_known: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()


async def _image_bundle(agent: Agent, timeout: float) -> tuple[str, bytes]:
    """The guest's bundle path and content as the image has it (a CA capsa appended removed)."""
    found = await asyncio.gather(*(agent.exists(p, timeout=timeout) for p in BUNDLES))
    bundle = next((p for p, there in zip(BUNDLES, found, strict=True) if there), None)
    if bundle is None:
        return BUNDLES[0], b""
    old = b""
    with contextlib.suppress(GuestFileNotFoundError):
        old = await agent.read_file(ca_file(bundle), timeout=timeout, limit=65536)
    base = await agent.read_file(bundle, timeout=timeout, limit=MAX_BUNDLE)
    if old.strip():
        base = base.replace(old, b"")
    return bundle, base


async def _install(agent: Agent, pem: str, timeout: float, origin: str | None) -> str:
    """Write the CA and the bundle (the image's bundle + the CA) with file operations alone: no
    process is started. ``origin`` names the snapshot the guest was just restored from, if any."""
    known = _known.get(origin) if origin is not None else None
    if known is None:
        known = await _image_bundle(agent, timeout)
        if origin is not None and len(known[1]) <= MAX_KNOWN_SIZE:
            _known[origin] = known
            while len(_known) > MAX_KNOWN:
                _known.popitem(last=False)
    else:
        _known.move_to_end(origin)  # type: ignore[arg-type]
    bundle, base = known
    if not base:  # no bundle in the image: its directory may be missing too
        await agent.mkdir(bundle.rpartition("/")[0], parents=True, timeout=timeout)
    separator = b"" if not base or base.endswith(b"\n") else b"\n"
    await asyncio.gather(
        agent.write_file(ca_file(bundle), pem, timeout=timeout),
        agent.write_file(bundle, base + separator + pem.encode(), timeout=timeout),
    )
    return bundle


async def arm_secrets(
    agent: Agent, session: SecretSession, *, install: bool, timeout: float, origin: str | None = None
) -> None:
    """Install the session's CA in the guest (unless ``install`` is false: a fork's guest has its
    parent's already) and give every exec the placeholders and CA variables. ``origin``: the
    identity of the snapshot the guest was restored from and has not run anything since."""
    bundle = session.guest_bundle or BUNDLES[0]
    if install:
        try:
            bundle = session.guest_bundle = await _install(agent, session.ca.pem, timeout, origin)
        except AgentError as exc:
            raise ConfigError(
                f"installing the sandbox's CA in the guest failed: {exc.message}",
                hint="secrets need a guest whose /etc is writable",
            ) from exc
    env = {
        "SSL_CERT_FILE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "CURL_CA_BUNDLE": bundle,
        "NODE_EXTRA_CA_CERTS": ca_file(bundle),
        **session.environment(),
    }
    agent.default_env = tuple(env.items())
