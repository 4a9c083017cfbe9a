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

from capsa.agent.client import Agent
from capsa.errors import ConfigError
from capsa.net.secrets import SecretSession

CA_DIR = "/etc/capsa"
CA_FILE = f"{CA_DIR}/sandbox-ca.pem"
_INSTALL = r"""
set -eu
umask 022
mkdir -p /etc/capsa
printf '%s' "$1" > /etc/capsa/sandbox-ca.pem
bundle=""
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
  if [ -e "$f" ]; then bundle=$(readlink -f "$f"); break; fi
done
if [ -z "$bundle" ]; then
  bundle=/etc/ssl/certs/ca-certificates.crt
  mkdir -p /etc/ssl/certs
  : > /etc/capsa/system-ca.pem
fi
[ -e /etc/capsa/system-ca.pem ] || cp "$bundle" /etc/capsa/system-ca.pem
cat /etc/capsa/system-ca.pem /etc/capsa/sandbox-ca.pem > "$bundle.capsa-new"
mv -f "$bundle.capsa-new" "$bundle"
printf '%s' "$bundle"
"""


async def arm_secrets(agent: Agent, session: SecretSession, *, install: bool, timeout: float) -> None:
    """Install the session's CA in the guest (unless ``install`` is false: a fork's guest has its
    parent's already) and give every exec the placeholders and CA variables."""
    bundle = session.guest_bundle or "/etc/ssl/certs/ca-certificates.crt"
    if install:
        done = (
            await agent.exec("/bin/sh")
            .args(["-c", _INSTALL, "sh", session.ca.pem])
            .timeout(timeout)
            .run()
        )
        if done.exit_code != 0 or not done.stdout.startswith("/"):
            raise ConfigError(
                f"installing the sandbox's CA in the guest failed: {done.stderr.strip()[:300]}",
                hint="secrets need a guest with /bin/sh and a writable /etc",
            )
        bundle = session.guest_bundle = done.stdout.strip()
    env = {
        "SSL_CERT_FILE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "CURL_CA_BUNDLE": bundle,
        "NODE_EXTRA_CA_CERTS": CA_FILE,
        **session.environment(),
    }
    agent.default_env = tuple(env.items())
