"""deploy/container/Containerfile: the image's conventions, and its install steps."""

from __future__ import annotations

import re

from tests.deploy.common import DEPLOY


def test_containerfile() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", text, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^EXPOSE 8443 8444 9090$", text, re.M)
    assert "HEALTHCHECK" in text and "http://127.0.0.1:9090/healthz" in text
    assert 'ENTRYPOINT ["lkm"]' in text
    assert 'CMD ["serve", "-c", "/etc/lkm/lkm.yaml"]' in text
