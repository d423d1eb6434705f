"""Every listener name and route path of lkm's HTTP side, so no handler or test spells one out again.

The platform's decrypt path is not here: it is a setting (`platform.path`), as the platform registers it.
"""

from __future__ import annotations

from enum import StrEnum


class ListenerName(StrEnum):
    """The three listeners; also the `listener` label of the HTTP metrics."""

    PLATFORM = "platform"
    NATIVE = "native"
    OPS = "ops"


class Route(StrEnum):
    """Route templates as aiohttp matches them; also the `route` label of the HTTP metrics."""

    # native listener: keys and unwrap
    KEYS = "/v1/keys"
    KEY = "/v1/keys/{id}"
    KEY_UNWRAP = "/v1/keys/{id}/unwrap"
    BATCH_UNWRAP = "/v1/unwrap"
    # native listener: administration
    ROTATE = "/v1/keys/rotate"
    ACTIVATE = "/v1/keys/{id}/activate"
    DISABLE = "/v1/keys/{id}/disable"
    ENABLE = "/v1/keys/{id}/enable"
    SCHEDULE_DESTRUCTION = "/v1/keys/{id}/schedule-destruction"
    CANCEL_DESTRUCTION = "/v1/keys/{id}/cancel-destruction"
    SAMPLE_KEYPAIRS = "/key-management/v1/keypair"
    SAMPLE_KEYPAIR = "/key-management/v1/keypair/{id}"
    # platform listener (besides the configured decrypt path)
    PLATFORM_HEALTH = "/key-management/v1/health"
    # ops listener
    HEALTHZ = "/healthz"
    READYZ = "/readyz"
    METRICS = "/metrics"
