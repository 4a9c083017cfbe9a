"""A certificate authority made per sandbox, for the hosts its secrets are bound to.

The gateway terminates the guest's TLS to a bound host with a certificate from this CA; the guest
trusts it (its public certificate is installed in the guest's CA bundle). The CA's key exists only
in this process's memory (certificates reach OpenSSL through a memfd, never a file), and the CA is
name-constrained to the bound hosts, so even its key could sign for nothing else.
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections import OrderedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from capsa.net.rules import Domain

MAX_LEAVES = 256  # server contexts kept per sandbox (one per host name the guest asked for)
_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class SandboxCA:
    """Signs one leaf certificate per host name on demand, cached as a ready server context."""

    def __init__(self, domains: list[Domain]) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capsa sandbox CA")])
        permitted = sorted({d.base for d in domains})
        self.permitted = tuple(permitted)  # its name constraints: these names and those below
        now = _now()
        self._name = name
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 3650 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(
                x509.NameConstraints([x509.DNSName(n) for n in permitted], None), critical=True
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def __repr__(self) -> str:
        return "SandboxCA(<key hidden>)"

    def permits(self, domain: Domain) -> bool:
        """Whether the CA's name constraints let it sign for ``domain`` (and any name it matches)."""
        base = domain.base
        return any(base == p or base.endswith("." + p) for p in self.permitted)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a sandbox CA is not pickled: its key stays in the process that made it")

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``host`` (ALPN: http/1.1 only)."""
        context = self._contexts.get(host)
        if context is not None:
            self._contexts.move_to_end(host)
            return context
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        chain = self._leaf(host) + self.pem.encode()
        key = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.memfd_create("capsa-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, chain + key)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._contexts[host] = context
        while len(self._contexts) > MAX_LEAVES:
            self._contexts.popitem(last=False)
        return context

    def _leaf(self, host: str) -> bytes:
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self._name)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 365 * _DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)
