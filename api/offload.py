"""Work that would block the event loop, run on a small bounded pool of threads instead.

Archive extraction, dataset parsing, chat templating and tokenising are CPU work in plain Python; run in
an `async def` handler they stall every other request of the server (health included) until they end.
`BlockingPool.run` hands such work to its own threads (not the shared threadpool the sync routes and the
database sessions use, so a burst of uploads cannot starve those either) and refuses, with a 503 naming
the setting, work beyond `CRUCIBLE_BLOCKING_WORKERS` running + `CRUCIBLE_BLOCKING_QUEUE` waiting.

(Chat templates, rendered under a deadline, are the serving engine's: `serving.templates`.)
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from api.problems import Problem

T = TypeVar("T")


class BlockingPool:
    """The threads start with the first work and stop with the app's lifespan (and start again if the
    app serves again, as an app under test may)."""

    def __init__(self, workers: int, queue: int) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(workers + queue)
        self.workers, self.queue = workers, queue

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="crucible-blocking")
            return self._pool

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on one of the pool's threads; a 503 when the pool and its queue are full.

        A slot is given back when the work ends, not when the awaiting request does: a client that hangs
        up does not free room for more work while its own still runs."""
        if not self._slots.acquire(blocking=False):
            raise Problem(
                503,
                "server-busy",
                "The server is busy",
                f"{self.workers} uploads or parses run and {self.queue} wait already "
                "(CRUCIBLE_BLOCKING_WORKERS, CRUCIBLE_BLOCKING_QUEUE); retry shortly",
                headers={"Retry-After": "2"},
            )
        try:
            future = self._executor().submit(contextvars.copy_context().run, fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
