"""Reload without a restart: what SIGHUP re-reads, swapped in for new connections and requests only.

TLS: each listener is handed one SSLContext for its whole life; its SNI callback, which OpenSSL runs early in
every handshake (with or without a server name), points the new connection at the newest context. Open
connections keep the context they were made with, so keep-alive clients and in-flight requests notice
nothing. The newest context carries the renewed certificate and key and, for mutual TLS, the new client CA.

Everything is built first and swapped only when all of it loaded: a bad new file changes nothing.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from lkm.auth import ClientPolicy
from lkm.config import Settings
from lkm.hawk import HawkCredential
from lkm.hawk_credentials import CredentialSource
from lkm.tlsconf import tls_context
from lkm.web.routes import ListenerName

log = logging.getLogger("lkm.reload")


class SwappableContext:
    """The context a listener keeps, whose handshakes use `current`, which `swap` replaces."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.listener_context = ctx
        self.current = ctx
        ctx.sni_callback = self._choose

    def _choose(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not self.listener_context:
            conn.context = current

    def swap(self, ctx: ssl.SSLContext) -> None:
        self.current = ctx


def inline_credentials(settings: Settings) -> dict[str, HawkCredential]:
    return {ref.id: HawkCredential(id=ref.id, key=ref.key.read_text()) for ref in settings.platform.hawk.credentials}


@dataclass
class Reloadable:
    """The parts of a running server that a reload replaces."""

    contexts: dict[ListenerName, SwappableContext] = field(default_factory=dict)
    policy: ClientPolicy | None = None
    hawk: CredentialSource | None = None

    def apply(self, settings: Settings, set_level: Callable[[str], None]) -> None:
        """Load everything from `settings`, then swap it in; any error leaves the old settings in force."""
        contexts = {name: tls_context(settings, name) for name in self.contexts}
        credentials = inline_credentials(settings) if self.hawk is not None else {}
        if self.hawk is not None:
            self.hawk.replace_inline(credentials)  # validates first, keeps the old set on ValueError
        for name, ctx in contexts.items():
            if ctx is not None:
                self.contexts[name].swap(ctx)
        if self.policy is not None and settings.native is not None:
            self.policy.replace(settings.native.clients)
        set_level(settings.logging.level)
        log.info("configuration reloaded", extra={"listeners": sorted(str(name) for name in contexts)})
