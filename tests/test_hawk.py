from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Any

import pytest

from lkm import hawk
from lkm.errors import HawkError
from lkm.hawk import (
    HawkCredential,
    HawkVerifier,
    calculate_mac,
    normalized_string,
    parse_authorization,
    payload_hash,
    sign_request,
    timestamp_mac,
)

# The contract's vectors (Hawk spec).
CRED = HawkCredential("123456", "2983d45yun89q")
TS = 1353809207
NONCE = "Ygvqdz"
RESOURCE = "/somewhere/over/the/rainbow"
BODY = b"something to write about"
HASH = "2QfCt3GuY9HQnHWyWD3wX68ZOKbynqlfYmuO2ZBRqtY="
MAC_EXT = "q1CwFoSHzPZSkbIvl0oYlD+91rBUEvFk763nMjMndj8="
MAC_NO_EXT = "HTgtd0jPI6E4izx8e4OHdO36q00xFCU0FolNq3RiCYs="
VECTOR_HEADER = (f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", hash="{HASH}", ext="Bazinga!", '
                 f'mac="{MAC_EXT}"')
OTHER = HawkCredential("second", "another-shared-key")


def make_verifier(*creds: HawkCredential, now: float = TS + 10, skew: int = 300, replay: bool = True,
                  cache: int = 1000) -> HawkVerifier:
    table = {c.id: c for c in (creds or (CRED,))}
    return HawkVerifier(table.get, skew_seconds=skew, replay_check=replay, nonce_cache_size=cache,
                        clock=lambda: now)


def verify(v: HawkVerifier, authorization: str | None, **overrides: Any) -> HawkCredential:
    args: dict[str, Any] = {
        "method": "POST", "path": RESOURCE, "query": "", "host_header": "example.net", "public_host": None,
        "public_port": None, "default_port": 443, "authorization": authorization,
        "content_type": "text/plain", "body": BODY,
    }
    args.update(overrides)
    return v.verify(**args)


def signed(cred: HawkCredential = CRED, **overrides: Any) -> str:
    args: dict[str, Any] = {"method": "POST", "resource": RESOURCE, "host": "example.net", "port": 443,
                            "content_type": "text/plain", "body": BODY, "ts": TS}
    args.update(overrides)
    return sign_request(cred, **args)


def reason_of(v: HawkVerifier, authorization: str | None, **overrides: Any) -> str:
    with pytest.raises(HawkError) as info:
        verify(v, authorization, **overrides)
    return info.value.reason


# --- wire format vectors ------------------------------------------------------------------------------------

def test_payload_hash_vector() -> None:
    assert payload_hash("text/plain", BODY) == HASH
    assert payload_hash(" Text/Plain ; charset=utf-8", BODY) == HASH
    expected_empty = base64.b64encode(hashlib.sha256(b"hawk.1.payload\n\n\n").digest()).decode()
    assert payload_hash(None, b"") == expected_empty


def test_normalized_string_exact() -> None:
    text = normalized_string(TS, NONCE, "post", RESOURCE, "Example.NET", 443, HASH, "Bazinga!")
    assert text == (f"hawk.1.header\n{TS}\n{NONCE}\nPOST\n{RESOURCE}\nexample.net\n443\n{HASH}\nBazinga!\n")
    bare = normalized_string("1", "n", "GET", "/", "h", "80", None, None)
    assert bare == "hawk.1.header\n1\nn\nGET\n/\nh\n80\n\n\n"
    escaped = normalized_string("1", "n", "GET", "/", "h", 80, None, "a\\b\nc", app="ap", dlg=None)
    assert escaped == "hawk.1.header\n1\nn\nGET\n/\nh\n80\n\na\\\\b\\nc\nap\n\n"
    with_dlg = normalized_string("1", "n", "GET", "/", "h", 80, "x", "e", app="ap", dlg="dl")
    assert with_dlg.endswith("\nx\ne\nap\ndl\n")


@pytest.mark.parametrize(("ext", "mac"), [("Bazinga!", MAC_EXT), (None, MAC_NO_EXT)])
def test_mac_vectors(ext: str | None, mac: str) -> None:
    normalized = normalized_string(TS, NONCE, "POST", RESOURCE, "example.net", 443, HASH, ext)
    assert calculate_mac(CRED.key, normalized) == mac


