"""Results as JSON (to compare a run with an earlier one) and as a table (to read).

One report holds the machine it ran on and a list of runs. A run is either `raw` (private-key operations in
process) or `server` (requests to a running lkm); both give `keys_per_s`, so the two compare directly.
Latency percentiles are over successful requests only: a fast 503 must not make the server look quicker.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from lkm import __version__
from lkm.bench.cpu import projection, server_figures
from lkm.bench.load import LoadPlan, LoadResult
from lkm.bench.raw import RawResult

T = TypeVar("T")

REPORT_VERSION = 1


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
            "lkm": __version__, "system": f"{platform.system()} {platform.release()}",
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def new_report() -> dict[str, Any]:
    return {"lkm_bench": REPORT_VERSION, "machine": machine_info(), "runs": []}


def load_entry(name: str, result: LoadResult, plan: LoadPlan, *, route: str, padding: str,
               batch_size: int = 1) -> dict[str, Any]:
    ordered = sorted(result.latencies)
    seconds = result.seconds or 1e-9
    requests = result.ok + sum(result.by_status.values()) + result.mismatches
    entry: dict[str, Any] = {
        "name": name, "kind": "server", "route": route, "padding": padding, "concurrency": plan.concurrency,
        "rate": plan.rate, "new_connections": plan.new_connections, "resume": plan.resume,
        "batch_size": batch_size, "seconds": round(result.seconds, 3), "requests": result.ok,
        "keys": result.keys, "requests_per_s": round(result.ok / seconds, 1),
        "keys_per_s": round(result.keys / seconds, 1),
        "latency_ms": {"p50": _ms(percentile(ordered, 0.50)), "p90": _ms(percentile(ordered, 0.90)),
                       "p99": _ms(percentile(ordered, 0.99)), "max": _ms(ordered[-1] if ordered else 0.0),
                       "mean": _ms(sum(ordered) / len(ordered) if ordered else 0.0)},
        "errors": {"total": result.errors, "by_status": {str(k): v for k, v in sorted(result.by_status.items())},
                   "connection": result.connection_errors, "mismatch": result.mismatches},
        "verified": result.verified, "connections": result.connections, "resumed": result.resumed,
        "client_cpu_s": round(result.client_cpu, 3),
        "client_cpu_us_per_request": round(result.client_cpu / requests * 1e6, 1) if requests else None,
        "server_cpu_s": None if result.server_cpu is None else round(result.server_cpu, 3),
        "server_cpu_us_per_request": (round(result.server_cpu / requests * 1e6, 1)
                                      if result.server_cpu is not None and requests else None),
    }
    if result.server_usage is not None:
        entry.update(server_figures(result.server_usage, result.keys))
    return entry


def raw_entry(name: str, result: RawResult, *, padding: str) -> dict[str, Any]:
    rate = round(result.ops_per_second, 1)
    return {"name": name, "kind": "raw", "padding": padding, "threads": result.threads,
            "seconds": round(result.seconds, 3), "operations": result.operations, "keys_per_s": rate,
            "requests_per_s": rate, "us_per_operation_per_thread": round(result.threads / rate * 1e6, 1)
            if rate else None,
            "cpu_us_per_operation": None if result.cpu_us_per_operation is None
            else round(result.cpu_us_per_operation, 1)}


def cpu_comparison(raw: dict[str, Any], server: dict[str, Any], *, cores: int) -> dict[str, Any] | None:
    """Server CPU per unwrap against the raw operation's CPU of the same run, and the projection to `cores`."""
    raw_us = raw.get("cpu_us_per_operation")
    server_us = server.get("server_cpu_us_per_unwrap")
    if not raw_us or not server_us:
        return None
    projected = projection(server_us=server_us, busiest_us=server.get("busiest_thread_us_per_unwrap") or 0.0,
                           processes=server.get("server_processes") or 1,
                           one_per_core=bool(server.get("one_process_per_core")), raw_us=raw_us, cores=cores)
    return {"raw_cpu_us_per_operation": raw_us, "server_cpu_us_per_unwrap": server_us,
            "efficiency": round(raw_us / server_us, 3), "projection_cores": cores,
            "projected_over_raw": round(projected, 3)}


Compared = tuple[dict[str, Any], dict[str, Any]]
"""A round's CPU comparison and the server run it came from."""


def cpu_comparisons(pairs: list[tuple[dict[str, Any], dict[str, Any]]], *, cores: int) -> list[Compared]:
    """(comparison, server run) for each (raw, server) pair of rounds that has CPU figures, in round order."""
    return [(c, server) for raw, server in pairs if (c := cpu_comparison(raw, server, cores=cores)) is not None]


def lower_median(items: Iterable[T], key: Callable[[T], Any]) -> T:
    """The item with the median `key`: an item that was measured, the lower middle of an even count."""
    ranked = sorted(items, key=key)
    if not ranked:
        raise ValueError("no items to take the median of")
    return ranked[(len(ranked) - 1) // 2]


def median_by_efficiency(compared: list[Compared]) -> Compared:
    """The round with the median efficiency."""
    return lower_median(compared, key=lambda cp: cp[0]["efficiency"])


def _cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_table(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [f"lkm bench: {machine['cpus']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
             f"load average {' '.join(str(x) for x in machine['load_average'])} at start"]
    header = ("run", "kind", "conc", "keys/s", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
              "client us/req", "CPU us/unwrap", "busiest us")
    rows: list[tuple[str, ...]] = [header]
    for run in report["runs"]:
        if run["kind"] == "raw":
            rows.append((run["name"], f"raw x{run['threads']}", "-", _cell(run["keys_per_s"]),
                         _cell(run["requests_per_s"]), "-", "-", "-", "-", "0", "-",
                         _cell(run.get("cpu_us_per_operation")), "-"))
            continue
        lat = run["latency_ms"]
        conc = str(run["concurrency"]) + (f"@{run['rate']:.0f}/s" if run["rate"] else "")
        rows.append((run["name"], run["route"] + ("+new-conn" if run["new_connections"] else ""), conc,
                     _cell(run["keys_per_s"]), _cell(run["requests_per_s"]), _cell(lat["p50"], 1),
                     _cell(lat["p90"], 1), _cell(lat["p99"], 1), _cell(lat["max"], 1),
                     _cell(run["errors"]["total"]), _cell(run["client_cpu_us_per_request"]),
                     _cell(run.get("server_cpu_us_per_unwrap", run["server_cpu_us_per_request"])),
                     _cell(run.get("busiest_thread_us_per_unwrap"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    for run in report["runs"]:
        if run.get("threads_us_per_unwrap"):
            parts = ", ".join(f"{kind} {us:.0f}" for kind, us in run["threads_us_per_unwrap"].items())
            lines.append(f"  {run['name']}: server CPU us per unwrap by thread: {parts} "
                         f"({run['server_processes']} process{'es' if run['server_processes'] > 1 else ''})")
    for run in report["runs"]:
        if run["kind"] == "server" and run["errors"]["total"]:
            err = run["errors"]
            lines.append(f"  {run['name']}: errors by status {err['by_status'] or '{}'}, connection "
                         f"{err['connection']}, wrong plaintext {err['mismatch']}")
    for note in report.get("notes", []):
        lines.append(note)
    return "\n".join(lines)
