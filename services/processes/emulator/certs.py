"""The emulator's local CA and server certificate, made once and reused.

The SDK always dials wss://, so the emulator needs a certificate the client trusts. We keep a
private CA (ca.pem + ca.key) under the state directory and issue the server certificate from it
(SAN IP 127.0.0.1, ::1, DNS localhost, plus --host when it is a specific address). Clients trust
only ca.pem; the keys stay 0600. trustme (on top of cryptography) does the X.509 work.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509

DEFAULT_IDENTITIES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class CertPaths:
    ca_file: Path        # the CA certificate a client trusts
    cert_file: Path      # server certificate chain (leaf then CA)
    key_file: Path       # server private key


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a PEM behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _covers(cert_pem: bytes, identities: tuple[str, ...]) -> bool:
    """True when the certificate is valid now and its SANs name every identity."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    now = datetime.datetime.now(datetime.timezone.utc)
    if not (cert.not_valid_before_utc <= now < cert.not_valid_after_utc):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    names |= set(san.get_values_for_type(x509.DNSName))
    for ident in identities:
        try:
            ident = str(ipaddress.ip_address(ident))
        except ValueError:
            pass
        if ident not in names:
            return False
    return True


def server_identities(host: str) -> tuple[str, ...]:
    """Loopback names always, plus the bind host when it is one specific address or name."""
    extra = () if host in ("", "0.0.0.0", "::") or host in DEFAULT_IDENTITIES else (host,)
    return DEFAULT_IDENTITIES + extra


def ensure_certificates(directory: Path, host: str = "127.0.0.1") -> CertPaths:
    """Create the CA and server certificate on first use; reuse them afterwards.

    A flock serialises two emulators starting at once on a fresh state directory, so both end
    up trusting the same CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key_file = directory / "ca.key"
    identities = server_identities(host)
    with open(directory / ".certs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ca: trustme.CA | None = None
        if paths.ca_file.is_file() and ca_key_file.is_file():
            try:
                ca = trustme.CA.from_pem(paths.ca_file.read_bytes(), ca_key_file.read_bytes())
                if not _covers_ca(paths.ca_file.read_bytes()):
                    ca = None
            except (ValueError, TypeError):
                ca = None          # unreadable or mismatched: make a fresh pair below
        if ca is None:
            ca = trustme.CA(organization_name="livepipe emulator")
            _write(ca_key_file, ca.private_key_pem.bytes(), private=True)
            _write(paths.ca_file, ca.cert_pem.bytes(), private=False)
            fresh_ca = True
        else:
            fresh_ca = False
        if (fresh_ca or not paths.cert_file.is_file() or not paths.key_file.is_file()
                or not _issued_by(paths.cert_file.read_bytes(), paths.ca_file.read_bytes())
                or not _covers(paths.cert_file.read_bytes(), identities)):
            leaf = ca.issue_cert(*identities, common_name="livepipe emulator")
            _write(paths.key_file, leaf.private_key_pem.bytes(), private=True)
            _write(paths.cert_file, b"".join(blob.bytes() for blob in leaf.cert_chain_pems), private=False)
    return paths


def _covers_ca(ca_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(ca_pem)
    now = datetime.datetime.now(datetime.timezone.utc)
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def _issued_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        leaf.verify_directly_issued_by(ca)
        return True
    except Exception:      # any mismatch or parse failure means: re-issue
        return False
