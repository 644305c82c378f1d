"""The per-process runtime of a worker: one long-lived event loop in a daemon thread.

Celery has no asyncio and the MCP SDK is asyncio, so each worker process owns one loop that
holds the MCP session pools, the async Redis client and the batch committer. Tasks (on any
pool thread) hand it coroutines and block on the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from shared.committer import BatchCommitter
from shared.context import Summarizer, open_context_store
from shared.conversation import ToolSummarizer
from shared.embedded import redis_url
from shared.execution import ExecutionContext
from shared.executor import drain, execute_chunk_through_outages
from shared.jobs import Enqueuer
from shared.keys import Keys
from shared.limiter import ClusterLimiter
from shared.mcp_client import McpPool
from shared.models import Chunk, ChunkReport
from shared.probes import Breaker, probe_due_servers
from shared.reaper import reap_once
from shared.settings import Settings
from shared.store import JobStore, connect
from workers.tuning import new_event_loop, tune_gc

log = logging.getLogger(__name__)
T = TypeVar("T")

HEARTBEAT_TTL_S = 10
# Set by `toolswarm up` and `toolswarm demo` for the workers they supervise.
PARENT_PID_ENV = "TOOLSWARM_PARENT_PID"


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerRuntime:
    def __init__(self, settings: Settings, enqueuer: Enqueuer, worker_id: str | None = None) -> None:
        self.settings = settings
        self.enqueuer = enqueuer
        self.worker_id = worker_id or default_worker_id()
        self.pid = os.getpid()
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="toolswarm-loop", daemon=True)
        self._context: ExecutionContext | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._pool: McpPool | None = None

    @property
    def context(self) -> ExecutionContext:
        if self._context is None:
            raise RuntimeError("worker runtime is not started")
        return self._context

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop from any thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run_chunk(self, chunk: Chunk, delivery_tag: str | None) -> ChunkReport:
        """Run one chunk message; the heartbeat says its delivery is held here while it runs."""
        ctx = self.context
        if delivery_tag:
            ctx.deliveries.add(delivery_tag)
        try:
            return self.run(execute_chunk_through_outages(ctx, chunk))
        finally:
            ctx.deliveries.discard(delivery_tag or "")

    def start(self) -> None:
        # The HTTP client logs every request at INFO: a line per tool call in the worker's log,
        # and CPU per item spent formatting and writing it. Its warnings still come through.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        self._thread.start()
        self.run(self._open(), timeout=30)
        # A collection stops the loop, and every call in flight holds its slot meanwhile. Measured in
        # bench/fanout.py: one full collection per job, 0.16-0.27 s (Celery, the MCP SDK and
        # pydantic leave several hundred thousand objects), and 0.2-0.3 s of young collections.
        tune_gc()
        log.info("toolswarm worker runtime %s started", self.worker_id)

    async def _open(self) -> None:
        keys = Keys(self.settings.namespace)
        client = connect(redis_url(self.settings), health_check_interval=10)
        store = JobStore(client, keys, self.settings.global_events_maxlen)
        served = self.settings.served()  # a pool opens sessions only to the servers it serves
        self._pool = McpPool({name: c for name, c in self.settings.servers.items() if name in served})
        self._context = ExecutionContext(
            settings=self.settings,
            store=store,
            caller=self._pool,
            committer=BatchCommitter(
                store, self.settings.worker.commit_batch_size, self.settings.state, self.enqueuer
            ),
            worker_id=self.worker_id,
            limiter=ClusterLimiter(client, keys, self.worker_id, self.settings.worker.lease_s),
            breaker=Breaker(client, keys, self.settings),
            enqueuer=self.enqueuer,
            context=open_context_store(self.settings, client, self._summarizer()),
        )
        self._heartbeat = asyncio.create_task(self._beat(), name="toolswarm-heartbeat")
        self._reaper = asyncio.create_task(self._reap(), name="toolswarm-reaper")
        self._prober = asyncio.create_task(self._probe(), name="toolswarm-prober")

    def _summarizer(self) -> Summarizer | None:
        """The MCP tool ``[context] summarizer`` names, over this worker's pool (None: the default)."""
        chosen = self.settings.context.summarizer
        if chosen is None or self._pool is None:
            return None
        return ToolSummarizer(self._pool, chosen.server, chosen.tool)

    async def _beat(self) -> None:
        """Every heartbeat: renew the leases of all in-flight items and the worker's liveness key,
        in one round trip."""
        ctx = self.context
        key = ctx.store.keys.worker(self.worker_id)
        started_at = time.time()
        parent = os.environ.get(PARENT_PID_ENV)
        worker = self.settings.worker
        while True:
            if parent and os.getppid() != int(parent):
                # Whoever started us (toolswarm up / demo) is gone: do not linger as an orphan.
                log.warning("parent process %s is gone; shutting down", parent)
                os.kill(self.pid, signal.SIGTERM)
                parent = None
            try:
                await ctx.store.mark_calling(ctx.take_started_calls())
                await ctx.store.renew(ctx.leased(), worker.lease_s)
                await ctx.store.hold_deliveries(list(ctx.deliveries), worker.lease_s)
                if ctx.limiter is not None:
                    await ctx.limiter.renew()
                record = {
                    "worker": self.worker_id,
                    "pid": self.pid,
                    "started_at": started_at,
                    "beat_at": time.time(),
                    # Items waiting on a down server, by job and server: what `status` shows as held.
                    "held": ctx.breaker.held() if ctx.breaker is not None else {},
                }
                await ctx.store.client.set(
                    key, json.dumps(record), ex=max(HEARTBEAT_TTL_S, int(worker.lease_s * 2))
                )
            except Exception as exc:  # a heartbeat loop must outlive a Redis blip
                log.warning("heartbeat failed: %s", exc)
            try:
                await ctx.metrics.flush(ctx.store.client, ctx.store.keys)
            except Exception as exc:  # counters not flushed now go with the next beat
                log.warning("flushing metrics failed: %s", exc)
            await asyncio.sleep(worker.heartbeat_s)

    async def _reap(self) -> None:
        ctx = self.context
        while True:
            await asyncio.sleep(self.settings.worker.reaper_interval_s)
            if ctx.draining:
                continue
            try:
                report = await reap_once(ctx.store, self.enqueuer, self.settings, self.worker_id)
                ctx.metrics.taken_back(report.taken_back)
                ctx.metrics.settled("failed", report.poisoned)
                if report.requeued or report.poisoned or report.restored or report.swept:
                    log.warning(
                        "reaper: %d items taken back and requeued (%d to run alone), %d poisoned, "
                        "%d orphaned chunks restored, %d uncovered items enqueued again",
                        report.requeued,
                        report.isolated,
                        report.poisoned,
                        report.restored,
                        report.swept,
                    )
            except Exception as exc:  # the reaper must outlive a Redis blip
                log.warning("reaper failed: %s", exc)

    async def _probe(self) -> None:
        """Probe the servers whose turn it is (one worker per server per interval, cluster-wide)."""
        ctx = self.context
        while True:
            try:
                for result in await probe_due_servers(
                    ctx.store.client, ctx.store.keys, self.settings, self.worker_id
                ):
                    if not result.ok:
                        log.warning("probe of %r failed: %s", result.server, result.error)
            except Exception as exc:  # the prober must outlive a Redis blip
                log.warning("probing failed: %s", exc)
            await asyncio.sleep(min(1.0, self.settings.probes.unhealthy_interval_s))

    def begin_drain(self) -> None:
        """Called on SIGTERM: stop starting items, finish calls in flight within the grace period,
        give the other leases back. Returns at once; Celery waits for the chunk tasks."""
        if self._context is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(
                drain(self._context, self.settings.worker.shutdown_grace_s), self.loop
            )

    async def _close(self) -> None:
        for task in (self._heartbeat, self._reaper, self._prober):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._context is not None:
            if self._context.limiter is not None:
                await self._context.limiter.close()
            if self._context.context is not None:
                await self._context.context.close()
            store = self._context.store
            try:
                # Briefly: if Redis is already gone (Ctrl-C reaches it too), the key expires anyway.
                await asyncio.wait_for(self._context.metrics.flush(store.client, store.keys), 1.0)
                await asyncio.wait_for(store.client.delete(store.keys.worker(self.worker_id)), 1.0)
            except Exception as exc:  # shutting down: Redis may already be gone
                log.debug("could not remove heartbeat: %s", exc)
            await store.client.aclose()
        if self._pool is not None:
            await self._pool.close()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self._close(), timeout=15)
        except Exception as exc:  # best effort: the process is exiting anyway
            log.warning("worker runtime did not close cleanly: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
