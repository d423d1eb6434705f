"""`lkm serve --dev` and `lkm demo` through the real CLI: the banner's examples run as printed, and the demo
follows the server's active key after a rotation and a disable, from any directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lkmcli import lkm_here

LKM_SCRIPT = Path(sys.executable).parent / "lkm"


@pytest.mark.slow
@pytest.mark.long(8)
def test_banner_names_the_running_lkm_and_demo_follows_the_active_key(tmp_path: Path) -> None:
    dev_dir = tmp_path / "lkm-dev"
    proc = subprocess.Popen([str(LKM_SCRIPT), "serve", "--dev", "--dev-dir", str(dev_dir), "--dev-port-base", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if " demo -c " in line:
                break
        config = str(dev_dir / "lkm.yaml")
        assert f"  {LKM_SCRIPT.resolve()} keys list -c {config}\n" in banner, "".join(banner)
        first = json.loads((dev_dir / "dev.json").read_text())["active_key"]
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        demo = subprocess.run([str(LKM_SCRIPT), "demo", "--dev-dir", str(dev_dir)], capture_output=True,
                              text=True, cwd=elsewhere, check=True, timeout=60)
        assert f"fetched public key of {first}" in demo.stdout and "recording decrypts: True" in demo.stdout

        rotated = json.loads(lkm_here("keys", "rotate", "--json", "-c", config).stdout)["id"]
        lkm_here("keys", "disable", first, "-c", config)
        # Each worker picks CLI changes up within limits.refresh_seconds (2 s in dev mode), each on its own
        # tick: the same demo, in-process, until it has seen the rotated key for longer than one refresh.
        deadline = time.monotonic() + 30
        seen_since: float | None = None
        while time.monotonic() < deadline:
            seen = lkm_here("-c", config, "demo", check=False, cwd=elsewhere)
            if f"fetched public key of {rotated}" not in seen.stdout:
                seen_since = None
            elif seen_since is None:
                seen_since = time.monotonic()
            elif time.monotonic() - seen_since > 3:
                break
            time.sleep(0.2)
        demo = subprocess.run([str(LKM_SCRIPT), "-c", config, "demo"], capture_output=True, text=True,
                              cwd=elsewhere, check=False, timeout=60)
        assert f"fetched public key of {rotated}" in demo.stdout, demo.stdout + demo.stderr
        assert demo.returncode == 0 and "recording decrypts: True" in demo.stdout, demo.stdout + demo.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
