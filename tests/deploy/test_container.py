"""deploy/container/Containerfile: the image's conventions, and its install steps."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.common import DEPLOY, ROOT


def test_containerfile() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", text, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^EXPOSE 8443 8444 9090$", text, re.M)
    assert "HEALTHCHECK" in text and "http://127.0.0.1:9090/healthz" in text
    assert 'ENTRYPOINT ["lkm"]' in text
    assert 'CMD ["serve", "-c", "/etc/lkm/lkm.yaml"]' in text


@pytest.mark.slow
@pytest.mark.long(6)
def test_containerfile_install_steps_in_a_fresh_venv(tmp_path: Path) -> None:
    """The image's build steps, run outside a container (no image registry can be reached to pull
    python:3.11-slim here): the same build context, `pip wheel` into a wheel directory, then an offline
    `pip install` from it into a new environment, whose `lkm` must run."""
    text = (DEPLOY / "container" / "Containerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+) (\S+)$", text, re.M)
    assert copies == [("pyproject.toml README.md", "./"), ("lkm", "./lkm")]
    assert 'pip wheel --wheel-dir /wheels "$target"' in text
    assert 'pip install --no-index --find-links=/wheels "$target"' in text
    context = tmp_path / "src"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(ROOT / "lkm", context / "lkm", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    env = {name: value for name, value in os.environ.items() if name not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # pip may reach the package index: the system's CAs
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=600, check=False, env=env)
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), "."], cwd=context)
    assert built.returncode == 0, built.stderr
    assert any(p.name.startswith("lkm-") for p in wheels.glob("*.whl"))
    venv = tmp_path / "venv"
    # Without a pip of its own (installing one costs seconds): this pip installs into it through --python.
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    installed = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                     "--no-index", f"--find-links={wheels}", "lkm"])
    assert installed.returncode == 0, installed.stderr
    version = run([str(venv / "bin" / "lkm"), "--version"], cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("lkm "), version.stdout + version.stderr
    where = run([str(venv / "bin" / "python"), "-c", "import lkm, sys; print(lkm.__file__)"], cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
