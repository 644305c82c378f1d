"""The cluster's ``/metrics``, read from Redis at each scrape.

The route reads one :class:`ClusterReading` (the workers' counters added up, every server's load,
breaker and queue, jobs by state, live workers) asynchronously, and a Collector turns it into
metric families, rendered by prometheus_client. The cost of a scrape: a few commands per server,
and one HGET per job in the jobs index (which retention keeps to the jobs of the last job_ttl_s).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from shared.fleet import ServerView, live_workers, server_views
from shared.metric_families import PREFIX, counter_families, per_server_gauge
from shared.metrics import Field, cluster_counters
from shared.models import JobState
from shared.settings import Settings
from shared.store import JobStore

JOB_STATES: tuple[str, ...] = get_args(JobState)
STATES_READ_PER_ROUND_TRIP = 1000


@dataclass(frozen=True)
class ClusterReading:
    counters: dict[Field, float] = field(default_factory=dict)
    servers: list[ServerView] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)
    workers: int = 0


async def jobs_by_state(store: JobStore) -> dict[str, int]:
    """How many jobs of the jobs index are in each state now (a job whose keys are gone is not
    counted)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    start = 0
    while True:
        job_ids = await store.client.zrange(store.keys.jobs, start, start + STATES_READ_PER_ROUND_TRIP - 1)
        if not job_ids:
            return counts
        async with store.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(store.keys.job(job_id).meta, "state")
            states = await pipe.execute()
        for state in states:
            if state in counts:
                counts[state] += 1
        start += len(job_ids)


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
