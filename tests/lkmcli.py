"""The real `lkm` command line in a child process, as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys

LKM = [sys.executable, "-m", "lkm"]


def lkm(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*LKM, *args], capture_output=True, text=True, check=False, timeout=120,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"lkm {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
