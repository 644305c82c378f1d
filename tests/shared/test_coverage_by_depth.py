"""On a broker that shows only queue depths (AMQP), which outstanding chunks count as uncovered."""

from __future__ import annotations

import pytest

from shared.coverage import JobCoverage
from shared.models import Chunk

ON_A = Chunk(job_id="j", server="a", items=[0, 1])
ON_B = Chunk(job_id="j", server="b", items=[2])


def coverage(running: int, records: list[Chunk]) -> JobCoverage:
    return JobCoverage(
        job_id="j",
        state="running",
        total=3,
        cancel_requested=False,
        settled=0,
        running=running,
        backlog_chunks=0,
        records={c.id: c for c in records},
        uncovered_since={},
    )


@pytest.mark.parametrize(
    ("running", "records", "waiting", "stranded"),
    [
        (0, [ON_A, ON_B], {"a": 0, "b": 0}, [ON_A, ON_B]),  # idle, queues empty: lost
        (0, [ON_A, ON_B], {"a": 0, "b": 4}, [ON_A]),  # b's may still be among those waiting
        (1, [ON_A, ON_B], {"a": 0, "b": 0}, []),  # an item runs: a chunk may be being run
        (0, [ON_A], None, []),  # depths unreadable: nothing is believed lost
        (0, [ON_A], {}, []),  # a queue not read counts as holding messages
        (0, [], {"a": 0}, []),  # nothing outstanding: the whole-job check's case, not this one
    ],
)
def test_an_idle_job_with_empty_queues_has_its_chunks_uncovered(
    running: int, records: list[Chunk], waiting: dict[str, int] | None, stranded: list[Chunk]
) -> None:
    assert coverage(running, records).stranded_by_depth(waiting) == stranded
