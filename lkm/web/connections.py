"""Connections before HTTP: who may connect, how many at once, and who the client is behind a proxy.

    ConnectionGuard         one listener's admission: allowed_networks, max_connections, max_connections_per_client
    GuardedSocket           a listening socket whose accept() applies the guard, so a refused connection is closed
                            before TLS or HTTP costs anything; out of descriptors, it sheds the connection and logs
                            one rate-limited line instead of a traceback per accept
    LogThrottle             at most one log line per interval, with a count of the ones left out
    raise_descriptor_limit  the soft RLIMIT_NOFILE up to the hard limit, at start-up

Counts are per process: with several worker processes, each enforces its own caps.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from lkm.config import ListenSettings
from lkm.metrics import RefusalReason
from lkm.web.balance import ConnectionBoard

log = logging.getLogger("lkm.net")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# How many connections one accept() call may refuse before it hands the event loop back to the other work.
MAX_REFUSALS_PER_ACCEPT = 64
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class LogThrottle:
    """Lets one log line through per `interval` seconds and counts the ones it held back."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._next = 0.0
        self.suppressed = 0

    def allow(self) -> int | None:
        """None while throttled; else how many lines were held back since the last one let through."""
        now = self.clock()
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        held, self.suppressed = self.suppressed, 0
        return held


def parse_address(text: str | None) -> Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: Address | None, networks: tuple[Network, ...]) -> bool:
    return address is not None and any(address in network for network in networks)


