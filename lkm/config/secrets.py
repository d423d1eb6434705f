"""Secrets named in the configuration by where they live, never inline; read only when they are needed.

Reading late keeps secrets out of the settings (and out of any dump of them) and lets `lkm check-config`
report a missing one with the setting that names it.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lkm.errors import ConfigError


class SecretKind(enum.StrEnum):
    FILE = "file"  # {file: PATH}
    ENV = "env"  # {env: NAME}
    CREDENTIAL = "credential"  # {credential: NAME}: $CREDENTIALS_DIRECTORY/NAME (systemd LoadCredential=)


REFERENCE_FORMS = "{file: PATH}, {env: NAME} or {credential: NAME}"
CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"
_CREDENTIAL_NAME_RE = re.compile(r"^(?!\.\.?$)[^/\x00]+$")


def is_credential_name(name: str) -> bool:
    """A name systemd can pass: one file name inside the credentials directory, never a path out of it."""
    return bool(_CREDENTIAL_NAME_RE.match(name))


@dataclass(frozen=True)
class SecretRef:
    """Where one secret lives, and the file and setting that named it (for the error when it cannot be read)."""

    kind: SecretKind
    name: str
    setting: str
    source: str

    def read_bytes(self) -> bytes:
        if self.kind == SecretKind.ENV:
            value = os.environ.get(self.name)
            if value is None:
                raise ConfigError(self.source, self.setting, f"environment variable {self.name} to be set")
            return value.encode("utf-8")
        if self.kind == SecretKind.CREDENTIAL:
            # systemd sets the variable for the service's own process only, so it is looked up when read.
            directory = os.environ.get(CREDENTIALS_DIRECTORY)
            if not directory:
                raise ConfigError(self.source, self.setting,
                                  f"environment variable {CREDENTIALS_DIRECTORY} to be set (systemd sets it for "
                                  f"LoadCredential=) to read credential {self.name}")
            return self._read_file(Path(directory) / self.name, "a readable credential file")
        return self._read_file(Path(self.name), "a readable secret file")

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def _read_file(self, path: Path, what: str) -> bytes:
        """The file's bytes without the line end an editor adds (a secret never ends in one)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(self.source, self.setting, f"{what} at {path} ({exc.strerror})") from None
        return data.rstrip(b"\r\n")
