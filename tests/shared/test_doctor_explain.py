"""The doctor's one line, as a pure function of what it found."""

from __future__ import annotations

import pytest

from shared.doctor import ChunkCount, JobDiagnosis, ServerHealth, Uncovered, explain
from shared.fleet import WorkerLife
from shared.models import ReduceStatus

WORKER = [WorkerLife(worker="host:1", pid=1, last_heartbeat_s=0.3)]


def job(**fields: object) -> JobDiagnosis:
    base: dict[str, object] = {"job_id": "j", "state": "running", "total": 10, "settled": 4, "unsettled": 6}
    return JobDiagnosis.model_validate({**base, **fields})


@pytest.mark.parametrize(
    ("diagnosis", "workers", "starts"),
    [
        (job(state="finished", settled=10, unsettled=0), WORKER, "finished: all 10 items settled"),
        (job(), [], "no live worker: 6 items wait"),
        (
            job(uncovered=Uncovered(chunks=1, items=6, for_s=4.0)),
            WORKER,
            "6 items in 1 chunks are covered by nothing (for 4 s)",
        ),
        (
            job(uncovered=Uncovered(items=6, whole_job=True)),
            WORKER,
            "nothing covers the job's unsettled items",
        ),
        (
            job(servers=[ServerHealth(server="demo", healthy=False, error="connection refused")]),
            WORKER,
            "held by the breaker: server demo (connection refused) is unhealthy",
        ),
        (job(expired_leases=2), WORKER, "2 items' leases expired"),
        (
            job(leases={"host:1": 6}, queued=ChunkCount(chunks=1, items=3)),
            WORKER,
            "running: 6 items in flight",
        ),
        (job(state="pending", queued=ChunkCount(chunks=1, items=6)), WORKER, "waiting for a worker"),
        (job(waiting_on_needs=3), WORKER, "3 items wait on items they need"),
        (
            job(settled=10, unsettled=0, reduce=ReduceStatus(status="running")),
            WORKER,
            "every item settled; its reduce is running",
        ),
    ],
)
def test_explain(diagnosis: JobDiagnosis, workers: list[WorkerLife], starts: str) -> None:
    assert explain(diagnosis, workers, stranded_after_s=10).startswith(starts)
