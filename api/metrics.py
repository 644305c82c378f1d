"""The cluster's ``/metrics``, read from Redis at each scrape.

The route reads one :class:`ClusterReading` (the workers' counters added up, every server's load,
breaker and queue, jobs by state, live workers) asynchronously, and a Collector turns it into
metric families, rendered by prometheus_client. The cost of a scrape: a few commands per server,
and a script call per 1000 jobs in the jobs index (retention keeps it to the jobs of the last job_ttl_s).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from shared.fleet import ServerView, live_workers, server_views
from shared.lua import load_lua
from shared.metric_families import PREFIX, counter_families, per_server_gauge
from shared.metrics import Field, cluster_counters
from shared.models import JobState
from shared.settings import Settings
from shared.store import JobStore

JOB_STATES: tuple[str, ...] = get_args(JobState)
JOB_STATES_PER_CALL = 1000  # jobs one script call looks at: about 10 ms of Redis's time, loaded
JOB_ID_MARK = "\x00"  # stands for the job id when splitting a meta key into prefix and suffix


@dataclass(frozen=True)
class ClusterReading:
    counters: dict[Field, float] = field(default_factory=dict)
    servers: list[ServerView] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)
    workers: int = 0


async def jobs_by_state(store: JobStore) -> dict[str, int]:
    """How many jobs of the jobs index are in each state now (a job whose keys are gone is not
    counted), counted inside Redis a slice at a time (see job_states.lua)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    prefix, _, suffix = store.keys.job(JOB_ID_MARK).meta.partition(JOB_ID_MARK)
    script = store.client.register_script(load_lua("job_states"))
    start = 0
    while True:
        reply = await script(keys=[store.keys.jobs], args=[prefix, suffix, start, JOB_STATES_PER_CALL])
        for state, count in zip(reply[1::2], reply[2::2], strict=True):
            counts[state] = counts.get(state, 0) + int(count)
        start = int(reply[0])
        if start == 0:
            return counts


async def read_cluster(store: JobStore, settings: Settings) -> ClusterReading:
    return ClusterReading(
        counters=await cluster_counters(store.client, store.keys),
        servers=await server_views(store, settings),
        jobs=await jobs_by_state(store),
        workers=len(await live_workers(store)),
    )


class ClusterCollector:
    def __init__(self, reading: ClusterReading) -> None:
        self.reading = reading

    def collect(self) -> Iterable[Metric]:
        reading = self.reading
        yield from counter_families(reading.counters)
        servers = reading.servers
        yield per_server_gauge(
            "calls_in_flight",
            "Calls holding one of the server's cluster-wide slots now.",
            ((s.name, s.in_flight) for s in servers),
        )
        yield per_server_gauge(
            "max_concurrency",
            "The server's cluster-wide limit on calls in flight (max_concurrency).",
            ((s.name, s.max_concurrency) for s in servers),
        )
        yield per_server_gauge(
            "queued_chunks",
            "Chunk messages waiting in the server's broker queue (absent where the broker cannot be read).",
            ((s.name, s.queued_chunks) for s in servers if s.queued_chunks is not None),
        )
        yield per_server_gauge(
            "breaker_open",
            "1 while the server's circuit breaker is open (its last probe failed), else 0; absent before "
            "its first probe.",
            ((s.name, 0 if s.healthy else 1) for s in servers if s.healthy is not None),
        )
        jobs = GaugeMetricFamily(PREFIX + "jobs", "Jobs by state now.", labels=["state"])
        for state, count in reading.jobs.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            PREFIX + "workers", "Live worker processes (heartbeats).", value=reading.workers
        )


def render(reading: ClusterReading) -> bytes:
    """The Prometheus text exposition of ``reading``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(reading))
    return generate_latest(registry)
