"""`lkm completion bash|zsh`: shell completion generated from the argparse tree, so it never goes stale.

The script holds, for each command path ("", "keys", "keys list", ...), the words that may follow: its
sub-commands and options. zsh runs the same function through bashcompinit.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator
from typing import Any

from lkm.cli.common import AddCommand

SHELLS = ("bash", "zsh")
EMPTY = '""'  # the case label of the top level


def _words(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, list[str]]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options = [s for a in parser._actions for s in a.option_strings]
    children = list(subs[0].choices) if subs else []
    yield " ".join(path), [*children, *options]
    for name in children:
        yield from _words(subs[0].choices[name], (*path, name))


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    cases = "\n".join(f"        {shlex.quote(path) if path else EMPTY}) echo {shlex.quote(' '.join(words))} ;;"
                      for path, words in _words(parser))
    text = f"""# lkm {shell} completion, generated from lkm's parser: eval "$(lkm completion {shell})"
_lkm_words() {{
    case "$1" in
{cases}
    esac
}}
_lkm() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" word i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        case " $(_lkm_words "$path") " in
            *" $word "*) [[ $word == -* ]] || path="${{path:+$path }}$word" ;;
        esac
    done
    COMPREPLY=($(compgen -W "$(_lkm_words "$path")" -- "$cur"))
}}
complete -o default -F _lkm lkm
"""
    if shell == "zsh":
        text = "autoload -U +X bashcompinit && bashcompinit\n" + text
    return text


def add_commands(sub: Any, add: AddCommand, root: argparse.ArgumentParser) -> None:
    def run(args: argparse.Namespace) -> int:
        print(script(root, args.shell), end="")
        return 0

    p = add("completion", run, "print shell completion for bash or zsh: eval \"$(lkm completion bash)\"")
    p.add_argument("shell", choices=SHELLS)
