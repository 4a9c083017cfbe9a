"""HTTPS for ``capsa serve``: the certificate the server presents, checked before it starts, or
made on the spot from a local CA (``--tls auto``).

E2B's SDKs and tests open ``https://{port}-{sandbox_id}.{domain}`` (``get_host``), so the one
certificate must cover ``*.{domain}`` as well as the addresses the API is called on. A certificate
given with ``--tls-cert``/``--tls-key`` is checked here (readable, PEM, key matching, within its
validity, covering ``*.{domain}``) so that a mistake is a :class:`ConfigError` at start, not a
handshake failure in every client later.

``--tls auto`` keeps a CA in a private directory (``0700``, its key ``0600``; the key never leaves
this machine and nothing of it reaches a sandbox). The CA carries name constraints: it can only
vouch for the server's domain, ``localhost`` and the loopback addresses, so a client that trusts
it (``SSL_CERT_FILE``, ``NODE_EXTRA_CA_CERTS``) trusts nothing else because of it, even if the
key leaked. The server certificate is made afresh at each start from that CA.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from capsa.errors import ConfigError

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate
LOOPBACK_IPS = ("127.0.0.1", "::1")
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class TlsFiles:
    """What the server loads (``cert``, ``key``: one file with both for ``--tls auto``) and, with
    ``--tls auto``, the CA clients trust (``ca``: that CA alone; ``bundle``: the system's CAs
    plus it, for ``SSL_CERT_FILE``)."""

    cert: Path
    key: Path
    ca: Path | None = None
    bundle: Path | None = None


def domain_host(domain: str) -> str:
    """The host part of ``--domain`` (``capsa.localhost:3000`` → ``capsa.localhost``)."""
    host = domain.lower()
    if host.startswith("["):
        return host[1 : host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_wildcard_domain(domain: str) -> str:
    """The domain's host, when ``*.host`` can be a certificate name that TLS clients accept:
    not an IP address and at least two labels (OpenSSL refuses ``*.localhost``)."""
    host = domain_host(domain)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise ConfigError(
            f"--domain {domain} is an IP address: no certificate covers {{port}}-{{id}}.{host}",
            hint="use a name, e.g. --domain capsa.localhost:PORT (any *.localhost is loopback)",
        )
    if "." not in host.strip("."):
        raise ConfigError(
            f"--domain {domain}: TLS clients refuse the certificate name *.{host} (a wildcard "
            "directly under a single label)",
            hint=f"use a domain with two labels, e.g. --domain capsa.{host}:PORT",
        )
    return host


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2+, HTTP/1.1 by ALPN)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use the certificate {files.cert} with the key {files.key}: {exc}",
            hint="--tls-cert takes a PEM certificate (chain), --tls-key its unencrypted PEM key",
        ) from None
    return context


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {flag} {path}: {exc.strerror}",
            hint="check the path and that the user running capsa serve may read it",
        ) from None


def check_given(
    cert_path: Path, key_path: Path, domain: str, now: datetime.datetime | None = None
) -> None:
    """Refuse a ``--tls-cert``/``--tls-key`` pair the SDKs could not use with this ``--domain``."""
    host = check_wildcard_domain(domain)
    cert_pem, key_pem = _read(cert_path, "--tls-cert"), _read(key_path, "--tls-key")
    try:  # (ConfigError is a ValueError: the files are read first)
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(
            f"--tls-cert {cert_path} holds no PEM certificate",
            hint="a PEM file starts with -----BEGIN CERTIFICATE-----",
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"--tls-key {key_path} is encrypted",
            hint=f"give it unencrypted (openssl pkey -in {key_path} -out KEY), readable by you only",
        ) from None
    except ValueError:
        raise ConfigError(
            f"--tls-key {key_path} holds no PEM private key",
            hint="a PEM key starts with -----BEGIN PRIVATE KEY----- (or EC/RSA PRIVATE KEY)",
        ) from None
    leaf = chain[0]
    if _public(leaf.public_key()) != _public(key.public_key()):
        raise ConfigError(
            f"--tls-key {key_path} is not the key of the certificate in --tls-cert {cert_path}",
            hint="give the private key the certificate was issued for (its first certificate)",
        )
    now = now or datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= now:
        raise ConfigError(
            f"the certificate in --tls-cert {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}",
            hint="renew it (or use --tls auto for a local one)",
        )
    if leaf.not_valid_before_utc > now:
        raise ConfigError(
            f"the certificate in --tls-cert {cert_path} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            hint="check the machine's clock, or use a certificate valid now",
        )
    names = {n.lower() for n in _dns_names(leaf)}
    if f"*.{host}" not in names:
        raise ConfigError(
            f"the certificate in --tls-cert {cert_path} does not cover *.{host}, the sandboxes' "
            f"hosts ({{port}}-{{sandbox_id}}.{host}); it names {', '.join(sorted(names)) or 'nothing'}",
            hint="pass the --domain the certificate is for, or issue one for *.DOMAIN (a wildcard)",
        )


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def default_dir() -> Path:
    """``$XDG_DATA_HOME/capsa/tls``, else ``~/.local/share/capsa/tls``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "capsa" / "tls"


