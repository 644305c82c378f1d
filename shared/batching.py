"""Coalescing of concurrent requests into batches: one round trip carries many."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from shared.log_context import detached_context

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """The first request starts a flush (after ``linger_s``); requests arriving meanwhile, or while
    it is in flight, ride along or take the next one. A short linger trades that much latency for
    fewer, larger batches when requests trickle in one by one."""

    def __init__(
        self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 256, linger_s: float = 0.0
    ) -> None:
        self._flush = flush
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run(), context=detached_context())
        return await future

    async def _run(self) -> None:
        if self.linger_s:
            await asyncio.sleep(self.linger_s)
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                results = await self._flush([item for item, _ in batch])
            except Exception as exc:  # every waiter of the batch gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
