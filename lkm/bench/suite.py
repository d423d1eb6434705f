"""`lkm bench suite`: every figure of the README's Performance table, in one run, against servers it starts.

Runs in order, against a server with one worker thread per CPU (the default): the raw private-key rate on all
CPUs and that server's peak on the platform route, alternating in slices of about a second
(`lkm.bench.measure.measure_in_slices`), then the floor (`lkm.bench.floor`, the leanest Python endpoint that
unwraps, on the same key store and certificate), for `rounds` rounds so that the ratios come from medians; the
raw rate on one thread; then, against the same server, 80% of its median peak for latency, the native route,
batches, and a new TLS connection per request on both routes (with and without session resumption); then a
server with a single worker thread; then a server pinned to one core (so that its RSA runs on the event loop,
as it does with one process per core), with the load generator on the other cores, against the raw operation on
one thread on the server's core, again in alternating slices: the CPU per unwrap and the efficiency (against
raw on that core while the others idle, and for reference against raw there while the other cores are busy, as
they are while the generator drives the server); and the start-up benchmark. Servers use the dev
environment's config (made if missing) with only ports and worker threads changed, so they log and audit as a
real one does.

Connections are counted per server process (`--concurrency`, default 16): the server on every core gets 16 for
each of its processes, as the one-core server gets 16 for its one. Spread over two processes, 16 gave each
process 8, which it answered in one batch and then waited, with nothing to do, for that batch's fsync and the
next requests: 8-10% of two cores sat idle, and the server reached 0.64 of the raw rate on the cores the
generator left, against 0.69-0.72 with 16 each (alternating runs on a 2-core VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
from pathlib import Path
from typing import Any

from lkm.bench.floor import floor_target
from lkm.bench.load import LoadPlan
from lkm.bench.measure import kept_to, measure_in_slices, measure_raw, measure_server
from lkm.bench.report import cpu_comparisons, lower_median, median_by_efficiency, new_report
from lkm.bench.requests import fetch_public_key
from lkm.bench.spawn import busy_cores, dev_target, spawn_server
from lkm.bench.startup import run_startup

LATENCY_FRACTION = 0.8
BATCH_SIZE = 100
ONE_CORE = "platform (1 process on 1 core, RSA inline)"
RAW_ONE_CORE = "raw 1 thread on the server's core, in slices"
RAW_BESIDE_LOAD = "raw 1 thread, server's core, generator's cores busy"


def _platform_name(workers: int) -> str:
    """The name of a server's peak run; with a round's tag after it when there are rounds."""
    return f"platform ({workers} worker{'s' if workers > 1 else ''})"


async def _server_runs(dev_dir: Path, workers: int, plan: LoadPlan, *,
                       rounds: int | None = None) -> list[dict[str, Any]]:
    """With `rounds`: raw and the server's peak in alternating slices, then the floor, `rounds` times (so a
    neighbour's burst falls on all three), then the rest of the table against the same server. Without: the
    server's peak once."""
    from lkm.config import load_settings  # noqa: PLC0415
    from lkm.keystore.open import open_keystore  # noqa: PLC0415

    runs: list[dict[str, Any]] = []
    config = dev_dir / "lkm.yaml"
    cpus = os.cpu_count() or 1
    with spawn_server(config, {"limits.worker_threads": workers}) as spawned:
        target = dev_target(dev_dir, spawned)
        key = await fetch_public_key(target)
        if rounds is None:
            runs.append(await measure_server(target, plan, route="platform", padding="oaep-sha1", batch_size=1,
                                             name=_platform_name(workers), key=key))
            return runs
        peaks: list[dict[str, Any]] = []
        with contextlib.closing(open_keystore(load_settings(config).keystore)) as store, \
                floor_target(config, target) as floor:
            for round_ in range(1, rounds + 1):
                tag = f" #{round_}" if rounds > 1 else ""
                raw, peak = await measure_in_slices(store, target, plan, key=key, threads=cpus,
                                                    raw_name=f"raw {cpus} threads{tag}",
                                                    server_name=f"{_platform_name(workers)}{tag}")
                runs += [raw, peak]
                peaks.append(peak)
                runs.append(await measure_server(floor, plan, route="platform", padding="oaep-sha1",
                                                 batch_size=1, name=f"floor (leanest Python endpoint){tag}",
                                                 key=key))
            if cpus > 1:
                runs.append(measure_raw(store, key[0], "oaep-sha1", threads=1, duration=plan.duration or 10.0,
                                        name="raw 1 thread"))
        rate = statistics.median(p["requests_per_s"] for p in peaks) * LATENCY_FRACTION
        paced = dataclasses.replace(plan, concurrency=max(plan.concurrency, 32), rate=rate)
        runs.append(await measure_server(target, paced, route="platform", padding="oaep-sha1", batch_size=1,
                                         name=f"platform at {LATENCY_FRACTION:.0%} of peak", key=key))
        runs.append(await measure_server(target, plan, route="native", padding="oaep-sha1", batch_size=1,
                                         name="native", key=key))
        # One batch per worker in flight: each is split across all workers, and more would queue past the
        # deadline (4 batches of 100 on 2 workers wait about 250 ms) and be refused.
        batches = dataclasses.replace(plan, concurrency=workers)
        runs.append(await measure_server(target, batches, route="batch", padding="oaep-sha1",
                                         batch_size=BATCH_SIZE, name=f"batch of {BATCH_SIZE}", key=key))
        for route in ("platform", "native"):  # native: the handshake includes a client certificate
            for resume in (False, True):
                fresh = dataclasses.replace(plan, new_connections=True, resume=resume)
                name = f"{route}, new connection" + (", resumed" if resume else " each")
                runs.append(await measure_server(target, fresh, route=route, padding="oaep-sha1", batch_size=1,
                                                 name=name, key=key))
    return runs