def test_sign_request_vector() -> None:
    assert signed(nonce=NONCE, ext="Bazinga!") == VECTOR_HEADER
    no_hash = signed(nonce=NONCE, body=None)
    assert "hash=" not in no_hash
    assert no_hash.startswith(f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", mac="')
    assert "hash=" not in signed(nonce=NONCE, include_hash=False)
    with pytest.raises(ValueError, match="ext"):
        signed(ext='say "hi"')


def test_parse_authorization_accepts_whitespace() -> None:
    value = f' hawk   id="123456" ,ts="{TS}",\t nonce = "{NONCE}" ,  mac="{MAC_NO_EXT}", ext=""  '
    assert parse_authorization(value) == {"id": "123456", "ts": str(TS), "nonce": NONCE, "mac": MAC_NO_EXT,
                                          "ext": ""}


@pytest.mark.parametrize("value", [
    VECTOR_HEADER,
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", hash="{HASH}", mac="{MAC_NO_EXT}"',
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", ext="", mac="{MAC_NO_EXT}"',
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", mac="{MAC_NO_EXT}"',
    f'Hawk id="a b", ts="x", nonce="{NONCE}", mac="{MAC_NO_EXT}"',  # checked later, as in any other form
])
def test_the_platform_form_parses_as_any_form_would(value: str) -> None:
    assert parse_authorization(value) == hawk._parse_any_form(value)
    assert parse_authorization(value.replace(", ", ",  ")) == hawk._parse_any_form(value)  # the general way


@pytest.mark.parametrize(("value", "message"), [
    (f'Hawk id="1", ts="{TS}", nonce="n", mac="m", mac="m"', "Duplicate attribute: mac"),
    (f'Hawk id="1", ts="{TS}", nonce="n", hash="", mac="m"', "Bad attribute value: hash"),
    (f'Hawk id="1", ts="{TS}", nonce="n", app="a", mac="m"', None),  # another order: the general parser
    (f'Hawk id="1", ts="{TS}", mac="m"', "Missing attributes: nonce"),
    (f'Hawk id="1", ts="{TS}", nonce="n\\", mac="m"', "Bad header format"),
])
def test_near_platform_forms_get_the_general_answer(value: str, message: str | None) -> None:
    if message is None:
        assert parse_authorization(value) == hawk._parse_any_form(value)
        return
    with pytest.raises(HawkError, match=re.escape(message)):
        parse_authorization(value)


# --- verification -------------------------------------------------------------------------------------------

def test_verifies_contract_vectors() -> None:
    assert verify(make_verifier(), VECTOR_HEADER) is CRED
    without_ext = f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", hash="{HASH}", mac="{MAC_NO_EXT}"'
    assert verify(make_verifier(), without_ext) is CRED


def test_unknown_id_indistinguishable_and_still_computes_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    header = signed(HawkCredential("nobody", CRED.key))
    calls: list[str] = []
    v = make_verifier()
    real = hawk._keyed_mac

    def counting(key: str, normalized: str) -> bytes:
        calls.append(key)
        return real(key, normalized)

    monkeypatch.setattr(hawk, "_keyed_mac", counting)
    with pytest.raises(HawkError) as unknown:
        verify(v, header, query="a=1")
    assert unknown.value.reason == "unknown_id"
    assert len(calls) == 2  # both resource candidates, with a dummy key
    assert CRED.key not in calls
    with pytest.raises(HawkError) as bad:
        verify(v, signed(HawkCredential(CRED.id, "wrong-key")))
    assert bad.value.reason == "bad_mac"
    assert str(unknown.value) == str(bad.value) == "Invalid credentials or mac"
    assert unknown.value.www_authenticate == 'Hawk error="Invalid credentials or mac"'
    assert bad.value.www_authenticate == unknown.value.www_authenticate


@pytest.mark.parametrize("override", [
    {"method": "PUT"}, {"path": "/somewhere/else"}, {"host_header": "example.org"},
    {"host_header": "example.net:80"},
])
def test_bad_mac_when_request_differs(override: dict[str, Any]) -> None:
    assert reason_of(make_verifier(), signed(), **override) == "bad_mac"


def test_tampered_mac_attribute() -> None:
    header = VECTOR_HEADER.replace(MAC_EXT, MAC_NO_EXT)
    assert reason_of(make_verifier(), header) == "bad_mac"


def test_tampered_body_with_hash() -> None:
    v = make_verifier()
    with pytest.raises(HawkError) as info:
        verify(v, signed(), body=b"something to write about!")
    assert info.value.reason == "bad_hash"
    assert info.value.www_authenticate == 'Hawk error="Bad payload hash"'
    assert reason_of(v, signed(nonce="n2"), content_type="application/json") == "bad_hash"


def test_no_hash_attribute_accepts_any_body() -> None:
    assert verify(make_verifier(), signed(body=None), body=b"anything") is CRED


def test_stale_timestamp_with_verifiable_tsm() -> None:
    now = TS + 301
    v = make_verifier(now=now + 0.7)
    with pytest.raises(HawkError) as info:
        verify(v, signed())
    assert info.value.reason == "stale_timestamp"
    www = info.value.www_authenticate
    assert www is not None
    match = re.fullmatch(r'Hawk ts="(\d+)", tsm="([^"]+)", error="Stale timestamp"', www)
    assert match is not None
    assert int(match.group(1)) == now
    expected = base64.b64encode(hmac.new(CRED.key.encode(), f"hawk.1.ts\n{now}\n".encode(),
                                         hashlib.sha256).digest()).decode()
    assert match.group(2) == expected == timestamp_mac(CRED.key, now)
    assert reason_of(make_verifier(now=TS - 301), signed()) == "stale_timestamp"
    assert verify(make_verifier(now=TS + 300), signed()) is CRED
    assert verify(make_verifier(now=TS - 300), signed()) is CRED


def test_mac_checked_before_timestamp() -> None:
    v = make_verifier(now=TS + 10_000)
    assert reason_of(v, signed(HawkCredential(CRED.id, "wrong"))) == "bad_mac"


def test_replay_detected_and_only_after_valid_mac() -> None:
    v = make_verifier()
    header = signed(nonce="once")
    assert verify(v, header) is CRED
    assert reason_of(v, header) == "replay"
    assert verify(v, signed(nonce="twice")) is CRED
    # A forged request must not burn the nonce of a genuine one.
    assert reason_of(v, signed(HawkCredential(CRED.id, "wrong"), nonce="later")) == "bad_mac"
    assert verify(v, signed(nonce="later")) is CRED
    no_check = make_verifier(replay=False)
    assert verify(no_check, header) is CRED
    assert verify(no_check, header) is CRED


def test_replay_is_per_credential() -> None:
    v = make_verifier(CRED, OTHER)
    assert verify(v, signed(CRED, nonce="same")) is CRED
    assert verify(v, signed(OTHER, nonce="same")) is OTHER


@pytest.mark.parametrize("header", [
    f'Basic {base64.b64encode(b"a:b").decode()}',
    f'id="123456", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}"',
    "Hawk",
    "Hawk   ",
    f'Hawk id="123456", id="123456", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}"',
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}", color="red"',
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}", ext="a\\"b"',
    f'Hawk id="12\u00e96", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}"',
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}"',
    f'Hawk id="123456", ts={TS}, nonce="{NONCE}", mac="{MAC_EXT}"',
    f'Hawk id="", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}"',
    f'Hawk id="123456" ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}"',
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}",',
    f'Hawk id="123456", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}" junk',
    f'Hawk id="123456", ts="{TS}.5", nonce="{NONCE}", mac="{MAC_EXT}"',
    f'Hawk id="123456", ts="-{TS}", nonce="{NONCE}", mac="{MAC_EXT}"',
    f'Hawk id="123456", ts="soon", nonce="{NONCE}", mac="{MAC_EXT}"',
    'Hawk id="' + "x" * 5000 + f'", ts="{TS}", nonce="{NONCE}", mac="{MAC_EXT}"',
])
def test_malformed_headers(header: str) -> None:
    with pytest.raises(HawkError) as info:
        verify(make_verifier(), header)
    assert info.value.reason == "malformed"
    assert info.value.www_authenticate is not None
    assert info.value.www_authenticate.startswith('Hawk error="')


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header(header: str | None) -> None:
    with pytest.raises(HawkError) as info:
        verify(make_verifier(), header)
    assert info.value.reason == "missing"
    assert info.value.www_authenticate == "Hawk"


