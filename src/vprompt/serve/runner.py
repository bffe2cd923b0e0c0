"""One model call at a time, off the event loop, with a bounded wait.

torch modules are not safe for concurrent forwards, so every model call takes one lock and
runs in a worker thread; the event loop keeps answering other requests (health, uploads being
received) meanwhile. A request that cannot get the lock within the time limit answers 503
``busy``. A call that has started always runs to the end, so the lock is never released while
the model is still busy.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import torch

from vprompt.serve.errors import ApiError

T = TypeVar("T")


class ModelRunner:
    """Serializes model calls (see the module docstring).

    Args:
        timeout_s: Longest wait for the lock before answering 503 ``busy``.
    """

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        # The asyncio lock gives a cancellable, bounded wait; it belongs to one event loop, so a
        # new loop (tests start one per client) gets a new one. The thread lock is the real
        # guarantee, whatever loop the call came from.
        self._async_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_lock = threading.Lock()

    def _lock_for_loop(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._async_lock is None or self._loop is not loop:
            self._async_lock, self._loop = asyncio.Lock(), loop
        return self._async_lock

    def _locked_call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._thread_lock, torch.inference_mode():
            return fn(*args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, alone on the model.

        Raises:
            ApiError: 503 ``busy`` when the lock was not free within ``timeout_s``.
        """
        lock = self._lock_for_loop()
        try:
            with anyio.fail_after(self.timeout_s):
                await lock.acquire()
        except TimeoutError:
            raise ApiError(
                503,
                "busy",
                f"the model stayed busy for more than {self.timeout_s:g} s; try again later",
            ) from None
        try:
            return await anyio.to_thread.run_sync(self._locked_call, fn, args)
        finally:
            lock.release()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """CPU work that needs no model (decoding, encoding masks) off the event loop."""
    return await anyio.to_thread.run_sync(fn, *args)


class ThreadSlots:
    """At most ``slots`` calls of CPU work at once in worker threads (the others wait), so
    concurrent uploads cannot all hold decoded pixels at the same time."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._limiter: anyio.CapacityLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._loop is not loop:  # one limiter per event loop
            self._limiter, self._loop = anyio.CapacityLimiter(self.slots), loop
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
