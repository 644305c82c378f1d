"""Cluster-wide concurrency limits per MCP server: a Redis semaphore whose holders expire.

Each server's ``max_concurrency`` holds across every worker process on every host. A slot is a
member of ``<ns>:slots:<server>`` scored by its expiry; the holder renews it every heartbeat, so
a dead worker's slots come back within ``lease_s``. Items wait for a slot (backpressure) rather
than fail. Requests for slots from one process are coalesced into one script call, and a slot
freed while another item of the same process waits is handed over locally (a few times, then
given back so other processes get their turn). A process that gives slots back says so on a
pub/sub channel; processes with waiting calls ask Redis again when they hear it, not on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from shared.batching import Coalescer
from shared.keys import Keys
from shared.log_context import detached_context
from shared.lua import load_lua

log = logging.getLogger(__name__)

# While calls wait and no process says it gave slots back, ask anyway this often: a dead
# worker's slots come back by expiring, which nobody announces.
UNANNOUNCED_POLL_S = (0.05, 0.1)
FREED_RECONNECT_S = 1.0
LOCAL_HANDOVERS = 16  # uses of a slot in one process before it goes back to the cluster
IDLE_HOLD_S = 0.05


class LocalSlots:
    """One process's own bound on calls in flight to one server. A freed place goes to an urgent
    call first (an item taken back from a dead worker), then to the others in arrival order: a
    worker holds more claimed items than it can call at once, and a taken-back item must not
    queue behind all of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.urgent: deque[asyncio.Future[None]] = deque()
        self.normal: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        """Calls holding one of these places now."""
        return self.size - self.free

    async def acquire(self, urgent: bool = False) -> None:
        if self.free > 0 and not self.urgent and not self.normal:
            self.free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self.urgent if urgent else self.normal
        queue.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted just as it was cancelled: pass the place on
            elif granted in queue:
                queue.remove(granted)
            raise

    def release(self) -> None:
        for queue in (self.urgent, self.normal):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.free += 1

    @asynccontextmanager
    async def slot(self, urgent: bool = False) -> AsyncIterator[None]:
        await self.acquire(urgent)
        try:
            yield
        finally:
            self.release()


