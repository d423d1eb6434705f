"""CPU accounting from /proc: what a server (every process, every thread) spends per unwrap, and on what.

A snapshot reads /proc/PID/stat and /proc/PID/task/*/stat of a process and of all its descendants (a server's
worker processes, a PKCS#11 store's token workers). The difference of two snapshots is the CPU spent between
them: in total (per process, which also counts threads that exited meanwhile) and per thread, grouped by the
thread's job (its name without a counter, see lkm.threadnames). CPU time holds far better than a rate on a shared
or busy machine, where the neighbours take whole slices of wall-clock time; but what they do to the caches
moves even the CPU an operation costs, which is why the suite compares the server with the raw operation in
alternating slices of a second (lkm.bench.measure).

From those, per unwrap: the server's CPU, each job's share, the busiest single thread (a thread can use one core
at most, so it caps one process), the efficiency against the raw private-key operation of the same run, and a
projection of the rate on a machine with more cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lkm.threadnames import LOOP, thread_kind

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROUNDING_SECONDS = 2 / CLOCK_TICKS + 0.005
"""How far a process's CPU total in /proc/PID/stat (user and system time, each cut down to a whole tick) can be
off its threads' exact times, read a moment later (when a scheduler tick falls between, a few ms more)."""


@dataclass(frozen=True)
class ThreadCpu:
    """One thread's name and CPU time, to the nanosecond where schedstat can be read, else in clock ticks."""

    name: str
    cpu_seconds: float


@dataclass(frozen=True)
class CpuSnapshot:
    processes: dict[int, float]  # pid -> CPU seconds of the whole process (exited threads included), in ticks
    threads: dict[tuple[int, int], ThreadCpu]  # (pid, tid) -> that thread's counters
    loops: frozenset[int]  # processes that run an event loop (a thread named lkm-loop)


@dataclass(frozen=True)
class CpuUsage:
    """CPU spent between two snapshots."""

    seconds: float
    by_kind: dict[str, float] = field(default_factory=dict)  # thread job -> CPU seconds
    busiest_seconds: float = 0.0  # the single thread that used the most
    busiest_kind: str = ""
    processes: int = 1  # server processes (with an event loop) seen; at least 1
    one_per_core: bool = False  # as many server processes as CPUs the server may use


