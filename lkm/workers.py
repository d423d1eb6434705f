"""Worker threads for private-key operations, with the lightest hand-off to and from the event loop.

`loop.run_in_executor(ThreadPoolExecutor)` wraps each job in a `concurrent.futures.Future` (with its own
condition variable) chained to an asyncio future through callbacks on both sides. On a busy server that
machinery cost the event loop about as much as the HTTP parsing of the request, once per unwrap. Here a job is
a tuple on a `queue.SimpleQueue` and its result goes straight to the awaiting asyncio future with one
`call_soon_threadsafe`. Everything that is not a private-key operation keeps using an ordinary executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from lkm.threadnames import name_this_thread

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _deliver(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # its caller may have been cancelled meanwhile
        future.set_result(result)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class WorkerThreads:
    """A fixed set of threads that run jobs for coroutines: `await workers.run(func, *args)`."""

    def __init__(self, count: int, *, name: str = "lkm-worker") -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
                         for i in range(count)]
        self._closed = False
        for thread in self._threads:
            thread.start()

    def run(self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queues `func(*args)`; the returned future (of the running loop) gets its result or exception.

        Cancelling the future does not stop a job that has started: a private-key operation is never torn.
        """
        if self._closed:
            raise RuntimeError("worker threads are closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, func, args))
        return future

    def _serve(self) -> None:
        name_this_thread()
        while (job := self._jobs.get()) is not None:
            loop, future, func, args = job
            callback: Callable[[asyncio.Future[Any], Any], None]
            result: Any = None
            try:
                result = func(*args)
            except BaseException as exc:  # every failure belongs to the job's caller
                callback, value = _fail, exc
            else:
                callback, value = _deliver, result
            with contextlib.suppress(RuntimeError):  # the loop closed while the job ran: nobody is waiting
                loop.call_soon_threadsafe(callback, future, value)
            del job, future, func, args, value, result  # drop references (a result may be a data key) before waiting

    def close(self) -> None:
        """Lets queued jobs finish, then stops the threads."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