class ServerSlots:
    """One process's side of one server's semaphore: slots it holds, calls waiting for one, and a
    single poller that asks Redis for slots on behalf of every waiting call."""

    def __init__(self, limiter: ClusterLimiter, server: str, limit: int) -> None:
        self.limiter = limiter
        self.server = server
        self.limit = limit
        self.key = limiter.keys.slots(server)
        self.held: dict[str, int] = {}  # token -> local handovers so far
        self.waiters: deque[asyncio.Future[str]] = deque()
        self.idle: deque[str] = deque()  # held, unused, kept briefly for the next call
        self._sweeper: asyncio.TimerHandle | None = None
        self._poller: asyncio.Task[None] | None = None
        self._acquire = Coalescer(self._acquire_batch)
        self._release = Coalescer(self._release_batch)

    def _token(self) -> str:
        return f"{self.limiter.worker_id}:{next(self.limiter.counter)}"

    async def _acquire_batch(self, tokens: list[str]) -> list[bool]:
        granted = await self._acquire_tokens(tokens)
        return [i < granted for i in range(len(tokens))]

    async def _acquire_tokens(self, tokens: list[str]) -> int:
        """Ask for a slot per token in one script call; the first ``granted`` tokens now hold one."""
        expiry = int((time.time() + self.limiter.lease_s) * 1000)
        granted = int(
            await self.limiter.acquire_script(keys=[self.key], args=[self.limit, _now_ms(), expiry, *tokens])
        )
        for token in tokens[:granted]:
            self.held[token] = 0
        return granted

    async def _release_batch(self, tokens: list[str]) -> list[None]:
        async with self.limiter.client.pipeline(transaction=False) as pipe:
            pipe.zrem(self.key, *tokens)
            pipe.publish(self.limiter.keys.slots_freed(self.server), len(tokens))
            await pipe.execute()
        return [None] * len(tokens)

    async def take(self) -> str:
        if self.idle:
            return self.idle.popleft()
        if not self.waiters:  # nobody is queued ahead: ask the cluster at once
            token = self._token()
            if await self._acquire.submit(token):
                return token
            if self.idle:
                return self.idle.popleft()
        # Backpressure: queue for a slot freed here or won from the cluster by the poller.
        handed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiters.append(handed)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), context=detached_context())
        try:
            return await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self._hand(handed.result())  # won a slot just as it was cancelled: pass it on
            raise
        finally:
            if handed in self.waiters:
                self.waiters.remove(handed)

    async def _poll(self) -> None:
        """While calls wait, ask Redis for as many slots as there are waiters (never more than the
        limit): at once, then each time some process gives slots of this server back. One script
        call per pass for the whole process, however many calls wait."""
        freed = self.limiter.freed
        while any(not w.done() for w in self.waiters):
            seen = freed.generation(self.server)
            wanted = min(self.limit, sum(1 for w in self.waiters if not w.done()))
            if not wanted:
                return
            tokens = [self._token() for _ in range(wanted)]
            try:
                granted = await self._acquire_tokens(tokens)
            except Exception:  # a Redis blip: the waiters keep waiting, the next pass asks again
                granted = 0
            for token in tokens[:granted]:
                self._hand(token)
            if granted < wanted:
                await freed.wait(self.server, seen, random.uniform(*UNANNOUNCED_POLL_S))

    def _hand(self, token: str) -> None:
        """Give a held slot to the first live waiter, else keep it idle briefly."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(token)
                return
        # Nobody here waits now, but the next call usually comes within milliseconds: keep
        # the slot briefly instead of two round trips (give back, take again).
        self.idle.append(token)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_HOLD_S, self._sweep)

    async def give_back(self, token: str) -> None:
        handovers = self.held.get(token, 0)
        if handovers < LOCAL_HANDOVERS:
            self.held[token] = handovers + 1
            self._hand(token)
            return
        self.held.pop(token, None)
        await self._release.submit(token)

    def _sweep(self) -> None:
        """Give back the slots still idle since the last sweep."""
        self._sweeper = None
        if not self.idle:
            return
        tokens = list(self.idle)
        self.idle.clear()
        for token in tokens:
            self.held.pop(token, None)
        task = asyncio.ensure_future(self._release_batch(tokens))
        self.limiter.background.add(task)
        task.add_done_callback(self.limiter.background.discard)


class FreedSlots:
    """Word that some process gave slots back, per server: one pub/sub connection per process,
    on every server's channel. Each word bumps the server's generation; a poller that saw
    generation g before a failed ask waits for a later one, so word that came during the ask
    is not lost."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.pattern = keys.slots_freed("*")
        self.generations: defaultdict[str, int] = defaultdict(int)
        self.bumped: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None

    def generation(self, server: str) -> int:
        if self._listener is None:
            self._listener = asyncio.create_task(
                self._listen(), name="toolswarm-slots-freed", context=detached_context()
            )
        return self.generations[server]

    async def wait(self, server: str, seen: int, timeout: float) -> None:
        """Until the server's generation moves past ``seen``, or ``timeout`` seconds."""
        if self.generations[server] != seen:
            return
        bumped = self.bumped.setdefault(server, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bumped.wait(), timeout)

    def bump(self, server: str) -> None:
        self.generations[server] += 1
        bumped = self.bumped.pop(server, None)
        if bumped is not None:
            bumped.set()

    async def _listen(self) -> None:
        prefix = self.pattern[:-1]
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.pattern)
                async for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        self.bump(str(message["channel"])[len(prefix) :])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: waiters fall back to asking on a timer
                log.debug("slots-freed listener lost its connection: %s", exc)
                for server in list(self.bumped):
                    self.bump(server)
                await asyncio.sleep(FREED_RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None


class ClusterLimiter:
    """The per-process side of every server's cluster-wide semaphore."""

    def __init__(self, client: Any, keys: Keys, worker_id: str, lease_s: float) -> None:
        self.client = client
        self.keys = keys
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.counter = itertools.count()
        self.acquire_script = client.register_script(load_lua("acquire"))
        self.servers: dict[str, ServerSlots] = {}
        self.background: set[asyncio.Future[list[None]]] = set()
        self.freed = FreedSlots(client, keys)

    def _slots(self, server: str, limit: int) -> ServerSlots:
        slots = self.servers.get(server)
        if slots is None or slots.limit != limit:
            slots = self.servers[server] = ServerSlots(self, server, limit)
        return slots

    @asynccontextmanager
    async def slot(self, server: str, limit: int) -> AsyncIterator[None]:
        slots = self._slots(server, limit)
        token = await slots.take()
        try:
            yield
        finally:
            await slots.give_back(token)

    async def close(self) -> None:
        await self.freed.close()

    async def renew(self) -> None:
        """Extend every slot this process holds (called from the heartbeat)."""
        expiry = int((time.time() + self.lease_s) * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            for slots in self.servers.values():
                if slots.held:
                    pipe.zadd(slots.key, dict.fromkeys(slots.held, expiry), xx=True)
            await pipe.execute()


def _now_ms() -> int:
    return int(time.time() * 1000)


async def in_flight(client: Any, keys: Keys, server: str) -> int:
    """Calls in flight on a server across the cluster (slots held and not expired)."""
    return int(await client.zcount(keys.slots(server), _now_ms(), "+inf"))
