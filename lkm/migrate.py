"""Bulk import of keypairs exported from the platform's sample LKM, so every old recording stays readable.

The sample keeps its keys in a database table `keypair` with the columns `id`, `private_key` (base64 DER
PKCS#1), `public_key` (base64 DER PKCS#1) and `date_created`; its JSON uses `id`, `privateKey`, `publicKey`,
`dateCreated`. An export of either kind is accepted: CSV with a header row, or a JSON array of objects. The id
and private key are required; a public key, when present, must match the private one (a row whose halves
disagree was damaged in transit). Other columns are ignored.

Each row stands alone: a refused row changes nothing and does not stop the others. Keys come in as `retired`
(they unwrap, the platform's current key is registered already, and lkm's own next key becomes active by a
rotation) unless the operator names one to make active.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lkm import lifecycle
from lkm.errors import ExportUnreadable as ExportUnreadable  # noqa: PLC0414 - re-exported for callers
from lkm.errors import LkmError
from lkm.keys import KeyState, load_private_key_any, parse_key_id, public_der_pkcs1
from lkm.keystore import KeyStore

ID_COLUMNS = ("id", "keypairId", "keypair_id")
PRIVATE_COLUMNS = ("private_key", "privateKey")
PUBLIC_COLUMNS = ("public_key", "publicKey")
IMPORT_LABEL = "imported"  # the label every bulk-imported key gets


@dataclass(frozen=True)
class Row:
    number: int  # 1-based data row (CSV: the header is not counted) for the operator's report
    key_id: str | None
    private_key: str | None
    public_key: str | None


@dataclass(frozen=True)
class RowResult:
    row: Row
    key_id: str | None
    outcome: str  # "imported" | "unchanged" | "refused"
    reason: str = ""

    def line(self) -> str:
        who = self.key_id or self.row.key_id or "(no id)"
        return f"row {self.row.number} {who}: {self.outcome}" + (f": {self.reason}" if self.reason else "")


def _pick(data: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = data.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def read_rows(data: bytes, fmt: str = "auto") -> list[Row]:
    text = data.decode("utf-8-sig", errors="strict")
    if fmt == "auto":
        fmt = "json" if text.lstrip().startswith(("[", "{")) else "csv"
    items: list[dict[str, Any]]
    if fmt == "json":
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ExportUnreadable(f"not valid JSON ({exc})") from None
        if not isinstance(parsed, list) or not all(isinstance(item, dict) for item in parsed):
            raise ExportUnreadable("the JSON must be an array of objects with id and private key")
        items = parsed
    else:
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        if not any(c in header for c in ID_COLUMNS) or not any(c in header for c in PRIVATE_COLUMNS):
            raise ExportUnreadable(f"the CSV header must name an id column ({' or '.join(ID_COLUMNS)}) and a "
                                   f"private key column ({' or '.join(PRIVATE_COLUMNS)}); found {header}")
        items = list(reader)
    if not items:
        raise ExportUnreadable("the export holds no rows")
    return [Row(i, _pick(item, ID_COLUMNS), _pick(item, PRIVATE_COLUMNS), _pick(item, PUBLIC_COLUMNS))
            for i, item in enumerate(items, start=1)]


def import_rows(store: KeyStore, rows: list[Row], *, state: KeyState = KeyState.RETIRED,
                activate: str | None = None,
                audit: Callable[[RowResult, dict[str, Any]], None] | None = None,
                before: Callable[[Row, str], None] | None = None) -> list[RowResult]:
    """Imports each row on its own; `before(row, key_id)` is called just before a row's key goes into the store
    (to announce it durably), `audit` once per row with its result and audit details."""
    wanted_active = parse_key_id(activate) if activate else None
    results = []
    for row in rows:
        details: dict[str, Any] = {"row": row.number}
        result = _import_row(store, row, state, wanted_active, details=details, before=before)
        if audit is not None:
            audit(result, details)
        results.append(result)
    return results


def _import_row(store: KeyStore, row: Row, state: KeyState, wanted_active: str | None, *,
                details: dict[str, Any], before: Callable[[Row, str], None] | None = None) -> RowResult:
    try:
        if row.key_id is None:
            return RowResult(row, None, "refused", "no id")
        key_id = parse_key_id(row.key_id)
    except LkmError as exc:
        return RowResult(row, None, "refused", exc.message)
    if row.private_key is None:
        return RowResult(row, key_id, "refused", "no private key")
    try:
        private_key = load_private_key_any(row.private_key.encode())
        if row.public_key is not None:
            try:
                given = base64.b64decode("".join(row.public_key.split()), validate=True)
            except (binascii.Error, ValueError):
                return RowResult(row, key_id, "refused", "the public key column is not base64")
            if given != public_der_pkcs1(private_key.public_key()):
                return RowResult(row, key_id, "refused", "the public key does not match the private key")
        row_state = KeyState.ACTIVE if key_id == wanted_active else state
        facts = lifecycle.ChangeFacts()
        if before is not None:
            before(row, key_id)
        try:
            _, created = lifecycle.import_key(store, key_id, private_key, state=row_state, label=IMPORT_LABEL,
                                                facts=facts)
        finally:
            details.update(facts.audit_details())
    except LkmError as exc:
        details["error_code"] = exc.code
        return RowResult(row, key_id, "refused", exc.message)
    if not created:
        return RowResult(row, key_id, "unchanged", "identical key already present")
    return RowResult(row, key_id, "imported", row_state.value)
