"""What a worker process hands the executor: its store, MCP pool, committers, the items it holds,
and the gate that lets an isolated chunk run alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator

from shared.committer import BatchCommitter, Checkpointer
from shared.context import ContextStore
from shared.handoff import HandoffStore
from shared.jobs import Enqueuer
from shared.limiter import ClusterLimiter, LocalSlots
from shared.mcp_client import ToolCaller
from shared.metrics import Tally
from shared.models import ResultRecord
from shared.probes import Breaker
from shared.settings import Settings
from shared.store import JobPlan, JobStore

if TYPE_CHECKING:  # pools.py builds on this module
    from shared.pools import HandoffSender

MAX_CACHED_PLANS = 1000


class Draining(Exception):
    """The worker is shutting down: an item that has not started gives its lease back instead."""


class ChunkHandedBack(Exception):
    """The worker began shutting down before this chunk claimed anything: its message goes back to
    the queue whole (and its record stays), rather than being acknowledged unrun."""


WAITING, CALLING, RELEASED = "waiting", "calling", "released"


class IsolationGate:
    """Chunks share the worker process, except an isolated one: it waits until the chunks running
    here have finished, keeps new ones from starting meanwhile, and runs with nothing beside it."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            async with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and not self._sharing)
            finally:
                self._waiting_alone -= 1
                self._changed.notify_all()  # a cancelled waiter must not leave shared() asleep
            self._alone = True
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()


@dataclass
class ExecutionContext:
    """What a worker process hands the executor: its store, its MCP pool, its committer, and the
    items it holds leases on (renewed by the heartbeat, released on shutdown)."""

    settings: Settings
    store: JobStore
    caller: ToolCaller
    committer: BatchCommitter
    worker_id: str
    limits: dict[str, LocalSlots] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)  # "job_id:index" -> WAITING | CALLING | RELEASED
    item_tasks: dict[str, asyncio.Task[tuple[ResultRecord | None, bool] | None]] = field(default_factory=dict)
    draining: bool = False
    limiter: ClusterLimiter | None = None  # cluster-wide max_concurrency; None: per process only
    breaker: Breaker | None = None  # holds items of unhealthy servers; None: never holds
    enqueuer: Enqueuer | None = None  # feeds a job's backlog as its chunks finish
    checkpointer: Checkpointer | None = None  # pipeline steps' checkpoints; built from store if None
    job_plans: dict[str, JobPlan] = field(default_factory=dict)
    validators: dict[tuple[str, str], Draft202012Validator | None] = field(default_factory=dict)
    # Items whose call started since the last heartbeat, which records them (see expire.lua).
    started_calls: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    # Broker delivery tags of the chunk messages running here, held by the heartbeat.
    deliveries: set[str] = field(default_factory=set)
    isolation: IsolationGate = field(default_factory=IsolationGate)
    # The servers this worker's pool serves (every configured one unless ``worker.servers`` says).
    served: set[str] = field(default_factory=set)
    handoffs: HandoffStore | None = None  # envelopes of items handed between pools (see pools.py)
    handoff_sender: HandoffSender | None = None  # made on the first handoff
    context: ContextStore | None = None  # sessions' contexts (items with a session record calls there)
    metrics: Tally = field(default_factory=Tally)  # this process's counters (flushed by the heartbeat)

    def limit(self, server: str) -> LocalSlots:
        slots = self.limits.get(server)
        if slots is None:
            config = self.settings.server(server)
            size = min(config.max_concurrency, self.settings.worker.calls_in_flight)
            slots = self.limits[server] = LocalSlots(size)
        return slots

    @asynccontextmanager
    async def call_slot(self, server: str, urgent: bool = False) -> AsyncIterator[None]:
        """A place for one call: this process's own bound (urgent items first), then the server's
        cluster-wide slot."""
        async with self.limit(server).slot(urgent):
            if self.limiter is None:
                yield
            else:
                async with self.limiter.slot(server, self.settings.server(server).max_concurrency):
                    yield

    def __post_init__(self) -> None:
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(self.store)
        if not self.served:
            self.served = self.settings.served()

    async def job_plan(self, job_id: str) -> JobPlan:
        """The job's retry override and pipeline (cached: a job never changes them)."""
        plan = self.job_plans.get(job_id)
        if plan is None:
            if len(self.job_plans) > MAX_CACHED_PLANS:
                self.job_plans.clear()
            plan = self.job_plans[job_id] = await self.store.job_plan(job_id)
        return plan

    async def validator(self, server: str, tool: str) -> Draft202012Validator | None:
        """A validator of the tool's input schema as the server lists it (None: not listed)."""
        key = (server, tool)
        if key not in self.validators:
            schema: dict[str, Any] | None = await self.caller.input_schema(server, tool)
            self.validators[key] = Draft202012Validator(schema) if schema is not None else None
        return self.validators[key]

    def take_started_calls(self) -> list[tuple[str, int, int]]:
        started = list(self.started_calls.values())
        self.started_calls.clear()
        return started

    def leased(self) -> list[str]:
        return [member for member, state in self.held.items() if state != RELEASED]
