"""Reading the configuration file into Settings: the one place that opens it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lkm.config import sections
from lkm.config.reader import Section
from lkm.config.settings import Settings
from lkm.errors import ConfigError

# libyaml's parser when PyYAML was built with it (the wheels are): the same safe schema and the same error marks,
# a tenth of the pure-Python parser's time (4 ms a config file), paid by every CLI command and server start.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_settings(path: str | os.PathLike[str]) -> Settings:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "(file)", f"a readable YAML file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, "(file)", f"valid YAML{where}") from None
    return settings_from_mapping(data, source=source, base_dir=Path(path).resolve().parent)


def settings_from_mapping(data: object, *, source: str, base_dir: Path) -> Settings:
    """Settings from an already parsed document (a ConfigMap's text, a test's dict); base_dir anchors paths."""
    top = Section(data, "", source, base_dir)
    keystore = sections.read_keystore(top.section("keystore", required=True))
    platform = sections.read_platform(top.section("platform", required=True), keystore)
    native = sections.read_native(top.section("native"))
    ops = sections.read_ops(top.section("ops"))
    audit = sections.read_audit(top.section("audit"))
    logging_settings = sections.read_logging(top.section("logging"))
    limits = sections.read_limits(top.section("limits"), keystore)
    rotation = sections.read_rotation(top.section("rotation")) if top.has("rotation") else None
    genesys = sections.read_genesys(top.section("genesys")) if top.has("genesys") else None
    top.done()
    return Settings(source=source, keystore=keystore, platform=platform, native=native, ops=ops,
                    audit=audit, logging=logging_settings, limits=limits, rotation=rotation,
                    genesys=genesys)
