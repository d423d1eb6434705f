"""Hawk credentials at rest: the file `lkm hawk` writes, and the source the verifier reloads."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from lkm.hawk import HawkCredential, HawkVerifier
from lkm.hawk_credentials import CredentialSource, load_credentials_file, mint_credential, revoke_credential
from tests.test_hawk import TS, reason_of, signed, verify


def test_mint_load_revoke_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "hawk.json"
    assert load_credentials_file(path) == {}
    first = mint_credential(path, "platform-1")
    assert first.id == "platform-1"
    assert first.algorithm == "sha256"
    assert len(first.key) == 43
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = mint_credential(path, "platform.2_b")
    assert first.key != second.key
    assert load_credentials_file(path) == {"platform-1": first, "platform.2_b": second}

    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert [c["id"] for c in document["credentials"]] == ["platform-1", "platform.2_b"]
    assert document["credentials"][0]["key"] == first.key
    assert document["credentials"][0]["algorithm"] == "sha256"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", document["credentials"][0]["created"])

    with pytest.raises(ValueError, match="already exists"):
        mint_credential(path, "platform-1")
    for bad_id in ("", "x" * 65, "has space", "sl/ash", 'q"uote'):
        with pytest.raises(ValueError):
            mint_credential(path, bad_id)
    assert load_credentials_file(path) == {"platform-1": first, "platform.2_b": second}

    assert revoke_credential(path, "platform-1") is True
    assert revoke_credential(path, "platform-1") is False
    assert revoke_credential(tmp_path / "absent.json", "platform-1") is False
    assert load_credentials_file(path) == {"platform.2_b": second}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    created = json.loads(path.read_text())["credentials"][0]["created"]
    assert created == document["credentials"][1]["created"]


@pytest.mark.parametrize("content", [
    "not json",
    "[]",
    '{"version": 2, "credentials": []}',
    '{"version": 1}',
    '{"version": 1, "credentials": [1]}',
    '{"version": 1, "credentials": [{"id": "a b", "key": "k"}]}',
    '{"version": 1, "credentials": [{"id": "a", "key": ""}]}',
    '{"version": 1, "credentials": [{"id": "a", "key": "k", "algorithm": "sha1"}]}',
    '{"version": 1, "credentials": [{"id": "a", "key": "k"}, {"id": "a", "key": "j"}]}',
])
def test_load_malformed_names_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "hawk.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_credentials_file(path)


def test_credential_source_reloads(tmp_path: Path) -> None:
    path = tmp_path / "hawk.json"
    inline = HawkCredential("inline", "inline-key")
    source = CredentialSource(path, {"inline": inline})
    assert source.get("inline") is inline
    assert source.ids() == ["inline"]
    assert source.reload_if_changed() is False

    minted = mint_credential(path, "platform")
    assert source.get("platform") is None
    assert source.reload_if_changed() is True
    assert source.get("platform") == minted
    assert source.reload_if_changed() is False

    rotated = mint_credential(path, "platform-next")
    assert source.reload_if_changed() is True
    v = HawkVerifier(source.get, skew_seconds=300, replay_check=True, nonce_cache_size=100, clock=lambda: TS)
    assert verify(v, signed(minted, nonce="a")) == minted
    assert verify(v, signed(rotated, nonce="b")) == rotated
    assert verify(v, signed(inline, nonce="c")) is inline

    revoke_credential(path, "platform")
    assert source.reload_if_changed() is True
    assert source.get("platform") is None
    assert reason_of(v, signed(minted, nonce="d")) == "unknown_id"


def test_credential_source_keeps_old_set_on_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "hawk.json"
    minted = mint_credential(path, "platform")
    source = CredentialSource(path)
    assert source.get("platform") == minted
    path.write_text("{broken")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        source.reload_if_changed()
    assert source.get("platform") == minted
    assert source.reload_if_changed() is False  # the same bad file is not re-read on every tick
    clash_path = tmp_path / "clash.json"
    mint_credential(clash_path, "platform")
    with pytest.raises(ValueError, match="also configured inline"):
        CredentialSource(clash_path, {"platform": minted})
    assert CredentialSource(None, {"platform": minted}).reload_if_changed() is False


def test_a_reload_keeps_the_credentials_from_the_database(tmp_path: Path) -> None:
    """A SIGHUP reload re-reads the inline credentials and the file; the database's, which only change by
    notification, must stay, with or without a credentials file."""
    shared = HawkCredential("platform-db", "k" * 43)
    inline = HawkCredential("platform-inline", "i" * 43)
    for path in (None, tmp_path / "missing.json"):
        source = CredentialSource(path)
        assert source.set_shared({shared.id: shared})
        source.replace_inline({inline.id: inline})
        assert source.get(shared.id) == shared and source.get(inline.id) == inline
        assert source.reload_if_changed() is False  # nothing to read again: the set stays whole
        assert source.ids() == sorted([shared.id, inline.id])
