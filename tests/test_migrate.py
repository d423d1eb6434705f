"""Migration from the platform's sample: its exported keypair rows, in CSV or JSON, through the real CLI."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.keys import public_der_pkcs1
from tests.conftest import VECTORS, vector_key
from tests.lkmcli import lkm_here

V0, V1 = "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "8d6c1f0a-2b3e-4c5d-8e9f-0a1b2c3d4e5f"
SMALL, LOW_E, MISMATCH, JUNK = (f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 5))


def sample_b64(key: rsa.RSAPrivateKey) -> str:
    """How the sample stores a private key: base64 of DER PKCS#1 RSAPrivateKey."""
    return base64.b64encode(key.private_bytes(serialization.Encoding.DER,
                                              serialization.PrivateFormat.TraditionalOpenSSL,
                                              serialization.NoEncryption())).decode()


def public_b64(key: rsa.RSAPrivateKey) -> str:
    return base64.b64encode(public_der_pkcs1(key.public_key())).decode()


def vector(index: int) -> str:
    text: str = VECTORS["vectors"][index]["private_key_pkcs1_der_b64"]
    return text


def listing(config: str) -> dict[str, str]:
    return {k["id"]: k["state"] for k in json.loads(lkm_here("keys", "list", "--json", "-c", config).stdout)}


@pytest.mark.slow
def test_csv_export_of_the_sample_table(tmp_path: Path, config_factory: Any) -> None:
    config = str(config_factory())
    v0 = vector_key(0)
    rows = [
        (V0, vector(0), public_b64(v0), "2019-05-01 10:00:00"),
        (V1.upper(), vector(1), "", "2020-05-01 10:00:00"),
        (SMALL, sample_b64(rsa.generate_private_key(65537, 2048)), "", ""),
        (LOW_E, sample_b64(rsa.generate_private_key(3, 3072)), "", ""),
        (MISMATCH, vector(1), public_b64(v0), ""),
        (JUNK, "bm90IGEga2V5", "", ""),
        ("not-a-uuid", vector(0), "", ""),
    ]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "private_key", "public_key", "date_created"])  # the sample's `keypair` table
    writer.writerows(rows)
    export = tmp_path / "keypair.csv"
    export.write_text(out.getvalue())

    result = lkm_here("keys", "import-bulk", str(export), "--activate", V1, "-c", config, check=False)
    assert result.returncode == 1  # some rows were refused
    lines = result.stdout.splitlines()
    assert lines[0] == f"row 1 {V0}: imported: retired"
    assert lines[1] == f"row 2 {V1}: imported: active"
    assert lines[2] == f"row 3 {SMALL}: refused: key is RSA-2048; lkm accepts RSA-3072 only"
    assert lines[3] == f"row 4 {LOW_E}: refused: public exponent is 3; lkm accepts 65537 only"
    assert lines[4] == f"row 5 {MISMATCH}: refused: the public key does not match the private key"
    assert lines[5].startswith(f"row 6 {JUNK}: refused: not a readable private key")
    assert lines[6].startswith("row 7 not-a-uuid: refused: key id must be a UUID")
    assert lines[7] == "2 imported, 0 unchanged, 5 refused"
    assert listing(config) == {V0: "retired", V1: "active"}  # refused rows changed nothing

    audit = [json.loads(line) for line in (Path(config).parent / "audit" / "audit.log").read_text().splitlines()]
    imports = [(e["key_id"], e["outcome"]) for e in audit if e["action"] == "import_key" and e["outcome"] != "intent"]
    assert imports == [(V0, "ok"), (V1, "ok"), (SMALL, "error"), (LOW_E, "error"), (MISMATCH, "error"),
                       (JUNK, "error"), (None, "error")]


@pytest.mark.slow
def test_json_export_and_existing_ids(tmp_path: Path, config_factory: Any) -> None:
    config = str(config_factory())
    first = [{"id": V0, "privateKey": vector(0), "publicKey": public_b64(vector_key(0)),
              "dateCreated": 1556704800000}]
    export = tmp_path / "keypairs.json"
    export.write_text(json.dumps(first))
    assert "1 imported" in lkm_here("keys", "import-bulk", str(export), "-c", config).stdout
    again = [{"keypairId": V0, "privateKey": vector(0)},  # identical: fine, nothing changes
             {"keypairId": V1, "privateKey": vector(1)}]
    export.write_text(json.dumps(again))
    out = lkm_here("keys", "import-bulk", str(export), "-c", config).stdout
    assert f"row 1 {V0}: unchanged: identical key already present" in out
    assert "1 imported, 1 unchanged, 0 refused" in out
    clash = [{"id": V1, "private_key": vector(0)}]
    export.write_text(json.dumps(clash))
    refused = lkm_here("keys", "import-bulk", str(export), "-c", config, check=False)
    assert refused.returncode == 1 and "already exists with different key material" in refused.stdout
    assert listing(config) == {V0: "retired", V1: "retired"}
    export.write_text('{"keys": []}')
    unreadable = lkm_here("keys", "import-bulk", str(export), "-c", config, check=False)
    assert unreadable.returncode == 1 and "array of objects" in unreadable.stderr
