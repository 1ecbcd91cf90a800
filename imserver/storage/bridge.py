"""The Trio <-> asyncio bridge: asyncpg runs on its own event loop in one thread.

Theory of operation
-------------------
asyncpg is asyncio-only, and the server is Trio. Rather than mixing the two in
one thread (trio-asyncio measured 200-500 us a call here), asyncpg gets a plain
asyncio loop in a dedicated daemon thread. A Trio task calls
``await bridge.call(fn, *args)``: ``fn`` is an ``async def`` that runs on the
asyncio loop and does a *whole unit of work* (a batch, or a query with its
transaction), because each hop costs 180-370 us while the work inside a hop runs
at native speed (docs/design.md has the figures).

The Trio side parks the calling task with ``wait_task_rescheduled`` and the
asyncio future's done-callback reschedules it through the Trio token, so a hop
needs no thread pool and no polling.

Cancellation: if the Trio task is cancelled mid-call, the asyncio task is
cancelled too and the Trio task *waits for it to finish* before raising
``Cancelled``. asyncpg then sends a cancel request and the transaction context
manager rolls back, so the pooled connection stays usable and no transaction is
left half-open. Nothing asyncio-shaped ever leaves this module.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


class AsyncioThread:
    """An asyncio event loop running in a dedicated thread."""

    def __init__(self, name: str = "imserver-asyncpg") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<AsyncioThread {self._name} running={self._loop is not None}>"

    def start(self) -> None:
        """Start the thread and its loop; returns once the loop runs."""
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name=self._name, daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        """Stop the loop and join the thread (pending asyncio tasks are abandoned)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def run_sync(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = 60.0) -> T:
        """Run ``fn(*args)`` on the loop from a plain (non-Trio) thread and wait for it."""
        assert self._loop is not None, "bridge not started"
        fut = asyncio.run_coroutine_threadsafe(_as_coro(fn, *args), self._loop)
        return fut.result(timeout)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the asyncio loop and return its result to Trio.

        Exceptions raised by ``fn`` propagate unchanged. If the calling Trio task
        is cancelled, the asyncio task is cancelled and awaited before
        ``trio.Cancelled`` is raised.
        """
        loop = self._loop
        assert loop is not None, "bridge not started"
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        holder: list[asyncio.Task[T]] = []

        def done(fut: asyncio.Task[T]) -> None:
            result = outcome.capture(fut.result)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        def submit() -> None:
            atask = loop.create_task(_as_coro(fn, *args))
            holder.append(atask)
            atask.add_done_callback(done)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            # Let the asyncio side finish (rolling back) before we unwind.
            def cancel() -> None:
                if holder:
                    holder[0].cancel()

            loop.call_soon_threadsafe(cancel)
            return trio.lowlevel.Abort.FAILED

        loop.call_soon_threadsafe(submit)
        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        except asyncio.CancelledError:
            # Only our own abort cancels the asyncio task, so Trio's scope is
            # cancelled: this checkpoint raises trio.Cancelled.
            await trio.lowlevel.checkpoint()
            raise
        return result


async def _as_coro(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)