def _stat(path: Path) -> tuple[str, list[bytes]] | None:
    """(name, fields after the name) of a /proc stat file, or None if the process or thread is gone."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    left, right = data.find(b"("), data.rfind(b")")
    if left < 0 or right < 0:
        return None
    return data[left + 1:right].decode("ascii", "replace"), data[right + 1:].split()


def _cpu(fields: list[bytes]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime, in clock ticks


def _exact_cpu(task: Path) -> float | None:
    """A thread's CPU time to the nanosecond (schedstat's run time); stat's ticks are off by up to a few."""
    try:
        return int((task / "schedstat").read_bytes().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """`root` and every descendant that exists now (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(entry / "stat")
            if stat is not None:
                children.setdefault(int(stat[1][1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def snapshot(root: int, *, skip_servers: bool = False) -> CpuSnapshot:
    """The CPU counters of `root`'s process tree. With `skip_servers`, descendants that run an event loop (a
    server or the floor started by the benchmark) are left out with their own descendants."""
    processes: dict[int, float] = {}
    threads: dict[tuple[int, int], ThreadCpu] = {}
    loops: set[int] = set()
    skipped: set[int] = set()
    for pid in process_tree(root):
        stat = _stat(PROC / str(pid) / "stat")
        if stat is None:
            continue
        if int(stat[1][1]) in skipped:  # a descendant of a server left out
            skipped.add(pid)
            continue
        found: dict[tuple[int, int], ThreadCpu] = {}
        for task in _tasks(pid):
            task_stat = _stat(task / "stat")
            if task_stat is not None:
                exact = _exact_cpu(task)
                found[(pid, int(task.name))] = ThreadCpu(task_stat[0], _cpu(task_stat[1]) if exact is None else exact)
        is_loop = any(thread.name == LOOP for thread in found.values())
        if skip_servers and pid != root and is_loop:
            skipped.add(pid)
            continue
        if is_loop:
            loops.add(pid)
        processes[pid] = _cpu(stat[1])
        threads.update(found)
    return CpuSnapshot(processes, threads, frozenset(loops))


def _tasks(pid: int) -> Iterable[Path]:
    """/proc/PID/task/TID of each thread of a process; none once it is gone."""
    try:
        return list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return []


def usage(before: CpuSnapshot, after: CpuSnapshot, *, cpus_allowed: int | None = None) -> CpuUsage:
    """What was spent between the snapshots by the processes and threads of `after` (new ones count in full)."""
    by_kind: dict[str, float] = {}
    busiest, busiest_kind = 0.0, ""
    for key, thread in after.threads.items():
        earlier = before.threads.get(key)
        spent = thread.cpu_seconds - (earlier.cpu_seconds if earlier is not None else 0.0)
        kind = thread_kind(thread.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + spent
        if spent > busiest:
            busiest, busiest_kind = spent, kind
    # Threads that ended during the run: their CPU went to their process's total, beyond what its live threads
    # spent since `before`. A thread live then and ended since counts from `before` on. The process's total
    # comes in clock ticks, each of its two parts cut down to a whole tick at each snapshot, so a gap of up to
    # two ticks either way is rounding, not a thread: counting every positive gap (and dropping the negative
    # ones) charged a server whose threads all lived with 15 µs per unwrap of "exited threads" in one-second
    # slices. A gap beyond `ROUNDING_SECONDS` counts in full.
    live: dict[int, float] = {}
    for (pid, tid), thread in after.threads.items():
        earlier = before.threads.get((pid, tid))
        live[pid] = live.get(pid, 0.0) + thread.cpu_seconds - (earlier.cpu_seconds if earlier is not None else 0.0)
    gaps = (cpu - before.processes.get(pid, 0.0) - live.get(pid, 0.0) for pid, cpu in after.processes.items())
    exited = sum(gap for gap in gaps if gap > ROUNDING_SECONDS)
    if exited > 0:
        by_kind["(exited threads)"] = exited
    total = sum(by_kind.values())
    processes = max(len(after.loops), 1)
    return CpuUsage(seconds=total, by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                    busiest_seconds=busiest, busiest_kind=busiest_kind, processes=processes,
                    one_per_core=cpus_allowed is not None and processes >= cpus_allowed)


def combined_usage(parts: Sequence[CpuUsage]) -> CpuUsage:
    """The CPU of a run measured in slices, as one. The busiest thread is each slice's busiest, added up: the
    same thread (the event loop) in practice, and never less than the busiest single thread's real share."""
    by_kind: dict[str, float] = {}
    for part in parts:
        for kind, spent in part.by_kind.items():
            by_kind[kind] = by_kind.get(kind, 0.0) + spent
    busiest = max(parts, key=lambda part: part.busiest_seconds)
    return CpuUsage(seconds=sum(part.seconds for part in parts),
                    by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                    busiest_seconds=sum(part.busiest_seconds for part in parts), busiest_kind=busiest.busiest_kind,
                    processes=max(part.processes for part in parts),
                    one_per_core=all(part.one_per_core for part in parts))


def affinity(pid: int) -> set[int] | None:
    """The CPUs a process may run on, or None if it cannot be asked (it has exited)."""
    try:
        return os.sched_getaffinity(pid)
    except OSError:
        return None


def cpus_allowed(pid: int) -> int | None:
    """How many CPUs a process may run on, or None if it cannot be asked."""
    cpus = affinity(pid)
    return None if cpus is None else len(cpus)


def projection(*, server_us: float, busiest_us: float, processes: int, one_per_core: bool, raw_us: float,
               cores: int) -> float:
    """The share of a `cores`-core machine's raw rate the server would reach there.

    min(cores / server CPU per unwrap, processes / busiest thread's CPU per unwrap of its process), over
    cores / raw CPU per operation. Processes grow with the cores only for a server that runs one per core.
    """
    if server_us <= 0 or raw_us <= 0 or cores < 1:
        return 0.0
    scaled = cores if one_per_core else processes
    rate = cores / server_us if busiest_us <= 0 else min(cores / server_us, scaled / busiest_us)
    return rate / (cores / raw_us)


def server_figures(spent: CpuUsage, unwraps: int) -> dict[str, object]:
    """The report's figures for a server run: CPU per unwrap in µs, in total, by job and busiest thread.

    The busiest thread's figure is per unwrap of its own process (the load spreads over the processes evenly),
    which is what caps that process's rate.
    """
    if unwraps <= 0:
        return {}
    per = 1e6 / unwraps
    return {"server_cpu_us_per_unwrap": round(spent.seconds * per, 1),
            "threads_us_per_unwrap": {kind: round(s * per, 1) for kind, s in spent.by_kind.items()},
            "busiest_thread": spent.busiest_kind,
            "busiest_thread_us_per_unwrap": round(spent.busiest_seconds * per * spent.processes, 1),
            "server_processes": spent.processes, "one_process_per_core": spent.one_per_core}
