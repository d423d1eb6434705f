"""A typed reader over one mapping of the YAML file.

Each getter returns the type it promises (or the caller's default, when the setting is absent or null) and
raises a ConfigError naming the file, the dotted setting and what was expected. The section remembers what was
read so that `done()` can report leftovers: unknown settings are errors, never ignored.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar, overload

from lkm.config.secrets import CREDENTIALS_DIRECTORY, REFERENCE_FORMS, SecretKind, SecretRef, is_credential_name
from lkm.errors import ConfigError

D = TypeVar("D")
E = TypeVar("E", bound=enum.StrEnum)

_DURATION_RE = re.compile(r"^(\d+)\s*(s|m|h|d)$")


class _Missing(enum.Enum):
    """The default of a required setting (None cannot be it: None is a default several settings use)."""

    MISSING = enum.auto()


_MISSING = _Missing.MISSING


def parse_duration(text: str) -> int:
    """'90s', '15m', '6h', '30d' -> seconds."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class Section:
    """One mapping of the YAML file, read through typed getters."""

    def __init__(self, data: object, setting: str, source: str, base_dir: Path) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, setting or "(top level)", "a mapping of settings")
        self._data: dict[object, object] = data
        self.setting = setting
        self.source = source
        self.base_dir = base_dir
        self._read: set[object] = set()

    def name(self, key: str) -> str:
        return f"{self.setting}.{key}" if self.setting else key

    def error(self, key: str, expected: str) -> ConfigError:
        return ConfigError(self.source, self.name(key), expected)

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def keys_as_written(self) -> list[object]:
        """The keys as written (YAML allows non-string keys; the caller says what it expects)."""
        return list(self._data)

    def _absent(self, key: str) -> bool:
        self._read.add(key)
        return not self.has(key)

    def _default(self, key: str, default: D | _Missing) -> D:
        if isinstance(default, _Missing):
            raise self.error(key, "a value (it is required)")
        return default

    def raw(self, key: str) -> object:
        """The value as YAML gave it, for settings that accept several forms; required."""
        if self._absent(key):
            return self._default(key, _MISSING)
        return self._data[key]

    @overload
    def string(self, key: str) -> str: ...
    @overload
    def string(self, key: str, default: D) -> str | D: ...
    def string(self, key: str, default: D | _Missing = _MISSING) -> str | D:
        if self._absent(key):
            return self._default(key, default)
        value = self._data[key]
        if not isinstance(value, str) or not value:
            raise self.error(key, f"a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, kind: type[E], default: E | _Missing = _MISSING, *,
               booleans: tuple[E, E] | None = None) -> E:
        """A string from a closed vocabulary, as its enum member. `booleans` (for true, for false) also takes
        what YAML reads as a boolean: an unquoted `off` is false, and some settings were booleans once."""
        if self._absent(key):
            return self._default(key, default)
        if booleans is not None and isinstance(raw := self._data[key], bool):
            return booleans[0] if raw else booleans[1]
        value = self.string(key)
        try:
            return kind(value)
        except ValueError:
            raise self.error(key, f"one of {', '.join(kind)}, got {value!r}") from None

    def members(self, key: str, kind: type[E]) -> frozenset[E]:
        """A list of strings from a closed vocabulary (absent: none)."""
        values = self.items(key)
        known = {member.value: member for member in kind}
        chosen = set()
        for value in values:
            if not isinstance(value, str) or value not in known:
                raise self.error(key, f"{key} from {', '.join(kind)}, got {values!r}")
            chosen.add(known[value])
        return frozenset(chosen)

    @overload
    def integer(self, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int: ...
    @overload
    def integer(self, key: str, default: D, *, minimum: int | None = None, maximum: int | None = None) -> int | D: ...
    def integer(self, key: str, default: D | _Missing = _MISSING, *, minimum: int | None = None,
                maximum: int | None = None) -> int | D:
        if self._absent(key):
            return self._default(key, default)
        value = self._data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"an integer <= {maximum}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        if self._absent(key):
            return default
        value = self._data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"a number, got {value!r}")
        if value < minimum:
            raise self.error(key, f"a number >= {minimum}, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        if self._absent(key):
            return default
        value = self._data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"true or false, got {value!r}")
        return value

    def duration(self, key: str, default: int | _Missing = _MISSING, *, minimum: int = 0) -> int:
        """Whole seconds, written as a number or as 90s, 15m, 6h, 30d."""
        if self._absent(key):
            return self._default(key, default)
        value = self._data[key]
        try:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError(value)
            seconds = value if isinstance(value, int) else parse_duration(value)
        except ValueError:
            raise self.error(key, f"a duration such as 90s, 15m, 6h or 30d, got {value!r}") from None
        if seconds < minimum:
            raise self.error(key, f"a duration of at least {minimum} seconds, got {value!r}")
        return seconds

    def seconds(self, key: str, default: float, *, minimum: float) -> float:
        """A duration that may be below a second (timeouts, retry delays): 0.5, 10, '10s', '5m'."""
        value: object = default if self._absent(key) else self._data[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            try:
                seconds = float(parse_duration(str(value)))
            except ValueError:
                raise self.error(key, f"a number of seconds or a duration such as 10s or 5m, got {value!r}") from None
        if seconds < minimum:
            raise self.error(key, f"at least {minimum} seconds, got {value!r}")
        return seconds

    @overload
    def path(self, key: str) -> Path: ...
    @overload
    def path(self, key: str, default: D) -> Path | D: ...
    def path(self, key: str, default: D | _Missing = _MISSING) -> Path | D:
        """A path; a relative one is relative to the config file's folder, not to where lkm was started."""
        if self._absent(key):
            return self._default(key, default)
        path = Path(os.path.expanduser(self.string(key)))
        return path if path.is_absolute() else (self.base_dir / path)

    def existing_file(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise self.error(key, f"an existing file, but {path} does not exist")
        return path

    @overload
    def secret(self, key: str) -> SecretRef: ...
    @overload
    def secret(self, key: str, default: D) -> SecretRef | D: ...
    def secret(self, key: str, default: D | _Missing = _MISSING) -> SecretRef | D:
        if self._absent(key):
            return self._default(key, default)
        if isinstance(self._data[key], str):
            raise self.error(key, f"a reference {REFERENCE_FORMS}, not an inline secret")
        sub = self.section(key)
        kinds = [kind for kind in SecretKind if sub.has(kind)]
        if len(kinds) != 1:
            raise self.error(key, f"exactly one of {REFERENCE_FORMS}")
        kind = kinds[0]
        name = str(sub.path(kind)) if kind is SecretKind.FILE else sub.string(kind)
        if kind is SecretKind.CREDENTIAL and not is_credential_name(name):
            raise sub.error(kind, f"a credential name (a file name in ${CREDENTIALS_DIRECTORY}), got {name!r}")
        sub.done()
        return SecretRef(kind=kind, name=name, setting=self.name(key), source=self.source)

    def section(self, key: str, *, required: bool = False) -> Section:
        value: object = self.raw(key) if required else (None if self._absent(key) else self._data[key])
        return Section(value, self.name(key), self.source, self.base_dir)

    def items(self, key: str) -> list[object]:
        """A list (absent: empty)."""
        value: object = [] if self._absent(key) else self._data[key]
        if not isinstance(value, list):
            raise self.error(key, f"a list, got {value!r}")
        return value

    def entries(self, key: str) -> Iterator[Section]:
        """A list of mappings, each a section named `key[i]`; made one at a time, so errors come in order."""
        for i, item in enumerate(self.items(key)):
            yield Section(item, self.name(f"{key}[{i}]"), self.source, self.base_dir)

    def ignore_rest(self) -> None:
        self._read.update(self._data)

    def done(self) -> None:
        unknown = sorted((k for k in self._data if k not in self._read), key=str)
        if unknown:
            raise self.error(str(unknown[0]), "no such setting (unknown settings are not ignored; check spelling)")
