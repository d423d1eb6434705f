"""YAML configuration, validated once into frozen settings.

This package is the only code that reads the configuration file and secret files. Every error names the file,
the setting (as a dotted path) and what was expected; unknown settings are errors.

    settings.py   the frozen settings dataclasses and their closed vocabularies
    secrets.py    SecretRef: a secret named by where it lives, read when needed
    reader.py     Section: the typed reader over one mapping (each getter returns its declared type)
    sections.py   one parser per section of the file
    load.py       load_settings / settings_from_mapping: the file (or a parsed document) to Settings
"""

from __future__ import annotations

from lkm.config.load import load_settings, settings_from_mapping
from lkm.config.reader import Section, parse_duration
from lkm.config.secrets import SecretKind, SecretRef
from lkm.config.settings import (
    MIN_ROTATION_SECONDS,
    AuditSettings,
    ClientRule,
    GenesysSettings,
    HawkCredentialRef,
    HawkSettings,
    KeyStoreSettings,
    KeyStoreType,
    LimitsSettings,
    ListenSettings,
    LogFormat,
    LoggingSettings,
    LogLevel,
    NativeSettings,
    OpsSettings,
    PinWorkers,
    PlatformHttp,
    PlatformSettings,
    ReplayCheck,
    RotationSettings,
    RsaExecution,
    Settings,
    TLSSettings,
)

__all__ = [
    "MIN_ROTATION_SECONDS",
    "AuditSettings",
    "ClientRule",
    "GenesysSettings",
    "HawkCredentialRef",
    "HawkSettings",
    "KeyStoreSettings",
    "KeyStoreType",
    "LimitsSettings",
    "ListenSettings",
    "LogFormat",
    "LogLevel",
    "LoggingSettings",
    "NativeSettings",
    "OpsSettings",
    "PinWorkers",
    "PlatformHttp",
    "PlatformSettings",
    "ReplayCheck",
    "RotationSettings",
    "RsaExecution",
    "SecretKind",
    "SecretRef",
    "Section",
    "Settings",
    "TLSSettings",
    "load_settings",
    "parse_duration",
    "settings_from_mapping",
]
