"""The operator's TLS for a SuperLink reached across machines: check the certificate, key and CA before Flower starts
(``l2-fl coordinate``), and check what a SuperLink presents before a SuperNode dials it (``l2-fl join``).

Flower reports a certificate that does not name the dialled address as a gRPC error in a retry loop; these checks
name what is wrong instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

WILDCARD_BINDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a bind-all address -> what local clients dial


class TlsError(ValueError):
    """TLS files or a presented certificate that cannot serve the address in question; the message says why, and
    arg names the command-line option whose file is at fault (empty when none is)."""

    def __init__(self, message: str, arg: str = "") -> None:
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS: its certificate, that certificate's private key, and the CA that signed it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def dial_host(bind: str) -> str:
    """The address clients on the coordinator's own machine (``flwr``, Flower's SuperExec) dial for a bind address."""
    return WILDCARD_BINDS.get(bind, bind)


def hostport(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(s: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port); ValueError naming the problem."""
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{s!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _load_cert(path: Path, arg: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate", arg) from None


def load_ca(path: Path, arg: str = "--tls-ca") -> x509.Certificate:
    """The CA certificate in path (PEM); TlsError (for option arg) if it is not one."""
    ca = _load_cert(path, arg)
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise TlsError(f"{path} is not a CA certificate (no basicConstraints CA:TRUE)", arg)
    return ca


def names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's subjectAltName carries."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def covers(cert: x509.Certificate, host: str) -> bool:
    """Whether the certificate's subjectAltName names host (an IP literal, or a DNS name; ``*.`` covers one label),
    as gRPC's hostname check requires (the subject's CN is not consulted)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for n in names(cert):
        if ip is not None:
            try:
                if ipaddress.ip_address(n) == ip:
                    return True
            except ValueError:
                pass
            continue
        n, h = n.lower().rstrip("."), host.lower().rstrip(".")
        if n == h or (n.startswith("*.") and h.partition(".")[2] == n[2:] and h.partition(".")[0]):
            return True
    return False


def check_server_tls(tls: ServerTls, hosts: list[str]) -> list[str]:
    """Refuse TLS files a SuperLink could not serve to clients dialling each of hosts: a file that is not PEM, a key
    that is not the certificate's, a certificate the CA did not sign or outside its validity, a subjectAltName that
    does not name a host. Returns the names the certificate carries."""
    ca = load_ca(tls.ca)
    cert = _load_cert(tls.cert, "--tls-cert")
    try:
        key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    except (ValueError, TypeError) as e:  # TypeError: an encrypted key (Flower cannot ask for a passphrase)
        raise TlsError(f"{tls.key} is not an unencrypted PEM private key ({e})", "--tls-key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise TlsError(f"{tls.key} is not the private key of --tls-cert {tls.cert}", "--tls-key")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsError(f"{tls.cert} is not signed by --tls-ca {tls.ca} (issuer {cert.issuer.rfc4514_string()}, "
                       f"CA {ca.subject.rfc4514_string()})", "--tls-cert") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    for c, path, arg in ((cert, tls.cert, "--tls-cert"), (ca, tls.ca, "--tls-ca")):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise TlsError(f"{path} is valid from {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                           f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now", arg)
    have = names(cert)
    for h in hosts:
        if not covers(cert, h):
            raise TlsError(f"{tls.cert} does not name {h}, which clients dial (its subjectAltName: "
                           f"{', '.join(have) or 'none'}): issue a certificate with {h} in its subjectAltName",
                           "--tls-cert")
    return have


def probe(superlink: str, ca: Path, timeout: float = 5.0) -> str | None:
    """One TLS handshake with the SuperLink at HOST:PORT, verifying its certificate against ca and host, as the
    SuperNode will. TlsError when the certificate is refused (the message names the reason: wrong CA, address not
    in its subjectAltName, expired); None when it verifies; a short note when nothing answered (the SuperNode will
    keep retrying, so that is not an error here)."""
    host, port = split_hostport(superlink)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])  # gRPC servers refuse a handshake without it
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as e:
        raise TlsError(f"the SuperLink at {superlink} presented a certificate that --root-certificates {ca} does not "
                       f"accept for {host}: {e.verify_message}") from None
    except (OSError, ssl.SSLError) as e:
        return f"could not check the SuperLink's certificate now ({e}); the SuperNode will keep trying"
