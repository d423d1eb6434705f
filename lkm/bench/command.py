"""`lkm bench`: the command line of the benchmark (see `lkm bench --help` and the README's Performance section).

    lkm bench                       load a running server (targets from lkm-dev/dev.json, or --url etc.)
    lkm bench --raw                 the key store's private-key operation in process, no server
    lkm bench --compare             raw, then the server, then the server at 80% of its peak; prints server/raw
    lkm bench --compare --rounds 3  three rounds of raw and server in alternating slices; the ratio of the medians
    lkm bench --compare --floor     also the leanest Python endpoint that unwraps: what lkm's own work costs
    lkm bench startup --keys 5000   start-up time, memory per 1,000 keys, latency against the number of keys
    lkm bench suite                 everything above against servers it starts itself (the README's table)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lkm.bench.cpu import affinity
from lkm.bench.load import LoadPlan
from lkm.bench.measure import measure_in_slices, measure_raw, measure_server
from lkm.bench.options import DEFAULT_DEV_JSON
from lkm.bench.raw import pick_key, temporary_store
from lkm.bench.report import cpu_comparisons, median_by_efficiency, new_report, render_table
from lkm.bench.requests import (
    Target,
    fetch_public_key,
)
from lkm.errors import TargetError
from lkm.hawk import HawkCredential
from lkm.keystore import KeyStore

# --- targets -------------------------------------------------------------------------------------------------

def _read_public_key(path: str) -> bytes:
    """A public key file as DER PKCS#1: PEM, DER (SubjectPublicKeyInfo or PKCS#1), or the platform's base64."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    from lkm.keys import load_public_pkcs1, public_der_pkcs1  # noqa: PLC0415

    data = Path(path).read_bytes().strip()
    try:
        if data.startswith(b"-----BEGIN"):
            der = serialization.load_pem_public_key(data).public_bytes(serialization.Encoding.DER,
                                                                      serialization.PublicFormat.PKCS1)
        else:
            der = data if data[:1] == b"\x30" else base64.b64decode(data)
        return public_der_pkcs1(load_public_pkcs1(der))  # load_der_public_key reads SPKI and PKCS#1 alike
    except (ValueError, TypeError):
        raise TargetError(f"{path}: not an RSA public key (PEM, DER or base64 DER)") from None


def target_from_args(args: argparse.Namespace) -> Target:
    explicit = any((args.url, args.native_url, args.ca, args.cert, args.hawk_id))
    base = Target()
    dev_json = Path(args.dev_json or DEFAULT_DEV_JSON)
    if args.dev_json or not explicit:
        base = Target.from_dev_json(dev_json)
    hawk = base.hawk
    if args.hawk_id or args.hawk_key_file:
        if not (args.hawk_id and args.hawk_key_file):
            raise TargetError("pass both --hawk-id and --hawk-key-file")
        hawk = HawkCredential(args.hawk_id, Path(args.hawk_key_file).read_text().strip())
    route_url = args.url
    platform_url = route_url if route_url and args.route == "platform" else base.platform_url
    native_url = args.native_url or (route_url if route_url and args.route != "platform" else base.native_url)
    return Target(platform_url=platform_url, native_url=native_url, ca_file=args.ca or base.ca_file,
                  cert_file=args.cert or base.cert_file, key_file=args.key or base.key_file, hawk=hawk,
                  key_id=args.key_id or base.key_id,
                  public_key_der=_read_public_key(args.public_key) if args.public_key else None,
                  server_pid=args.server_pid or base.server_pid, config=base.config)


# --- raw -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def raw_store(args: argparse.Namespace, target: Target | None) -> Iterator[KeyStore]:
    """The store of `-c`, else the dev server's (same keys as the load run), else a temporary one."""
    from lkm.config import load_settings  # noqa: PLC0415
    from lkm.keystore.open import open_keystore  # noqa: PLC0415

    config = getattr(args, "config", None) or (target.config if target is not None else None)
    if config:
        with contextlib.closing(open_keystore(load_settings(config).keystore)) as store:
            yield store
    else:
        with temporary_store() as store:
            yield store


# --- the command ---------------------------------------------------------------------------------------------

def plan_from_args(args: argparse.Namespace, **changes: Any) -> LoadPlan:
    values: dict[str, Any] = {
        "concurrency": args.concurrency, "duration": None if args.requests else args.duration,
        "requests": args.requests, "warmup": args.warmup, "rate": args.rate,
        "new_connections": args.new_connections, "resume": args.resume, "verify_every": args.verify_every}
    values.update(changes)
    return LoadPlan(**values)


