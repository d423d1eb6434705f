"""Names that `top -H`, `ps -L` and `lkm bench` see for lkm's threads.

Python 3.11 keeps `threading.Thread.name` to itself: every thread shows the interpreter's name in
/proc/PID/task/TID/comm. lkm writes its own names there (at most 15 bytes, the kernel's limit), so that the CPU
a server spends can be told apart by job: the event loop, the private-key workers, the audit writer, the log
writer. `lkm bench` groups a server's threads by these names, without their numeric suffix.
"""

from __future__ import annotations

import threading

COMM_BYTES = 15

LOOP = "lkm-loop"
"""The thread that runs a server process's event loop."""


def name_this_thread(name: str | None = None) -> None:
    """Gives the calling thread an OS-visible name (default: its `threading` name); best effort, never fails."""
    current = threading.current_thread()
    name = name or current.name
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w", encoding="ascii") as f:
            f.write(name.encode("ascii", "replace").decode("ascii")[:COMM_BYTES])
    except OSError:  # no /proc (not Linux), or a hardened one: names are a convenience
        pass


def thread_kind(comm: str) -> str:
    """A thread's job from its name: the name without a trailing counter (`lkm-rsa-3` -> `lkm-rsa`)."""
    stripped = comm.rstrip("0123456789")
    if stripped != comm:
        stripped = stripped.rstrip("-_")
    return stripped or comm