class ConnectionGuard:
    """One listener's connection admission, decided at accept from the peer address alone."""

    def __init__(self, listener: str, settings: ListenSettings,
                 on_refused: Callable[[str, RefusalReason], None],
                 on_open: Callable[[str, int], None], board: ConnectionBoard | None = None) -> None:
        """`board`: the open connections of every worker sharing this listener (lkm.web.balance), if any."""
        self.listener = listener
        self.settings = settings
        self.allowed = settings.allowed_networks
        self.trusted_proxies = settings.trusted_proxies
        self.max_total = settings.max_connections
        self.max_per_client = settings.max_connections_per_client
        self._on_refused = on_refused
        self._on_open = on_open
        self.open = 0
        self.board = board
        self._per_client: dict[str, int] = {}  # only peers with open connections: at most max_connections

    def admit(self, host: str) -> RefusalReason | None:
        """None and the connection counted, or why it is refused (and counted as refused)."""
        reason = self._refusal(host)
        if reason is not None:
            self.refused(reason)
            return reason
        self.open += 1
        if self.board is not None:
            self.board.note(self.open)
        self._per_client[host] = self._per_client.get(host, 0) + 1
        self._on_open(self.listener, 1)
        return None

    def _refusal(self, host: str) -> RefusalReason | None:
        if self.allowed and not in_networks(parse_address(host), self.allowed):
            return RefusalReason.NOT_ALLOWED
        if self.open >= self.max_total:
            return RefusalReason.LISTENER_FULL
        if self._per_client.get(host, 0) >= self.max_per_client and not self.is_trusted_proxy(host):
            return RefusalReason.CLIENT_FULL
        return None

    def release(self, host: str) -> None:
        self.open -= 1
        if self.board is not None:
            self.board.note(self.open)
        left = self._per_client.get(host, 1) - 1
        if left > 0:
            self._per_client[host] = left
        else:
            self._per_client.pop(host, None)
        self._on_open(self.listener, -1)

    def refused(self, reason: RefusalReason) -> None:
        self._on_refused(self.listener, reason)

    def is_trusted_proxy(self, host: str | None) -> bool:
        return bool(self.trusted_proxies) and in_networks(parse_address(host), self.trusted_proxies)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client: the peer, or behind a trusted proxy the nearest untrusted X-Forwarded-For address.

        Walked from the right: each trusted proxy appends the address it saw, and only addresses that trusted
        proxies appended can be believed. An entry that is not an address ends the walk at the last good one.
        """
        if forwarded_for is None or not self.is_trusted_proxy(peer):
            return peer
        client = peer
        for entry in reversed(forwarded_for.split(",")):
            address = parse_address(entry)
            if address is None:
                break
            client = str(address)
            if not in_networks(address, self.trusted_proxies):
                break
        return client


class TrackedSocket(socket.socket):
    """An accepted connection that gives its place back to the guard when it is closed."""

    __slots__ = ("_release",)
    _release: Callable[[], None] | None

    def close(self) -> None:
        release = getattr(self, "_release", None)
        self._release = None
        super().close()
        if release is not None:
            release()


class _Reserve:
    """One spare descriptor: out of descriptors, it is given up to accept and close one waiting connection."""

    def __init__(self) -> None:
        self.fd: int | None = self._open()

    @staticmethod
    def _open() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def release(self) -> bool:
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def restore(self) -> None:
        if self.fd is None:
            self.fd = self._open()


_RESERVE: _Reserve | None = None
_NO_DESCRIPTORS_LOG = LogThrottle(interval=10.0)


class GuardedSocket(socket.socket):
    """A listening socket that admits connections through a `ConnectionGuard` as it accepts them.

    asyncio calls accept() on the socket it was given; a refused connection is closed here, before a transport,
    a TLS handshake or a request handler exists for it.
    """

    __slots__ = ("_taken", "guard", "one_per_round")
    guard: ConnectionGuard
    one_per_round: bool
    _taken: bool

    @classmethod
    def listen_on(cls, host: str, port: int, guard: ConnectionGuard, backlog: int) -> GuardedSocket:
        _reserve_a_descriptor()
        sock = listening_socket(host, port, backlog=backlog, kind=cls)
        assert isinstance(sock, GuardedSocket)
        sock.guard = guard
        sock.one_per_round = sock._taken = False
        return sock

    @classmethod
    def adopt(cls, listening: socket.socket, guard: ConnectionGuard) -> GuardedSocket:
        """A socket bound and listening already (inherited from the supervisor), guarded from now on.

        Every worker process listens on it, so each takes one connection per turn of its event loop
        (`one_per_round`): asyncio otherwise accepts every waiting connection at once, and the first worker to
        wake took a whole burst of new connections. Platform connections are kept alive for long, so that
        skew stayed: 16 connections opened together were served 3 to 1 by one of two workers, whose core
        was saturated while the other's idled. One at a time, the workers race for each connection, and a
        worker busy with an RSA operation loses the race to an idle one. With a board (the guard's; see
        lkm.web.balance), a worker also leaves each new connection, for a few milliseconds at most, to a worker
        with fewer."""
        _reserve_a_descriptor()
        sock = cls(listening.family, listening.type, listening.proto, fileno=listening.detach())
        sock.guard = guard
        sock.one_per_round = True
        sock._taken = False
        sock.setblocking(False)
        return sock

    def _next_round(self) -> None:
        self._taken = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._taken:  # this turn's connection is taken: the rest go to whichever worker asks next
            raise BlockingIOError(errno.EAGAIN, "one connection per turn of the event loop")
        guard = self.guard
        if guard.board is not None and guard.board.leave_to_another(guard.open):
            raise BlockingIOError(errno.EAGAIN, "left to a worker with fewer connections open")
        for _ in range(MAX_REFUSALS_PER_ACCEPT):
            try:
                conn, addr = super().accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS or not self._shed_one():
                    raise
                continue
            host = addr[0]
            if guard.admit(host) is not None:
                conn.close()
                continue
            tracked = TrackedSocket(conn.family, conn.type, conn.proto, fileno=conn.detach())
            tracked._release = functools.partial(guard.release, host)
            if self.one_per_round:
                self._taken = True
                asyncio.get_running_loop().call_soon(self._next_round)
            return tracked, addr
        raise BlockingIOError(errno.EAGAIN, "refused connections; the rest wait for the next round")

    def _shed_one(self) -> bool:
        """Out of descriptors: accept and close one waiting connection with the spare descriptor."""
        reserve = _RESERVE
        if reserve is None or not reserve.release():
            return False
        try:
            conn, _ = super().accept()
            conn.close()
        finally:
            reserve.restore()
        self.guard.refused(RefusalReason.NO_DESCRIPTORS)
        held = _NO_DESCRIPTORS_LOG.allow()
        if held is not None:
            log.error("out of file descriptors: refusing new connections", extra={
                "listener": self.guard.listener, "refused_since_last_line": held,
                "open_connections": self.guard.open})
        return True


def raise_descriptor_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every connection, file and socket of the process needs one.

    Under systemd the unit sets both (LimitNOFILE) and forbids setrlimit; nothing to do then.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})


def _reserve_a_descriptor() -> None:
    global _RESERVE  # noqa: PLW0603 - one spare descriptor per process, made with the first listener
    if _RESERVE is None:
        _RESERVE = _Reserve()


def listening_socket(host: str, port: int, *, backlog: int = 1024,
                     kind: type[socket.socket] = socket.socket) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; a failed bind names the address it wanted."""
    family, sock_type, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    sock = kind(family, sock_type, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} ({host}:{port})") from None
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
