"""Every command of the real CLI, walked from its argparse tree, on the ordinary mistakes of an operator.

Each mistake ends in one line on standard error that names the file, port or setting, exit status 1 or 2, and
never a traceback. A new command is covered by being in the tree: its arguments decide which mistakes apply.
Every `serve` case, and the first case of each other top-level command, runs the real `lkm` in a child process
(the entry point, as an operator meets it); the others run the same `lkm.cli.main` in this process, which
shows an escaped exception as a traceback just as the interpreter would.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lkm import devmode
from lkm.cli import build_parser
from lkm.config import load_settings
from tests.lkmcli import lkm, lkm_here

KEY_ID = "11111111-1111-4111-8111-111111111111"
PASSPHRASE = "a backup passphrase of some length"


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, (*path, name))


def dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def is_output(action: argparse.Action) -> bool:
    return action.metavar == "OUTPUT"


def input_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Arguments that name a file the command reads."""
    return [a for a in parser._actions if not is_output(a) and a.dest != "help"
            and (a.dest == "file" or a.dest.endswith("_file") or a.dest == "dev_json")]


@dataclass(frozen=True)
class Case:
    command: tuple[str, ...]
    mistake: str
    arg: str = ""  # the argument the mistake is made in, when it matters

    @property
    def id(self) -> str:
        return "-".join([*self.command, self.mistake, *([self.arg] if self.arg else [])])


CONFIG_FREE = {("completion",)}  # prints what the parser knows: reads no configuration, so no config mistake
# Read paths from the configuration and no secret: the audit trail, and (with the file store of these tests)
# the frozen-caller list beside the key store.
SECRET_FREE = {("audit", "verify"), ("freeze",), ("unfreeze",)}


def cases() -> list[Case]:
    found: list[Case] = []
    for command, parser in leaves(build_parser()):
        known = dests(parser)
        if "config" in known and command not in CONFIG_FREE:
            found.append(Case(command, "no-config"))
            if command not in SECRET_FREE:
                found.append(Case(command, "unreadable-secret"))
        found += [Case(command, "missing-input", a.dest) for a in input_actions(parser)]
        if any(is_output(a) for a in parser._actions):
            found.append(Case(command, "unwritable-output"))
        if "dev_json" in known:
            found.append(Case(command, "server-not-running"))
        if "dev_port_base" in known:
            found += [Case(command, "busy-port", "config"), Case(command, "busy-port", "dev")]
    return found


@dataclass
class World:
    root: Path
    config: Path
    bad_secret_config: Path
    busy_config: Path
    dev_json: Path
    closed_port: int
    busy_port: int
    input_file: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def busy() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, busy: socket.socket) -> World:
    root = tmp_path_factory.mktemp("mistakes")
    config = devmode.ensure_dev_environment(root / "lkm-dev", port_base=0)
    closed = free_port()
    dev_json = devmode.write_dev_json(load_settings(config), {n: f"https://localhost:{closed}"
                                                             for n in ("platform", "native", "ops")}, None)
    doc = yaml.safe_load(config.read_text())
    base = config.parent

    def absolute(d: dict[str, object]) -> dict[str, object]:
        return {k: (str(base / v) if isinstance(v, str) and k in ("path", "file", "cert_file", "key_file",
                                                                     "client_ca_file", "credentials_file")
                    else absolute(v) if isinstance(v, dict) else v) for k, v in d.items()}

    doc = absolute(doc)
    (root / "bad").mkdir()
    secret_dir = root / "bad" / "secret-dir"
    secret_dir.mkdir()  # a secret that cannot be read: a directory where the file should be
    bad = json.loads(json.dumps(doc))
    bad["keystore"]["passphrase"] = {"file": str(secret_dir)}
    bad["platform"]["hawk"]["credentials_file"] = str(secret_dir)
    bad["audit"]["path"] = str(secret_dir / "audit.log")
    bad_config = root / "bad" / "lkm.yaml"
    bad_config.write_text(yaml.safe_dump(bad))
    port = int(busy.getsockname()[1])
    doc["platform"]["listen"]["port"] = port
    (root / "busy").mkdir()
    busy_config = root / "busy" / "lkm.yaml"
    busy_config.write_text(yaml.safe_dump(doc))
    input_file = root / "input.txt"
    input_file.write_text("not a key\n")
    return World(root, config, bad_config, busy_config, dev_json, closed, port, input_file)


