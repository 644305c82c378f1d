"""Every Redis key toolswarm uses, under one namespace.

A job's keys share the hash tag ``{job_id}`` so that, on a cluster, they live on one slot and
one Lua script can touch them all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class JobKeys:
    """The keys of one job."""

    meta: str  # hash: spec fields, counters (succeeded/failed/cancelled), state, timestamps
    items: str  # hash: index -> item spec (JSON)
    results: str  # hash: index -> result record (JSON); a field here means "settled"
    epochs: str  # hash: index -> fencing epoch, bumped on every claim
    running: str  # hash: index -> worker currently holding the item
    events: str  # stream: this job's item and job events
    notify: str  # pub/sub channel: a nudge per committed batch, for low-latency watchers
    snapshot: str  # hash: log-mode snapshot {state, last_id, count, at_ms}
    lost: str  # hash: index -> how many times the item's lease expired mid-call (poison detection)
    calling: str  # hash: index -> epoch under which the item's call started
    backlog: str  # list: chunks (JSON) not yet enqueued; fed one per finished chunk (fairness)
    chunks: str  # hash: chunk id -> chunk (JSON), for every chunk sent to the broker and not finished
    uncovered: str  # hash: chunk id (or "*" for the whole job) -> ms since the sweep found it uncovered
    steps: str  # hash: "INDEX:STEP" -> checkpointed step record (JSON) of an unsettled pipeline item
    failures: str  # hash: '["STEP","ERROR_TYPE"]' -> items failed so (cas mode; log mode folds events)
    waiting: str  # hash: index -> needs not yet settled, of an item with needs
    dependents: str  # hash: index -> the indexes (space-separated) of the items that need it
    needs: str  # hash: index -> [[KEY, INDEX], ...] of what an item needs (JSON)

    def all(self) -> list[str]:
        """Every key of the job (the pub/sub channel is not a key)."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "notify"]


@dataclass(frozen=True)
class ContextKeys:
    """The keys of one session's conversation context (see shared/context.py)."""

    meta: str  # hash: incarnation, generation, summary, appended, updated_at_ms
    window: str  # list: the window's records (JSON), oldest first
    compacting: str  # string: the token of the one compactor at work on the window (expires)

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class Keys:
    namespace: str = "toolswarm"

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:"

    def job(self, job_id: str) -> JobKeys:
        base = f"{self.prefix}job:{{{job_id}}}"
        return JobKeys(
            meta=base,
            items=f"{base}:items",
            results=f"{base}:results",
            epochs=f"{base}:epochs",
            running=f"{base}:running",
            events=f"{base}:events",
            notify=f"{base}:notify",
            snapshot=f"{base}:snapshot",
            lost=f"{base}:lost",
            calling=f"{base}:calling",
            backlog=f"{base}:backlog",
            chunks=f"{base}:chunks",
            uncovered=f"{base}:uncovered",
            steps=f"{base}:steps",
            failures=f"{base}:failures",
            waiting=f"{base}:waiting",
            dependents=f"{base}:dependents",
            needs=f"{base}:needs",
        )

    @property
    def jobs(self) -> str:
        """Sorted set of job ids by creation time (ms)."""
        return f"{self.prefix}jobs"

    @property
    def expiring(self) -> str:
        """Sorted set of ended jobs by the time (ms) their keys expire: a sorted set member cannot
        expire, so the reaper drops these from ``jobs`` (and the other global sets) when due."""
        return f"{self.prefix}expiring"

    @property
    def active(self) -> str:
        """Set of jobs not yet finished or cancelled: the ones the coverage sweep looks at."""
        return f"{self.prefix}active"

    @property
    def events(self) -> str:
        """Global stream of item and job events, capped in length."""
        return f"{self.prefix}events"

    @property
    def metrics(self) -> str:
        """Hash: the cluster's counters (see shared/metrics.py), added to by workers' heartbeats and
        by commit.lua; outside any job's hash tag, like ``leases``."""
        return f"{self.prefix}metrics"

    @property
    def leases(self) -> str:
        """Sorted set of leased items ("job_id:index") by lease expiry (ms); the reaper scans it.

        One set for all jobs keeps the reaper's scan a single range query; it is the one
        key a job's scripts touch outside the job's hash tag.
        """
        return f"{self.prefix}leases"

    @property
    def deliveries(self) -> str:
        """Sorted set of broker delivery tags of chunks a live worker is running, by expiry (ms):
        an unacked chunk message that no live worker claims here was orphaned by a dead one."""
        return f"{self.prefix}deliveries"

    def slots(self, server: str) -> str:
        """Sorted set: the cluster-wide concurrency slots of a server, scored by expiry (ms)."""
        return f"{self.prefix}slots:{server}"

    def slots_freed(self, server: str) -> str:
        """Pub/sub channel: a process gave slots of the server back (wakes other processes' waiters)."""
        return f"{self.prefix}slots-freed:{server}"

    def probe(self, server: str) -> str:
        """The last probe of a server (JSON); its ``ok`` is the circuit breaker's state."""
        return f"{self.prefix}probe:{server}"

    def probe_lock(self, server: str) -> str:
        return f"{self.prefix}probe:{server}:lock"

    def tools(self, server: str) -> str:
        """The server's tools (JSON list of name, description, input schema), from its last good probe."""
        return f"{self.prefix}catalog:{server}"

    @property
    def backlogged(self) -> str:
        """Set of jobs whose backlog still holds chunks (the reaper feeds any that stalled)."""
        return f"{self.prefix}backlogged"

    @property
    def reaper_lock(self) -> str:
        return f"{self.prefix}reaper:lock"

    @property
    def sweep_due(self) -> str:
        """Present (with expiry) while the coverage sweep is not due: it runs once per interval."""
        return f"{self.prefix}sweep:after"

    def handoff(self, token_digest: str) -> str:
        """Hash: a handoff's receipt by its idempotency token (digested: a token never names a key):
        {status: processing | completed, owner, until_ms, result, envelope}."""
        return f"{self.prefix}handoff:{token_digest}"

    def handoff_context(self, handoff_id: str) -> str:
        """A handoff's accumulated context when it is too large to travel in the envelope."""
        return f"{self.prefix}handoff-context:{handoff_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    def worker(self, worker_id: str) -> str:
        """Liveness record of one worker process (expires unless renewed)."""
        return f"{self.prefix}worker:{worker_id}"

    @property
    def workers_pattern(self) -> str:
        return f"{self.prefix}worker:*"

    def context(self, session_id: str) -> ContextKeys:
        """A session's context keys, under the hash tag ``{session_id}`` (a validated UUID only)."""
        base = f"{self.prefix}ctx:{{{session_id}}}"
        return ContextKeys(meta=base, window=f"{base}:window", compacting=f"{base}:compacting")

    @property
    def context_sessions(self) -> str:
        """Sorted set of session ids by last access (ms): the context store's LRU order and cap.
        Like ``leases``, the one key the context scripts touch outside a session's hash tag."""
        return f"{self.prefix}ctx-sessions"

    def queue(self, server: str) -> str:
        """The Celery queue carrying chunks for one MCP server."""
        return f"{self.namespace}.{server}"
