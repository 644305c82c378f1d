"""Prometheus metric families from counters (a worker's Tally, or the cluster's hash) and gauges.

The same names serve a worker's ``/metrics`` (its own process) and the API's (the cluster): sum a
counter over the workers, or read it from the API, not both. Labels are bounded: server, tool,
outcome, status, state; never a job or item id.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from shared.metrics import (
    CALL_DURATION_BUCKET,
    CALL_DURATION_SUM,
    CALLS,
    CHUNKS,
    COMMITS_REFUSED,
    DURATION_LABELS,
    ITEMS_SETTLED,
    LEASES_LOST,
    LEASES_TAKEN_BACK,
    RETRIES,
    Field,
)

PREFIX = "toolswarm_"


@dataclass(frozen=True)
class CounterSpec:
    field: str  # the counter's name in a Tally and in the Redis hash
    metric: str  # its Prometheus name, without _total
    documentation: str
    labels: tuple[str, ...] = ()


COUNTERS = (
    CounterSpec(
        CALLS,
        "calls",
        "Tool calls of items and pipeline steps, retries included; outcome is succeeded or the error type.",
        ("server", "tool", "outcome"),
    ),
    CounterSpec(RETRIES, "retries", "Attempts of tool calls after their first.", ("server",)),
    CounterSpec(CHUNKS, "chunks", "Chunk messages run by workers.", ("server",)),
    CounterSpec(
        LEASES_LOST,
        "leases_lost",
        "Items a worker ran whose lease another worker had taken over, so their result was refused.",
        ("server",),
    ),
    CounterSpec(LEASES_TAKEN_BACK, "leases_taken_back", "Items whose expired lease a reaper took back."),
    CounterSpec(ITEMS_SETTLED, "items_settled", "Items settled, by result status.", ("status",)),
    CounterSpec(
        COMMITS_REFUSED,
        "commits_refused",
        "Results refused at commit: the item was settled already or its lease epoch had moved on.",
    ),
)


def counter_families(counters: Mapping[Field, float]) -> list[Metric]:
    """Every counter's family and the call duration histogram. A counter without labels shows 0
    before it first moves; a labelled one has a sample per label set that has moved."""
    specs = {spec.field: spec for spec in COUNTERS}
    families = {
        name: CounterMetricFamily(PREFIX + spec.metric, spec.documentation, labels=list(spec.labels))
        for name, spec in specs.items()
    }
    seen: set[str] = set()
    for field, value in sorted(counters.items()):
        spec = specs.get(field[0])
        if spec is not None and len(field) == len(spec.labels) + 1:
            families[field[0]].add_metric(list(field[1:]), value)
            seen.add(field[0])
    for name, spec in specs.items():
        if not spec.labels and name not in seen:
            families[name].add_metric([], 0)
    return [*families.values(), duration_family(counters)]


def duration_family(counters: Mapping[Field, float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        PREFIX + "call_duration_seconds",
        "Duration of tool calls (retries and their backoff included), by the server that answered.",
        labels=["server"],
    )
    buckets: dict[str, dict[str, float]] = defaultdict(dict)
    sums: dict[str, float] = {}
    for field, value in counters.items():
        if field[0] == CALL_DURATION_BUCKET and len(field) == 3:
            buckets[field[1]][field[2]] = value
        elif field[0] == CALL_DURATION_SUM and len(field) == 2:
            sums[field[1]] = value
    for server in sorted(buckets):
        cumulative = 0.0
        points = []
        for label in DURATION_LABELS:
            cumulative += buckets[server].get(label, 0)
            points.append((label, cumulative))
        family.add_metric([server], points, sum_value=sums.get(server, 0.0))
    return family


def per_server_gauge(name: str, documentation: str, values: Iterable[tuple[str, float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=["server"])
    for server, value in values:
        family.add_metric([server], value)
    return family
