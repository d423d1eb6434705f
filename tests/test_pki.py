"""The dev and test PKI: what it issues chains to its CA, names what it was asked to, and is used as intended."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from lkm import pki


def test_server_certificate_names_and_verifies(tmp_path: Path) -> None:
    ca = pki.make_ca("test CA")
    server = pki.issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1", "::1"))
    sans = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                              ipaddress.ip_address("::1")}
    usage = server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    server.cert.verify_directly_issued_by(ca.cert)

    # OpenSSL accepts the pair as a server identity trusted through the CA.
    ca.write(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    server.write(tmp_path / "server.pem", tmp_path / "server-key.pem")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server-key.pem")
    assert (tmp_path / "server-key.pem").stat().st_mode & 0o077 == 0


def test_client_certificate_and_chosen_validity() -> None:
    ca = pki.make_ca()
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    client = pki.issue(ca, "admin", server=False, not_before=start, not_after=start + dt.timedelta(days=1))
    usage = client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.cert.not_valid_after_utc == start + dt.timedelta(days=1)
    client.cert.verify_directly_issued_by(ca.cert)


def test_load_cert_expiry(tmp_path: Path) -> None:
    ca = pki.make_ca(days=30)
    ca.write(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    assert pki.load_cert_expiry(tmp_path / "ca.pem") == ca.cert.not_valid_after_utc
