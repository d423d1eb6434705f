"""Fixtures of the key-store tests: the throwaway PostgreSQL cluster (tests/pg.py)."""

from __future__ import annotations

from tests.pg import pg_cluster, pg_dsn  # noqa: F401 - fixtures
