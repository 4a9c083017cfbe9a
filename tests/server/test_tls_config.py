"""``capsa serve``'s TLS configuration (no server started): the local CA of ``--tls auto`` and the
checks of ``--tls-cert``/``--tls-key``. Certificates are verified with a real TLS handshake between
two in-memory ``ssl`` objects, as a client trusting only the CA would."""

from __future__ import annotations

import datetime
import os
import ssl
import threading
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from capsa.cli import main
from capsa.errors import ConfigError
from capsa.server import tls


def _handshake(server: ssl.SSLContext, ca: Path, name: str) -> None:
    """A full handshake in memory; raises ``ssl.SSLCertVerificationError`` if ``name`` fails."""
    client = ssl.create_default_context(cafile=ca)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (obj, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            return
    raise AssertionError("the handshake did not finish")


def test_auto_makes_a_private_ca_and_a_certificate_for_the_domain(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    files, context = tls.auto(directory, "capsa.localhost:4000")
    assert files.ca is not None and files.bundle is not None
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert files.key.stat().st_mode & 0o777 == 0o600  # (the server's key and certificate)
    for name in ("8000-iabc123.capsa.localhost", "capsa.localhost", "localhost", "127.0.0.1"):
        _handshake(context, files.ca, name)
    _handshake(context, files.bundle, "49983-iabc.capsa.localhost")  # the bundle holds it too
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(context, files.ca, "8000-iabc.other.localhost")
    ca_pem = files.ca.read_bytes()
    again, _ = tls.auto(directory, "capsa.localhost:5000")  # another port: the same CA
    assert again.ca is not None and again.ca.read_bytes() == ca_pem
    assert b"PRIVATE KEY" not in files.bundle.read_bytes()


def test_servers_starting_together_share_one_ca(tmp_path: Path) -> None:
    """Four servers starting at once on one directory: one CA, and each loads a key and
    certificate that belong together (one file, replaced at once)."""
    errors: list[BaseException] = []

    def start() -> None:
        try:
            for _ in range(3):
                files, context = tls.auto(tmp_path, "capsa.localhost:4000")
                assert files.ca is not None
                _handshake(context, files.ca, "8000-iabc.capsa.localhost")
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_the_ca_cannot_vouch_for_other_names(tmp_path: Path) -> None:
    """Name constraints: a certificate the CA's key signs for another name is refused by clients
    that trust the CA (a leaked key cannot impersonate other sites to them)."""
    files, _ = tls.auto(tmp_path, "capsa.localhost:4000")
    assert files.ca is not None
    ca_key = serialization.load_pem_private_key((tmp_path / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank.example")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "forged.pem", tmp_path / "forged-key.pem"
    cert_path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = tls.server_context(tls.TlsFiles(cert_path, key_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(context, files.ca, "bank.example")


def test_a_new_domain_or_a_loose_key_file(tmp_path: Path) -> None:
    first, _ = tls.auto(tmp_path, "capsa.localhost:4000")
    assert first.ca is not None
    old = first.ca.read_bytes()
    moved, context = tls.auto(tmp_path, "sandboxes.example.com")  # outside the old CA's names
    assert moved.ca is not None and moved.ca.read_bytes() != old
    _handshake(context, moved.ca, "3000-iabc.sandboxes.example.com")
    os.chmod(tmp_path / "ca-key.pem", 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        tls.auto(tmp_path, "sandboxes.example.com")


@pytest.mark.parametrize(
    ("domain", "why"),
    [("localhost:3000", "single label"), ("127.0.0.1:3000", "IP address"), ("[::1]:3000", "IP address")],
)
def test_domains_no_wildcard_certificate_covers(tmp_path: Path, domain: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as caught:
        tls.auto(tmp_path, domain)
    assert caught.value.hint and "--domain" in caught.value.hint


def _pair(
    tmp: Path, names: list[str], *, days: int = 30, start: int = -1
) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=start))
        .not_valid_after(now + datetime.timedelta(days=start + days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{names[0]}-{days}-{start}.pem", tmp / f"{names[0]}-{days}-{start}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path, key


def test_given_certificate_checks(tmp_path: Path) -> None:
    cert, key, _ = _pair(tmp_path, ["sb.example.com", "*.sb.example.com"])
    tls.check_given(cert, key, "sb.example.com")  # fine
    tls.server_context(tls.TlsFiles(cert, key))
    other_cert, other_key, other = _pair(tmp_path, ["other.example.com", "*.sb.example.com"])
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        tls.check_given(cert, other_key, "sb.example.com")
    with pytest.raises(ConfigError, match=r"does not cover \*\.sb2\.example\.com"):
        tls.check_given(cert, key, "sb2.example.com:8443")
    with pytest.raises(ConfigError, match="cannot read --tls-key"):
        tls.check_given(cert, tmp_path / "missing.key", "sb.example.com")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        tls.check_given(key, key, "sb.example.com")
    with pytest.raises(ConfigError, match="holds no PEM private key"):
        tls.check_given(cert, cert, "sb.example.com")
    expired_cert, expired_key, _ = _pair(tmp_path, ["sb.example.com", "*.sb.example.com"], start=-40)
    with pytest.raises(ConfigError, match="expired on") as caught:
        tls.check_given(expired_cert, expired_key, "sb.example.com")
    assert caught.value.hint and "renew" in caught.value.hint
    future_cert, future_key, _ = _pair(tmp_path, ["sb.example.com", "*.sb.example.com"], start=2)
    with pytest.raises(ConfigError, match="not valid before"):
        tls.check_given(future_cert, future_key, "sb.example.com")
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="is encrypted"):
        tls.check_given(other_cert, locked, "sb.example.com")


def test_cli_refuses_bad_tls_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAPSA_API_KEY", "a-test-key-of-some-length")
    cert, key, _ = _pair(tmp_path, ["sb.example.com", "*.sb.example.com"])
    _, other_key, _ = _pair(tmp_path, ["x.example.com"])
    base = ["serve", "--port", "1", "--max-sandboxes", "1"]
    assert main([*base, "--tls-cert", str(cert)]) == 2
    assert "go together" in capsys.readouterr().err
    assert main([*base, "--tls", "auto", "--tls-cert", str(cert), "--tls-key", str(key)]) == 2
    bad = ["--tls-cert", str(cert), "--tls-key", str(other_key), "--domain", "sb.example.com"]
    assert main([*base, *bad]) == 2
    assert "not the key" in capsys.readouterr().err
    assert main([*base, "--tls", "auto", "--domain", "localhost:1", "--tls-dir", str(tmp_path)]) == 2
    assert "capsa.localhost" in capsys.readouterr().err  # the hint names a domain that works
