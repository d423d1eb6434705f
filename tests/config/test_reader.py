"""lkm.config.reader: each getter returns its declared type or names the file, the setting and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from lkm.config import SecretKind, Section, parse_duration
from lkm.config.settings import LogLevel
from lkm.errors import ConfigError
from lkm.roles import Role

BASE = Path("/etc/lkm")


def section(**data: object) -> Section:
    return Section(data, "top", "lkm.yaml", BASE)


def refused(sec: Section, read: str, key: str, *args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        getattr(sec, read)(key, *args, **kwargs)
    assert (info.value.source, info.value.setting) == ("lkm.yaml", f"top.{key}")
    return info.value


def test_present_values_come_back_typed() -> None:
    sec = section(s="x", i=3, n=2, f=False, d="15m", t="10s", p="rel/file", level="error", roles=["read", "admin"])
    assert sec.string("s") == "x"
    assert sec.integer("i", minimum=3, maximum=3) == 3
    assert sec.number("n", 0.5) == 2.0 and isinstance(sec.number("n", 0.5), float)
    assert sec.flag("f", True) is False
    assert sec.duration("d") == 900
    assert sec.seconds("t", 1.0, minimum=0.1) == 10.0
    assert sec.path("p") == BASE / "rel" / "file"
    assert sec.choice("level", LogLevel) is LogLevel.ERROR
    assert sec.members("roles", Role) == frozenset({Role.READ, Role.ADMIN})
    sec.done()


def test_absent_and_null_settings_give_the_default() -> None:
    sec = section(nothing=None)
    assert sec.string("nothing", None) is None
    assert sec.integer("absent", 7) == 7
    assert sec.path("absent", None) is None
    assert sec.secret("absent", None) is None
    assert sec.choice("absent", LogLevel, LogLevel.INFO) is LogLevel.INFO
    assert sec.items("absent") == [] and sec.members("absent", Role) == frozenset()
    sec.done()


def test_a_required_setting_must_be_there() -> None:
    for read in ("string", "integer", "duration", "path", "secret", "raw"):
        assert refused(section(), read, "needed").expected == "a value (it is required)"


@pytest.mark.parametrize(("read", "value", "args", "expected"), [
    ("string", "", (), "a non-empty string, got ''"),
    ("string", 5, (), "a non-empty string, got 5"),
    ("integer", True, (), "an integer, got True"),
    ("number", "fast", (1.0,), "a number, got 'fast'"),
    ("flag", "yes", (False,), "true or false, got 'yes'"),
    ("duration", "a while", (), "a duration such as 90s, 15m, 6h or 30d, got 'a while'"),
    ("duration", True, (), "a duration such as 90s, 15m, 6h or 30d, got True"),
    ("seconds", [1], (1.0, 0.1), "a number of seconds or a duration such as 10s or 5m, got [1]"),
    ("choice", "loud", (LogLevel,), "one of debug, info, warning, error, got 'loud'"),
    ("members", ["read", 1], (Role,), "roles from read, unwrap, admin, got ['read', 1]"),
    ("items", "read", (), "a list, got 'read'"),
    ("secret", "inline", (), "a reference {file: PATH}, {env: NAME} or {credential: NAME}, not an inline secret"),
    ("secret", {}, (), "exactly one of {file: PATH}, {env: NAME} or {credential: NAME}"),
    ("secret", {"env": "A", "credential": "b"}, (), "exactly one of {file: PATH}, {env: NAME} or {credential: NAME}"),
])
def test_a_wrong_value_names_what_was_expected(read: str, value: object, args: tuple[object, ...],
                                                expected: str) -> None:
    key = "roles" if read == "members" else "k"
    sec = section(**{key: value})
    if read == "seconds":
        default, minimum = args
        assert refused(sec, read, key, default, minimum=minimum).expected == expected
    else:
        assert refused(sec, read, key, *args).expected == expected


def test_bounds_are_checked() -> None:
    sec = section(low=0, high=9, short="1s", little=0.01)
    with pytest.raises(ConfigError, match=r"an integer >= 1, got 0"):
        sec.integer("low", minimum=1)
    with pytest.raises(ConfigError, match=r"an integer <= 8, got 9"):
        sec.integer("high", maximum=8)
    with pytest.raises(ConfigError, match=r"a duration of at least 60 seconds, got '1s'"):
        sec.duration("short", minimum=60)
    with pytest.raises(ConfigError, match=r"at least 0.1 seconds, got 0.01"):
        sec.seconds("little", 1.0, minimum=0.1)


def test_existing_file_names_the_missing_path(tmp_path: Path) -> None:
    (tmp_path / "here").write_text("x")
    sec = Section({"here": "here", "gone": "gone"}, "tls", "lkm.yaml", tmp_path)
    assert sec.existing_file("here") == tmp_path / "here"
    with pytest.raises(ConfigError) as info:
        sec.existing_file("gone")
    assert (info.value.setting, info.value.expected) == ("tls.gone",
                                                         f"an existing file, but {tmp_path / 'gone'} does not exist")


def test_secrets_are_references_resolved_against_the_config_folder() -> None:
    sec = section(a={"file": "secrets/a"}, b={"env": "LKM_B"}, c={"credential": "keystore.pass"})
    a, b, c = sec.secret("a"), sec.secret("b"), sec.secret("c")
    assert (a.kind, a.name, a.setting, a.source) == (SecretKind.FILE, str(BASE / "secrets" / "a"), "top.a", "lkm.yaml")
    assert (b.kind, b.name) == (SecretKind.ENV, "LKM_B")
    assert (c.kind, c.name) == (SecretKind.CREDENTIAL, "keystore.pass")  # a name in the directory, not a path
    with pytest.raises(ConfigError) as info:
        section(c={"env": "X", "extra": 1}).secret("c")
    assert (info.value.setting, info.value.expected) == (
        "top.c.extra", "no such setting (unknown settings are not ignored; check spelling)")


def test_entries_are_sections_named_by_index() -> None:
    sec = section(list=[{"id": "a"}, "not a mapping"])
    entries = sec.entries("list")
    assert next(entries).string("id") == "a"
    with pytest.raises(ConfigError) as info:
        next(entries)
    assert (info.value.setting, info.value.expected) == ("top.list[1]", "a mapping of settings")


def test_unknown_settings_are_refused_first_in_order_and_ignore_rest_keeps_them() -> None:
    sec = section(known=1, zeta=2, alpha=3)
    sec.integer("known")
    with pytest.raises(ConfigError) as info:
        sec.done()
    assert info.value.setting == "top.alpha"
    sec.ignore_rest()
    sec.done()
    odd = Section({1: "a", "b": 2}, "", "lkm.yaml", BASE)
    with pytest.raises(ConfigError) as info:
        odd.done()
    assert info.value.setting == "1"


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("90s", "15m", " 6h", "30d", "2 h")] == [90, 900, 21600, 2592000, 7200]
    for bad in ("", "5", "5w", "-1h", "1.5h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize("name", ["../etc/shadow", "sub/name", "..", "."])
def test_a_credential_is_a_file_name_never_a_path(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        section(pin={"credential": name}).secret("pin")
    assert (info.value.source, info.value.setting) == ("lkm.yaml", "top.pin.credential")
    assert info.value.expected == f"a credential name (a file name in $CREDENTIALS_DIRECTORY), got {name!r}"