def test_unsupported_algorithm() -> None:
    legacy = HawkCredential("legacy", "k", algorithm="sha1")
    assert reason_of(make_verifier(legacy), signed(legacy)) == "unsupported_algorithm"


def test_mac_over_path_or_path_and_query(monkeypatch: pytest.MonkeyPatch) -> None:
    v = make_verifier()
    query = "decryptType=pkcs1"
    assert verify(v, signed(nonce="a"), query=query) is CRED
    assert verify(v, signed(nonce="b", resource=f"{RESOURCE}?{query}"), query=query) is CRED
    assert reason_of(v, signed(nonce="c", resource=f"{RESOURCE}?decryptType=oaep"), query=query) == "bad_mac"
    assert reason_of(v, signed(nonce="d", resource=f"{RESOURCE}?{query}")) == "bad_mac"

    header = signed(nonce="e")
    calls: list[str] = []
    real = hawk._keyed_mac
    monkeypatch.setattr(hawk, "_keyed_mac", lambda k, n: calls.append(n) or real(k, n))
    assert verify(v, header, query=query) is CRED
    assert len(calls) == 2  # no early exit after the first candidate matched


def test_host_without_port_is_default_443() -> None:
    v = make_verifier()
    assert verify(v, signed(nonce="a"), host_header="example.net") is CRED
    assert verify(v, signed(nonce="b"), host_header="EXAMPLE.net:443") is CRED
    assert verify(v, signed(nonce="c", port=8443), host_header="example.net:8443") is CRED
    assert reason_of(v, signed(nonce="d", port=8443), host_header="example.net") == "bad_mac"
    assert verify(v, signed(nonce="e", host="[::1]", port=8443), host_header="[::1]:8443") is CRED
    assert verify(v, signed(nonce="f", host="[::1]"), host_header="[::1]") is CRED


