"""`lkm completion`: valid shell, generated from the parser, completing commands and options."""

from __future__ import annotations

import subprocess

import pytest

from tests.lkmcli import lkm, lkm_here


def complete(script: str, *words: str) -> list[str]:
    array = " ".join(f"'{w}'" for w in words)
    probe = f'{script}\nCOMP_WORDS=(lkm {array}); COMP_CWORD={len(words)}; _lkm; printf "%s\\n" "${{COMPREPLY[@]}}"'
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.split()


@pytest.mark.slow
@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_script_is_valid_bash(shell: str) -> None:
    script = (lkm if shell == "bash" else lkm_here)("completion", shell).stdout  # one child process
    subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=30)


def test_commands_and_options_complete() -> None:
    script = lkm_here("completion", "bash").stdout
    assert complete(script, "ke") == ["keys"]
    assert complete(script, "-c", "my.yaml", "keys", "im") == ["import", "import-bulk"]
    assert complete(script, "keys", "list", "--j") == ["--json"]
    assert "completion" in complete(script, "")
