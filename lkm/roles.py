"""What a native API client may do; a leaf module so domain code names roles without reading configuration."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    READ = "read"
    UNWRAP = "unwrap"
    ADMIN = "admin"