def _pinned_cores() -> tuple[set[int], set[int]] | None:
    """(the server's core, the load generator's cores) on a machine with at least two, else None."""
    cores = sorted(os.sched_getaffinity(0))
    return ({cores[-1]}, set(cores[:-1])) if len(cores) > 1 else None


async def _one_core_runs(dev_dir: Path, plan: LoadPlan, rounds: int) -> list[dict[str, Any]]:
    """One server process on a core of its own (so RSA runs inline, as with one process per core), with the load
    generator on the other cores, against the raw operation on one thread on the server's core, in alternating
    slices; then raw there again beside busy cores, for reference."""
    from lkm.config import load_settings  # noqa: PLC0415
    from lkm.keystore.open import open_keystore  # noqa: PLC0415

    pinned = _pinned_cores()
    if pinned is None:
        return []
    server_core, own = pinned
    config = dev_dir / "lkm.yaml"
    runs: list[dict[str, Any]] = []
    before = os.sched_getaffinity(0)
    with spawn_server(config, {"limits.rsa_execution": "auto"}, cpus=server_core) as spawned:
        os.sched_setaffinity(0, own)
        try:
            target = dev_target(dev_dir, spawned)
            key = await fetch_public_key(target)
            with contextlib.closing(open_keystore(load_settings(config).keystore)) as store:
                for round_ in range(1, rounds + 1):
                    tag = f" #{round_}" if rounds > 1 else ""
                    raw, served = await measure_in_slices(store, target, plan, key=key, threads=1,
                                                          raw_name=f"{RAW_ONE_CORE}{tag}",
                                                          server_name=f"{ONE_CORE}{tag}", raw_cpus=server_core)
                    runs.append(raw)
                    # For reference, the same operation on the server's core with the others busy, in one piece.
                    with kept_to(server_core), busy_cores(own):
                        runs.append(measure_raw(store, key[0], "oaep-sha1", threads=1,
                                                duration=plan.duration or 10.0, name=f"{RAW_BESIDE_LOAD}{tag}"))
                    runs.append(served)
        finally:
            os.sched_setaffinity(0, before)
    return runs


