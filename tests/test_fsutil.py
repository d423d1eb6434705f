"""lkm.fsutil: what a writer killed before its rename leaves behind is removed, a live writer's file is not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lkm import fsutil


def test_orphaned_temps_go_and_live_ones_stay(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    orphan = tmp_path / f".hawk.json.tmp-{dead.stdout.strip()}-abcdef"
    live = tmp_path / f".hawk.json.tmp-{os.getppid()}-abcdef"  # our parent is alive
    old_style = tmp_path / ".key.json.tmp-0123456789ab"
    young_old_style = tmp_path / ".other.json.tmp-ba9876543210"
    keep = tmp_path / "key.json"
    for path in (orphan, live, old_style, young_old_style, keep):
        path.write_bytes(b"x")
    os.utime(old_style, (1, 1))
    assert fsutil.remove_orphaned_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, young_old_style.name, keep.name])


def test_a_write_leaves_no_temp(tmp_path: Path) -> None:
    fsutil.atomic_write(tmp_path / "f", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