@pytest.mark.parametrize("host_header", [None, "", "a:b", "example.net:99999", "[::1"])
def test_bad_or_missing_host_header(host_header: str | None) -> None:
    assert reason_of(make_verifier(), signed(), host_header=host_header) == "malformed"


def test_public_host_override() -> None:
    v = make_verifier()
    public = signed(nonce="a", host="lkm.example.com", port=443)
    assert verify(v, public, host_header="10.0.0.5:8080", public_host="lkm.example.com",
                  public_port=443) is CRED
    assert verify(v, signed(nonce="b", host="lkm.example.com", port=443), host_header=None,
                  public_host="lkm.example.com", public_port=443) is CRED
    internal = signed(nonce="c", host="10.0.0.5", port=8080)
    assert reason_of(v, internal, host_header="10.0.0.5:8080", public_host="lkm.example.com",
                     public_port=443) == "bad_mac"
    # Only the host overridden: the port still comes from the Host header.
    assert verify(v, signed(nonce="d", host="lkm.example.com", port=8080), host_header="10.0.0.5:8080",
                  public_host="lkm.example.com") is CRED


def test_two_live_credentials() -> None:
    v = make_verifier(CRED, OTHER)
    assert verify(v, signed(CRED, nonce="a")) is CRED
    assert verify(v, signed(OTHER, nonce="b")) is OTHER
    crossed = signed(HawkCredential(OTHER.id, CRED.key), nonce="c")
    assert reason_of(v, crossed) == "bad_mac"


def test_secrets_stay_out_of_repr_and_messages() -> None:
    assert CRED.key not in repr(CRED)
    assert repr(CRED) == "HawkCredential(id='123456', algorithm='sha256')"
    v = make_verifier(now=TS + 1000)
    with pytest.raises(HawkError) as info:
        verify(v, signed())
    assert CRED.key not in str(info.value)


def test_a_changed_key_is_used_at_once_and_remembered_keys_stay_few() -> None:
    table = {CRED.id: CRED}
    v = HawkVerifier(table.get, skew_seconds=300, replay_check=False, nonce_cache_size=10, clock=lambda: TS)
    assert verify(v, signed()) is CRED
    rotated = HawkCredential(CRED.id, "a-new-shared-key")
    table[CRED.id] = rotated
    assert reason_of(v, signed()) == "bad_mac"
    assert verify(v, signed(rotated)) is rotated
    for n in range(100):
        table[CRED.id] = HawkCredential(CRED.id, f"key-{n}")
        assert verify(v, signed(table[CRED.id])) is table[CRED.id]
    assert len(hawk._keyed_hmacs) <= hawk._MAC_CACHE_SIZE


def test_remembered_host_follows_the_settings_it_was_parsed_with() -> None:
    v = make_verifier(replay=False)
    assert verify(v, signed(), host_header="example.net") is CRED
    assert verify(v, signed(port=8443), host_header="example.net", default_port=8443) is CRED
    assert reason_of(v, signed(port=8443), host_header="example.net") == "bad_mac"
    assert verify(v, signed(host="public.example", port=9443), host_header="example.net",
                  public_host="public.example", public_port=9443) is CRED
    assert verify(v, signed(host="public.example"), host_header="example.net", public_host="public.example") is CRED
    for n in range(100):
        assert verify(v, signed(host=f"h{n}.example"), host_header=f"h{n}.example") is CRED
    assert len(v._hosts) <= hawk._HOST_CACHE_SIZE
    assert reason_of(v, signed(), host_header="a:b") == "malformed"