def _median_run(runs: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    """The run with the median rate among those named `prefix` (one per round)."""
    matching = [r for r in runs if r["name"].startswith(prefix)]
    return lower_median(matching, key=lambda r: r["keys_per_s"]) if matching else None


def _find(runs: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    return next((r for r in runs if r["name"].startswith(prefix)), None)


def summarize(report: dict[str, Any], *, project_cores: int = 16) -> dict[str, Any]:
    """The ratios the README quotes, from the runs of a suite report."""
    runs = report["runs"]
    cpus = report["machine"]["cpus"] or 1
    raw = _median_run(runs, f"raw {cpus} threads") or _find(runs, "raw")
    raw1 = _find(runs, "raw 1 thread")
    peak = _median_run(runs, _platform_name(cpus)) or _find(runs, "platform (")
    one = _find(runs, _platform_name(1))
    paced = _find(runs, "platform at")
    batch = _find(runs, "batch")
    floor = _median_run(runs, "floor")
    native = _find(runs, "native")
    summary: dict[str, Any] = {}
    rounds = [r for r in runs if r["name"].startswith(_platform_name(cpus))]
    raws = [r for r in runs if r["name"].startswith(f"raw {cpus} threads")]
    if len(rounds) > 1 and len(rounds) == len(raws):
        summary["round_ratios"] = [round(p["keys_per_s"] / r["keys_per_s"], 3)
                                   for p, r in zip(rounds, raws, strict=True) if r["keys_per_s"]]
    if raw and peak:
        client_cores = peak["client_cpu_s"] / peak["seconds"] if peak["seconds"] else 0.0
        summary["server_over_raw"] = round(peak["keys_per_s"] / raw["keys_per_s"], 3)
        summary["load_generator_cores"] = round(client_cores, 2)
        # The load generator ran on the same cores: what the server reached against the raw rate of the cores it
        # had left (an estimate, for a reader who will run the platform's traffic from other machines).
        left = max(cpus - client_cores, 0.1) / cpus
        summary["server_over_raw_without_client"] = round(peak["keys_per_s"] / (raw["keys_per_s"] * left), 3)
    # CPU per unwrap: the server on a core of its own (what one process per core does) when there was one,
    # else the server on every core; against the raw operation's CPU of the same rounds.
    # The yardstick is the raw operation on the server's core beside idle cores, in slices between the server's.
    # Raw there beside busy cores is shown too: a busy neighbour can slow the RSA operation itself.
    beside = [r for r in runs if r["name"].startswith(RAW_BESIDE_LOAD)]
    idle = [r for r in runs if r["name"].startswith(RAW_ONE_CORE)]
    served = [p for p in runs if p["name"].startswith(ONE_CORE)]
    pairs = list(zip(idle, served, strict=False))
    if not pairs and raw and peak:
        pairs = [(raw, peak)]
    compared = cpu_comparisons(pairs, cores=project_cores)
    against_busy = cpu_comparisons(list(zip(beside, served, strict=False)), cores=project_cores)
    if against_busy:
        summary["efficiency_against_raw_beside_busy_cores"] = median_by_efficiency(against_busy)[0]["efficiency"]
        summary["raw_cpu_us_beside_busy_cores"] = statistics.median(
            r["cpu_us_per_operation"] for r in beside if r.get("cpu_us_per_operation"))
    if compared:
        cpu, measured = median_by_efficiency(compared)
        summary["cpu_run"] = measured["name"]
        summary["raw_cpu_us_per_operation"] = cpu["raw_cpu_us_per_operation"]
        summary["server_cpu_us_per_unwrap"] = cpu["server_cpu_us_per_unwrap"]
        summary["busiest_thread_us_per_unwrap"] = measured.get("busiest_thread_us_per_unwrap")
        summary["efficiency"] = cpu["efficiency"]
        summary["round_efficiencies"] = sorted(c["efficiency"] for c, _ in compared)
        summary[f"projected_{project_cores}_cores_over_raw"] = cpu["projected_over_raw"]
        if floor and floor.get("server_cpu_us_per_unwrap"):
            summary["floor_cpu_us_per_unwrap"] = floor["server_cpu_us_per_unwrap"]
    if floor and raw:
        summary["floor_over_raw"] = round(floor["keys_per_s"] / raw["keys_per_s"], 3)
        if peak:
            summary["server_over_floor"] = round(peak["keys_per_s"] / floor["keys_per_s"], 3)
    if paced:
        summary["p99_ms_at_80_percent"] = paced["latency_ms"]["p99"]
        summary["rate_at_80_percent"] = paced["rate"]
    if batch and peak:
        summary["batch_keys_per_s"] = batch["keys_per_s"]
        summary["batch_over_single"] = round(batch["keys_per_s"] / peak["keys_per_s"], 3)
    if native and peak:
        summary["native_over_platform"] = round(native["keys_per_s"] / peak["keys_per_s"], 3)
    if one and peak:
        summary[f"workers_{cpus}_over_1"] = round(peak["keys_per_s"] / one["keys_per_s"], 3)
    if raw and raw1:
        summary["raw_threads_over_1"] = round(raw["keys_per_s"] / raw1["keys_per_s"], 3)
    for route, base in (("platform", peak), ("native", native)):
        for label, suffix in (("new_connection", " each"), ("resumed_connection", ", resumed")):
            run = _find(runs, f"{route}, new connection{suffix}")
            if run and base and run["server_cpu_us_per_request"] and base["server_cpu_us_per_request"]:
                # What a connection per request costs the server on top of a kept-alive request.
                summary[f"{route}_{label}_server_cpu_us"] = round(run["server_cpu_us_per_request"]
                                                                  - base["server_cpu_us_per_request"], 1)
                if suffix == ", resumed":
                    summary[f"{route}_resumed_share"] = round(run["resumed"] / run["connections"], 3) \
                        if run["connections"] else 0.0
    return summary


def run_suite(dev_dir: Path, *, duration: float, warmup: float, concurrency: int, keys: int,
              rounds: int = 3, project_cores: int = 16) -> dict[str, Any]:
    """`concurrency` is per server process: the server on every core gets that many connections per core."""
    from lkm.devmode import ensure_dev_environment  # noqa: PLC0415

    dev_dir = dev_dir.resolve()
    ensure_dev_environment(dev_dir, port_base=0)
    report = new_report()
    cpus = os.cpu_count() or 1
    per_process = LoadPlan(concurrency=concurrency, duration=duration, warmup=warmup)
    every_core = dataclasses.replace(per_process, concurrency=concurrency * cpus)  # one process per core
    report["runs"].extend(asyncio.run(_server_runs(dev_dir, cpus, every_core, rounds=rounds)))
    if cpus > 1:
        report["runs"].extend(asyncio.run(_server_runs(dev_dir, 1, every_core)))
        report["runs"].extend(asyncio.run(_one_core_runs(dev_dir, per_process, rounds)))
    if keys > 0:
        startup = run_startup(keys=keys)
        report["startup"] = startup["startup"]
        report["notes"] = list(startup["notes"])
    report["summary"] = summarize(report, project_cores=project_cores)
    report["notes"] = [*report.get("notes", []),
                       *(f"{name}: {value}" for name, value in report["summary"].items())]
    return report
