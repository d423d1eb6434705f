"""Registering public keys with the platform API: a key counts only once the platform has it.

The calls (genesys-contract.md section 1): an OAuth client-credentials grant (`POST {login}/oauth/token`,
HTTP Basic client id and secret), then `POST {api}/api/v2/recording/localkeys` with
`{"configId", "publicKey", "keypairId"}` under the bearer token. While that call is open the platform sends a
test decrypt with the new key to lkm's registered URL, and answers an error if it fails; so the key must already
serve unwraps (state pending_activation) when this runs.

Failures are classified once, here: the caller's configuration (bad client credentials, an unknown key
configuration, a refused public key) is permanent and not retried; the platform being down, slow or throttling
is retried with exponential backoff, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from lkm.config import GenesysSettings
from lkm.errors import ConfigError, RegistrationError
from lkm.keys import KeyRecord, public_pkcs1_b64

log = logging.getLogger("lkm.genesys")

LOCALKEYS_PATH = "/api/v2/recording/localkeys"
OAUTH_PATH = "/oauth/token"
_RETRYABLE_STATUS = frozenset({408, 425, 429})
_MAX_DETAIL = 200


Attempt = Callable[[int, RegistrationError | None], Awaitable[None]]
"""Called after every attempt with its number and its error (None on success): audit, metrics, logs."""


class PlatformApi:
    """The two platform calls, with the token cached until shortly before it expires."""

    def __init__(self, settings: GenesysSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self._token: str | None = None
        self._token_expires = 0.0

    async def token(self) -> str:
        if self._token is not None and time.monotonic() < self._token_expires:
            return self._token
        s = self.settings
        try:
            secret = s.client_secret.read_text()
        except ConfigError as exc:
            raise RegistrationError(f"the OAuth client secret is unreadable: {exc}", code="platform_auth_failed",
                                    retryable=False) from None
        basic = base64.b64encode(f"{s.client_id}:{secret}".encode()).decode("ascii")
        status, body = await self._call("POST", s.login_url + OAUTH_PATH, "OAuth token",
                                        headers={"Authorization": f"Basic {basic}"},
                                        data={"grant_type": "client_credentials"})
        if status in (400, 401, 403):
            raise RegistrationError(f"the platform refused the OAuth client credentials ({status}): check "
                                    f"genesys.client_id and client_secret, and the client's grant type",
                                    code="platform_auth_failed", retryable=False)
        self._raise_for(status, body, "OAuth token")
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistrationError("the OAuth answer holds no access_token", code="platform_bad_answer",
                                    retryable=True)
        expires_in = body.get("expires_in") if isinstance(body, dict) else None
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
        self._token = token
        self._token_expires = time.monotonic() + max(0.0, lifetime - 60.0)
        return token

    async def register(self, record: KeyRecord) -> dict[str, Any]:
        payload = {"configId": self.settings.config_id, "publicKey": public_pkcs1_b64(record.public_key_der),
                   "keypairId": record.id}
        for fresh_token in (False, True):
            if fresh_token:
                self._token = None
            headers = {"Authorization": f"Bearer {await self.token()}"}
            status, body = await self._call("POST", self.settings.api_url + LOCALKEYS_PATH, "key registration",
                                            json=payload, headers=headers)
            if status == 401 and not fresh_token:
                continue  # the cached token expired early: one more try with a new one
            if status in (401, 403):
                raise RegistrationError(f"the platform refused the key registration ({status}): the OAuth client "
                                        f"needs the permission recording:encryptionKey:edit",
                                        code="platform_forbidden", retryable=False)
            self._raise_for(status, body, "key registration")
            return body if isinstance(body, dict) else {}
        raise AssertionError("unreachable")

    async def _call(self, method: str, url: str, what: str, **kwargs: Any) -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        try:
            async with self.session.request(method, url, timeout=timeout, **kwargs) as resp:
                raw = await resp.read()
                try:
                    body: Any = await resp.json(content_type=None) if raw else {}
                except ValueError:
                    body = {"message": raw[:_MAX_DETAIL].decode("utf-8", "replace")}
                return resp.status, body
        except TimeoutError:
            raise RegistrationError(f"{what}: no answer from the platform within {self.settings.timeout_seconds:g} s",
                                    code="platform_timeout", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise RegistrationError(f"{what}: cannot reach the platform ({exc.__class__.__name__})",
                                    code="platform_unreachable", retryable=True) from None

    @staticmethod
    def _raise_for(status: int, body: Any, what: str) -> None:
        if 200 <= status < 300:
            return
        message = body.get("message") if isinstance(body, dict) else None
        detail = f": {str(message)[:_MAX_DETAIL]}" if message else ""
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise RegistrationError(f"{what}: the platform answered {status}{detail}", code="platform_unavailable",
                                    retryable=True)
        raise RegistrationError(f"{what}: the platform refused it ({status}){detail}", code="platform_rejected",
                                retryable=False)


def backoff_delays(settings: GenesysSettings) -> list[float]:
    """The waits between attempts: initial, doubling, capped; one fewer than the attempts."""
    return [min(settings.retry_initial_seconds * 2 ** i, settings.retry_max_seconds)
            for i in range(settings.max_attempts - 1)]


def registration_lease_seconds(settings: GenesysSettings) -> float:
    """How long a claim to register a key lasts: every backoff wait, two timeouts per attempt, and a minute."""
    return sum(backoff_delays(settings)) + settings.max_attempts * 2 * settings.timeout_seconds + 60.0


async def register_key(settings: GenesysSettings, record: KeyRecord, *, on_attempt: Attempt | None = None) -> None:
    """Registers `record` with the platform, retrying what may pass; raises the last RegistrationError."""
    delays = backoff_delays(settings)
    async with aiohttp.ClientSession() as session:
        api = PlatformApi(settings, session)
        attempt = 0
        while True:
            attempt += 1
            try:
                await api.register(record)
            except RegistrationError as exc:
                log.warning("registering key %s with the platform failed (attempt %d of %d): %s", record.id,
                            attempt, settings.max_attempts, exc)
                if on_attempt is not None:
                    await on_attempt(attempt, exc)
                if not exc.retryable or attempt > len(delays):
                    raise
                await asyncio.sleep(delays[attempt - 1])
                continue
            if on_attempt is not None:
                await on_attempt(attempt, None)
            log.info("key %s registered with the platform (attempt %d)", record.id, attempt)
            return
