"""TLS contexts for the listeners: TLS 1.2 minimum, forward-secret AEAD ciphers, session tickets on."""

from __future__ import annotations

import ssl

from lkm.config import Settings, TLSSettings
from lkm.errors import ConfigError
from lkm.web.routes import ListenerName

# TLS 1.2 suites; TLS 1.3 suites are all AEAD and stay at OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


def server_context(tls: TLSSettings, *, require_client_cert: bool, source: str, setting: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    # Resumption (tickets) makes a reconnect cost a fraction of a full handshake; keep OpenSSL's default on.
    ctx.options &= ~ssl.OP_NO_TICKET
    password = tls.key_password.read_bytes() if tls.key_password else None
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=password)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(source, f"{setting}.cert_file/key_file",
                          f"a PEM certificate and its matching private key ({exc})") from None
    if require_client_cert:
        assert tls.client_ca_file is not None
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(source, f"{setting}.client_ca_file", f"a PEM CA certificate ({exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def tls_context(settings: Settings, name: ListenerName) -> ssl.SSLContext | None:
    """The listener's server context from `settings`; raises ConfigError for an unusable file."""
    tls: TLSSettings | None
    if name is ListenerName.PLATFORM:
        tls = settings.platform.tls
        mutual = False
    else:
        tls = settings.native.tls if settings.native is not None else None
        mutual = True
    if tls is None:
        return None
    return server_context(tls, require_client_cert=mutual, source=settings.source, setting=f"{name}.tls")
