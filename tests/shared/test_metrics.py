"""The metric counters' pure rules: buckets, the tool label cap, hash fields, families."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from shared.metric_families import counter_families
from shared.metrics import (
    CALL_DURATION_BUCKET,
    MAX_TOOLS_PER_SERVER,
    OTHER_TOOL,
    Tally,
    decode_field,
    encode_field,
)


class Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposed(tally: Tally) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(counter_families(tally.snapshot())))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [(0.0, "0.005"), (0.005, "0.005"), (0.0051, "0.01"), (1.0, "1.0"), (119.0, "120.0"), (500.0, "+Inf")],
)
def test_a_duration_lands_in_the_first_bucket_whose_bound_it_does_not_exceed(
    seconds: float, bucket: str
) -> None:
    tally = Tally()
    tally.call("s", "t", "succeeded", seconds, 1)
    buckets = {f[2]: v for f, v in tally.snapshot().items() if f[0] == CALL_DURATION_BUCKET}
    assert buckets == {bucket: 1}


def test_the_histogram_is_cumulative_and_counts_every_call() -> None:
    tally = Tally()
    for seconds in (0.001, 0.02, 0.02, 3.0):
        tally.call("s", "t", "succeeded", seconds, 1)
    samples = exposed(tally)
    bucket = "toolswarm_call_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.005"), ("server", "s")))] == 1
    assert samples[(bucket, (("le", "0.025"), ("server", "s")))] == 3
    assert samples[(bucket, (("le", "2.5"), ("server", "s")))] == 3
    assert samples[(bucket, (("le", "+Inf"), ("server", "s")))] == 4
    assert samples[("toolswarm_call_duration_seconds_count", (("server", "s"),))] == 4
    assert samples[("toolswarm_call_duration_seconds_sum", (("server", "s"),))] == pytest.approx(3.041)


def test_retries_are_attempts_after_the_first_and_unlabelled_counters_start_at_zero() -> None:
    tally = Tally()
    tally.call("s", "t", "retries_exhausted", 0.1, 4)
    tally.call("s", "t", "succeeded", 0.1, 1)
    samples = exposed(tally)
    assert samples[("toolswarm_retries_total", (("server", "s"),))] == 3
    assert samples[("toolswarm_commits_refused_total", ())] == 0
    assert samples[("toolswarm_leases_taken_back_total", ())] == 0
    outcomes = ("outcome", "retries_exhausted"), ("server", "s"), ("tool", "t")
    assert samples[("toolswarm_calls_total", outcomes)] == 1


def test_tools_past_the_cap_of_a_server_are_counted_as_other() -> None:
    tally = Tally()
    for i in range(MAX_TOOLS_PER_SERVER + 5):
        tally.call("s", f"tool{i}", "succeeded", 0.01, 1)
    tally.call("s", "tool0", "succeeded", 0.01, 1)  # one it already knows keeps its label
    tally.call("other-server", "tool999", "succeeded", 0.01, 1)  # the cap is per server
    tools = {f[2]: v for f, v in tally.snapshot().items() if f[0] == "calls" and f[1] == "s"}
    assert len(tools) == MAX_TOOLS_PER_SERVER + 1
    assert tools[OTHER_TOOL] == 5 and tools["tool0"] == 2
    assert ("calls", "other-server", "tool999", "succeeded") in tally.snapshot()


@pytest.mark.parametrize("field", [("calls", "a", "b/c", 'd"e'), ("commits_refused",), ("settled", "ok")])
def test_a_hash_field_reads_back_as_it_was_written(field: tuple[str, ...]) -> None:
    assert decode_field(encode_field(field)) == field


@pytest.mark.parametrize("raw", ["", "calls", "[]", "[1]", '{"a": 1}', '["a", 2]'])
def test_a_field_that_is_not_a_counter_is_ignored(raw: str) -> None:
    assert decode_field(raw) is None