def auto(
    directory: Path, domain: str, extra_ips: tuple[str, ...] = ()
) -> tuple[TlsFiles, ssl.SSLContext]:
    """A server certificate for ``domain`` (``host`` and ``*.host``), ``localhost`` and the
    loopback addresses (plus ``extra_ips``), issued by the CA kept in ``directory`` (made, or
    remade when it expired or cannot vouch for these names), and the context serving it."""
    host = check_wildcard_domain(domain)
    ips = tuple(dict.fromkeys((*LOOPBACK_IPS, *extra_ips)))
    names = (host, "localhost")
    _private_dir(directory)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca-key.pem"
    server = directory / "server.pem"  # its key and certificate, 0600
    # two servers starting at once make one CA, and each loads its own key with its certificate
    with _locked(directory):
        ca = _load_ca(ca_path, ca_key_path, names, ips)
        if ca is None:
            ca = _make_ca(names, ips)
            _write(ca_key_path, _key_pem(ca[1]))
            _write(ca_path, ca[0].public_bytes(serialization.Encoding.PEM), private=False)
            log.warning("made a new local CA %s: clients must trust it (again)", ca_path)
        cert, key = _issue(ca, host, ips)
        _write(server, _key_pem(key) + cert.public_bytes(serialization.Encoding.PEM))
        bundle = directory / "bundle.pem"
        _write(bundle, _system_roots() + ca_path.read_bytes(), private=False)
        files = TlsFiles(server, server, ca_path, bundle)
        return files, server_context(files)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        message = f"cannot lock {directory}: {exc.strerror}"
        raise ConfigError(message, hint="pass --tls-dir DIR") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for milliseconds: key generation and a few writes
        yield
    finally:
        os.close(fd)


def _private_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise ConfigError(
            f"cannot make the TLS directory {directory}: {exc.strerror}",
            hint="pass --tls-dir DIR, a directory you may write",
        ) from None


def _write(path: Path, data: bytes, *, private: bool = True) -> None:
    """Replace ``path`` atomically; a private file is 0600 from its first byte."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror}", hint="pass --tls-dir DIR") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _system_roots() -> bytes:
    """The system's CA bundle (so a ``SSL_CERT_FILE`` of the bundle still reaches the internet)."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None:
        return b""
    try:
        data = Path(cafile).read_bytes()
    except OSError:
        return b""
    return data if data.endswith(b"\n") or not data else data + b"\n"


_Ca = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
_CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _load_ca(
    cert_path: Path, key_path: Path, names: tuple[str, ...], ips: tuple[str, ...]
) -> _Ca | None:
    """The kept CA, or None when there is none usable (then a new one is made)."""
    if not cert_path.exists() or not key_path.exists():
        return None
    mode = key_path.stat().st_mode
    if mode & 0o077:
        raise ConfigError(
            f"the local CA's key {key_path} is readable by others (mode {mode & 0o777:o})",
            hint=f"chmod 600 {key_path}, or delete the directory to make a new CA",
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("the local CA in %s is unusable (%s): making a new one", cert_path.parent, exc)
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _public(key.public_key()) != _public(
        cert.public_key()
    ):
        log.warning("the local CA's key does not match %s: making a new one", cert_path)
        return None
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=SERVER_DAYS)
    if cert.not_valid_after_utc < soon:
        log.warning("the local CA %s expires before a new server certificate would", cert_path)
        return None
    try:
        allowed = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    dns = {s.value for s in allowed.permitted_subtrees or [] if isinstance(s, x509.DNSName)}
    nets = {s.value for s in allowed.permitted_subtrees or [] if isinstance(s, x509.IPAddress)}
    if not set(names) <= dns or not all(ipaddress.ip_network(ip) in nets for ip in ips):
        log.warning("the local CA %s does not cover %s: making a new one", cert_path, ", ".join(names))
        return None
    return cert, key


def _make_ca(names: tuple[str, ...], ips: tuple[str, ...]) -> _Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"capsa serve local CA ({names[0]})")])
    now = datetime.datetime.now(datetime.UTC)
    permitted: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    permitted += [x509.IPAddress(ipaddress.ip_network(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _CA_USAGE,
            critical=True,
        )
        .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(ca: _Ca, host: str, ips: tuple[str, ...]) -> _Ca:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(host), x509.DNSName(f"*.{host}")]
    names.append(x509.DNSName("localhost"))
    names += [x509.IPAddress(_ip(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _ip(text: str) -> _IP:
    return ipaddress.ip_address(text)


__all__ = ["TlsFiles", "auto", "check_given", "check_wildcard_domain", "default_dir", "domain_host",
           "server_context"]  # fmt: skip