def _check_args(args: argparse.Namespace) -> None:
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.batch_size < 1:
        raise TargetError("--concurrency and --batch-size must be at least 1, --duration positive")
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1) or args.project_cores < 1:
        raise TargetError("--threads, --rounds and --project-cores must be at least 1")
    if args.route == "platform" and args.padding == "oaep-sha256":
        raise TargetError("the platform route knows oaep-sha1 and pkcs1 only; use --route native for oaep-sha256")
    if args.resume and not args.new_connections:
        raise TargetError("--resume goes with --new-connections")


def _raw_target(args: argparse.Namespace) -> Target:
    """No server involved: the dev server's facts if there are any (for its key store), else none."""
    if args.dev_json or Path(DEFAULT_DEV_JSON).exists():
        return target_from_args(args)
    return Target()


async def _load_and_compare(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.raw:
        target = _raw_target(args)
        with raw_store(args, target) as store:
            report["runs"].append(_measure_raw_for(store, args.key_id or target.key_id, args))
        return
    target = target_from_args(args)
    key = await fetch_public_key(target)
    plan = plan_from_args(args)
    if not args.compare:
        run = await measure_server(target, plan, route=args.route, padding=args.padding,
                                   batch_size=args.batch_size, key=key)
        report["runs"].append(run)
        if run.get("server_cpu_us_per_unwrap"):  # the server's CPU is known: set it against the raw operation's
            with raw_store(args, target) as store:
                raw = _measure_raw_for(store, key[0], args)
            report["runs"].append(raw)
            _add_cpu_comparison(report, [(raw, run)], args.project_cores)
        return
    # Raw and server alternate, in slices within each round, so that a neighbour's burst on a shared machine
    # falls on both sides of the ratio (lkm.bench.measure).
    rounds = args.rounds or 1
    raws: list[dict[str, Any]] = []
    peaks: list[dict[str, Any]] = []
    floors: list[float] = []
    with raw_store(args, target) as store, _floor_target(args, target) as floor:
        for round_ in range(1, rounds + 1):
            suffix = f"#{round_}" if rounds > 1 else ""
            raw, peak = await _raw_and_server(store, target, plan, key, args, suffix=suffix)
            report["runs"] += [raw, peak]
            raws.append(raw)
            peaks.append(peak)
            if floor is not None:
                floor_run = await measure_server(floor, plan, route="platform", padding=args.padding,
                                                 batch_size=1, key=key, name=f"floor{suffix}")
                report["runs"].append(floor_run)
                floors.append(floor_run["keys_per_s"])
    raw_rates = [r["keys_per_s"] for r in raws]
    raw_rate = statistics.median(raw_rates)
    peak_rate = statistics.median(p["keys_per_s"] for p in peaks)
    if not raw_rate:
        return
    ratios = [p["keys_per_s"] / r for p, r in zip(peaks, raw_rates, strict=True) if r]
    report["comparison"] = {"raw_keys_per_s": raw_rate, "server_keys_per_s": peak_rate,
                            "server_over_raw": round(peak_rate / raw_rate, 3), "rounds": rounds,
                            "round_ratios": [round(r, 3) for r in ratios]}
    if floors:
        floor_rate = statistics.median(floors)
        report["comparison"].update({"floor_keys_per_s": floor_rate,
                                     "floor_over_raw": round(floor_rate / raw_rate, 3),
                                     "server_over_floor": round(peak_rate / floor_rate, 3) if floor_rate else None})
        report["notes"] = [*report.get("notes", []),
                           f"floor/raw = {floor_rate:.0f}/{raw_rate:.0f} = {floor_rate / raw_rate:.2f}: the leanest "
                           f"Python TLS endpoint (no Hawk, audit, metrics or logs) on this machine; "
                           f"server/floor = {peak_rate / floor_rate if floor_rate else 0:.2f}"]
    _add_cpu_comparison(report, list(zip(raws, peaks, strict=True)), args.project_cores)
    client_cpu = sum(p["client_cpu_s"] for p in peaks)
    what = f"medians of {rounds} alternating rounds, " if rounds > 1 else ""
    spread = f"; rounds {min(ratios):.2f}-{max(ratios):.2f}" if rounds > 1 else ""
    report["notes"] = [*report.get("notes", []),
                       f"server/raw = {peak_rate:.0f}/{raw_rate:.0f} = {peak_rate / raw_rate:.2f} ({what}the load "
                       f"generator used {client_cpu:.3g} s of CPU on the same machine{spread})"]
    peak_requests = statistics.median(p["requests_per_s"] for p in peaks)
    if args.latency_at > 0 and peak_requests > 0:
        rate = peak_requests * args.latency_at
        paced = await measure_server(target, plan_from_args(args, rate=rate, concurrency=max(
            args.concurrency, 32)), route=args.route, padding=args.padding, batch_size=args.batch_size,
            name=f"{args.route}@{args.latency_at:.0%}", key=key)
        report["runs"].append(paced)
        report["comparison"]["latency_at"] = {"fraction": args.latency_at, "rate": round(rate, 1),
                                              "p99_ms": paced["latency_ms"]["p99"]}


def _add_cpu_comparison(report: dict[str, Any], pairs: list[tuple[dict[str, Any], dict[str, Any]]],
                        cores: int) -> None:
    """Efficiency (raw CPU per operation / server CPU per unwrap) and the projection, median over rounds."""
    found = cpu_comparisons(pairs, cores=cores)
    if not found:
        return
    middle, _ = median_by_efficiency(found)
    report["cpu"] = {**middle, "round_efficiencies": [c["efficiency"] for c, _ in found]}
    report["notes"] = [*report.get("notes", []),
                       f"server CPU per unwrap {middle['server_cpu_us_per_unwrap']:.0f} us, raw private operation "
                       f"{middle['raw_cpu_us_per_operation']:.0f} us: efficiency {middle['efficiency']:.2f}; "
                       f"projected on {cores} cores: {middle['projected_over_raw']:.2f} of the raw rate"]


@contextlib.contextmanager
def _floor_target(args: argparse.Namespace, target: Target) -> Iterator[Target | None]:
    """With --floor: the floor endpoint on the server's own config (key store, certificate), as a target."""
    if not args.floor:
        yield None
        return
    from lkm.bench.floor import floor_target  # noqa: PLC0415

    config = getattr(args, "config", None) or target.config
    if not config or args.route != "platform":
        raise TargetError("--floor needs the server's config (-c, or a dev.json) and the platform route")
    with floor_target(Path(config), target, threads=args.threads) as floor:
        yield floor


def _raw_key(store: KeyStore, key_id: str | None) -> str:
    """The server's own key when the store holds it (same key, same cost), else the store's newest."""
    return pick_key(store, key_id if key_id and key_id in {k.id for k in store.list_keys()} else None)


def _measure_raw_for(store: KeyStore, key_id: str | None, args: argparse.Namespace,
                     name: str = "raw") -> dict[str, Any]:
    return measure_raw(store, _raw_key(store, key_id), args.padding, threads=args.threads, duration=args.duration,
                       name=name)


async def _raw_and_server(store: KeyStore, target: Target, plan: LoadPlan, key: tuple[str, bytes],
                          args: argparse.Namespace, *, suffix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One round of --compare: raw and the server in alternating slices; one after the other with --requests
    (a count of requests does not split by time)."""
    if plan.requests is not None:
        raw = _measure_raw_for(store, key[0], args, name=f"raw{suffix}")
        return raw, await measure_server(target, plan, route=args.route, padding=args.padding,
                                         batch_size=args.batch_size, key=key, name=f"{args.route}{suffix}")
    return await measure_in_slices(store, target, plan, key=key, threads=args.threads, raw_name=f"raw{suffix}",
                                   server_name=f"{args.route}{suffix}", route=args.route, padding=args.padding,
                                   batch_size=args.batch_size, raw_key_id=_raw_key(store, key[0]),
                                   raw_cpus=server_cpus(target.server_pid))


def server_cpus(pid: int | None) -> set[int] | None:
    """The CPUs a server on this host is confined to, when that is not where this process runs (`taskset -c 1
    lkm serve`, `taskset -c 0 lkm bench`): raw then runs there too, on the cores whose speed the server had;
    None otherwise. Neighbours slow one virtual CPU and not another, so raw on the load generator's core
    measures a different machine."""
    theirs = None if pid is None else affinity(pid)
    return theirs if theirs is not None and theirs != affinity(0) else None


def run(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
        if args.what == "startup":
            from lkm.bench.startup import run_startup  # noqa: PLC0415

            report = run_startup(keys=args.keys)
        elif args.what == "suite":
            from lkm.bench.suite import run_suite  # noqa: PLC0415

            report = run_suite(Path(args.dev_dir), duration=args.duration, warmup=args.warmup,
                               concurrency=args.concurrency, keys=args.keys, rounds=args.rounds or 3,
                               project_cores=args.project_cores)
        else:
            report = new_report()
            asyncio.run(_load_and_compare(args, report))
    except (TargetError, OSError, ValueError) as exc:
        print(f"lkm bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    wrong = sum(r["errors"]["mismatch"] for r in report["runs"] if r.get("kind") == "server")
    return 1 if wrong else 0
