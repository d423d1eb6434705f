"""The tamper-evident audit trail: one hash-chained JSON line per decision.

Why a chain: an auditor must be able to tell whether records were edited, removed, inserted or reordered
after the fact. The package, one job per module:

    record.py    the record format: actions, outcomes, forbidden and reserved fields, sealing a record
    files.py     the chain's files: rotated names, rotation, reading the last line
    appender.py  the durable append under the host-wide lock, with the head cache and torn-tail repair
    log.py       AuditLog: group commit for the server, record_sync for the CLI
    verify.py    verification of a chain across its files
"""

from __future__ import annotations

from lkm.audit.files import chain_files, rotated_files
from lkm.audit.log import AuditLog
from lkm.audit.record import (
    FIRST_SEQ,
    FORBIDDEN_FIELDS,
    GENESIS_PREV,
    INTENT_FIELD,
    RESERVED_FIELDS,
    AuditAction,
    AuditOutcome,
    local_actor,
    utc_timestamp,
)
from lkm.audit.verify import UnfinishedIntent, VerifyResult, verify, verify_chain_files
from lkm.errors import AuditWriteError

__all__ = [
    "FIRST_SEQ",
    "FORBIDDEN_FIELDS",
    "GENESIS_PREV",
    "INTENT_FIELD",
    "RESERVED_FIELDS",
    "AuditAction",
    "AuditLog",
    "AuditOutcome",
    "AuditWriteError",
    "UnfinishedIntent",
    "VerifyResult",
    "chain_files",
    "local_actor",
    "rotated_files",
    "utc_timestamp",
    "verify",
    "verify_chain_files",
]