def argv_for(case: Case, parser: argparse.ArgumentParser, world: World) -> tuple[list[str], list[str]]:
    """(argv, the words the error line may name)."""
    argv = list(case.command)
    tokens: list[str] = []
    missing = str(world.root / "missing.pem")
    for action in parser._actions:
        if not action.required:
            continue
        flag = [action.option_strings[0]] if action.option_strings else []
        if action.dest == "id":
            argv += [*flag, KEY_ID]
        elif is_output(action):
            target = world.root / "no-such-dir" / "out" if case.mistake == "unwritable-output" else \
                world.root / f"out-{case.id}"
            argv += [*flag, str(target)]
        elif action.dest == "file":
            argv += [*flag, missing if case.arg == "file" else str(world.input_file)]
        elif action.dest == "to":  # keys migrate --to OTHER_CONFIG
            argv += [*flag, str(world.config)]
        elif action.dest == "shell":
            argv += [*flag, "bash"]
        elif action.required and action.dest != "help":
            raise AssertionError(f"{case.id}: no value for the required argument {action.dest}")
    action = dests(parser).get(case.arg)
    if case.mistake == "missing-input" and action is not None and not action.required:
        argv += [*action.option_strings[-1:], missing]
    if case.mistake == "missing-input":
        tokens.append(missing)
        if case.arg != "dev_json" and "dev_json" in dests(parser):
            tokens.append("dev.json")  # found before the other files
    if any(a.dest == "file" and a.required and not is_output(a) for a in parser._actions):
        tokens.append(str(world.input_file))  # a command may refuse its input before it reads the config
    if case.mistake == "no-config":
        tokens += ["LKM_CONFIG", "dev.json"]
    elif case.mistake == "unreadable-secret":
        argv += ["-c", str(world.bad_secret_config)]
        tokens += ["secret-dir", "keystore.passphrase", "credentials_file", str(world.bad_secret_config),
                   "dev.json"]
    elif case.mistake == "unwritable-output":
        tokens.append("no-such-dir")
    elif case.mistake == "server-not-running":
        argv += ["--dev-json", str(world.dev_json)]
        tokens.append(str(world.closed_port))
    elif case.mistake == "busy-port" and case.arg == "config":
        argv += ["-c", str(world.busy_config)]
        tokens.append(f"{world.busy_port}")
    elif case.mistake == "busy-port":
        argv += ["--dev", "--dev-dir", str(world.root / "dev-busy"), "--dev-port-base", str(world.busy_port)]
        tokens.append("--dev-port-base")
    if "config" in dests(parser) and case.mistake not in ("no-config", "unreadable-secret") and \
            case.arg != "config":
        argv += ["-c", str(world.config)]
    return argv, tokens


PARSERS = dict(leaves(build_parser()))
CASES = cases()


def in_a_process(case: Case, cases: list[Case]) -> bool:
    """`serve` (logging, signals, listeners) and the first case of every other top-level command."""
    return case.command[0] == "serve" or next(c for c in cases if c.command[0] == case.command[0]) == case


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_mistake_ends_in_one_line_that_names_it(case: Case, world: World) -> None:
    argv, tokens = argv_for(case, PARSERS[case.command], world)
    if in_a_process(case, CASES):
        env = {k: v for k, v in os.environ.items() if k != "LKM_CONFIG"}
        env["LKM_BACKUP_PASSPHRASE"] = PASSPHRASE
        result = subprocess.run([sys.executable, "-m", "lkm", *argv], capture_output=True, text=True, check=False,
                                timeout=120, env=env, cwd=world.root / "bad")
    else:
        result = lkm_here(*argv, check=False, env={"LKM_BACKUP_PASSPHRASE": PASSPHRASE}, drop_env=("LKM_CONFIG",),
                          cwd=world.root / "bad")
    shown = f"lkm {' '.join(argv)} -> {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, shown
    assert result.returncode in (1, 2), shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, shown
    assert any(t in lines[0] for t in tokens), shown


def test_every_command_has_its_mistakes_covered() -> None:
    covered = {c.command for c in cases()}
    assert covered == set(PARSERS) - CONFIG_FREE
    assert any(c.mistake == "busy-port" for c in cases()) and any(c.mistake == "server-not-running"
                                                                  for c in cases())
    in_processes = {c.command[0] for c in CASES if in_a_process(c, CASES)}
    assert in_processes == {command[0] for command in PARSERS} - {c[0] for c in CONFIG_FREE}


@pytest.mark.slow
def test_global_options_work_before_the_command(world: World) -> None:
    before = lkm("-c", str(world.config), "keys", "list")
    after = lkm_here("keys", "list", "-c", str(world.config))
    assert before.stdout == after.stdout and "active" in before.stdout
