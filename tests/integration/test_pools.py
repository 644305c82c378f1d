"""Worker pools: each pool serves only its servers, and a pipeline item crosses between pools by
handoff envelopes, through kill -9 on both sides, with no finished step run again."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from shared.store import JobStore
from tests.harness import Cluster, demo_http_server, http_demo, make_cluster, wait_until
from tests.integration.test_failover import FAST_LEASES, settled_exactly_once, worker_pid
from tests.integration.test_pipelines import step_starts, submit
from workers.demo_server import document

pytestmark = pytest.mark.integration

POOL_A = {"TOOLSWARM_WORKER__SERVERS": json.dumps(["extract"])}
POOL_B = {"TOOLSWARM_WORKER__SERVERS": json.dumps(["summarize"])}

# extract: fetch → summarize: nap, parse → extract: add (words + doc id): A → B → A.
PIPELINE = {
    "steps": [
        {
            "name": "fetch",
            "tool": "fetch",
            "server": "extract",
            "arguments": {"doc_id": {"$from": "input.doc"}},
        },
        {"name": "nap", "tool": "sleep", "server": "summarize", "arguments": {"ms": 250}},
        {
            "name": "parse",
            "tool": "parse",
            "server": "summarize",
            "arguments": {"text": {"$from": "steps.fetch.text"}},
        },
        {
            "name": "total",
            "tool": "add",
            "server": "extract",
            "arguments": {"a": {"$from": "steps.parse.structured.words"}, "b": {"$from": "input.doc"}},
        },
    ]
}
ORDER = ["fetch", "nap", "parse", "total"]


def pool_holders(cluster: Cluster, job_id: str) -> Counter[str]:
    async def read(store: JobStore) -> Counter[str]:
        running = await store.client.hgetall(store.keys.job(job_id).running)
        return Counter(value.split()[0] for value in running.values())

    found: Counter[str] = cluster.run(cluster.with_store(read))
    return found


@pytest.mark.slow
def test_two_pools_hand_items_across_through_kills(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    record_file = tmp_path / "calls.jsonl"
    with demo_http_server("--record", str(record_file)) as url:
        cluster = make_cluster(
            tmp_path,
            redis_url,
            {"extract": http_demo(url, max_concurrency=32), "summarize": http_demo(url, max_concurrency=32)},
            extra=FAST_LEASES,
        )
        stop_workers.append(cluster)
        pool_a = cluster.start_workers(1, **POOL_A)
        pool_b = cluster.start_workers(1, **POOL_B)
        pool_a += cluster.start_workers(1, **POOL_A)
        pool_b += cluster.start_workers(1, **POOL_B)
        total = 500
        job_id = submit(cluster, [{"input": {"doc": i}} for i in range(total)], pipeline=PIPELINE)

        def pids_holding(pool: list[int]) -> list[int]:
            held = pool_holders(cluster, job_id)
            return [pid for pid in (worker_pid(w) for w, _ in held.most_common()) if pid in pool]

        # kill -9 a receiving worker (pool B) while it holds items, then a sending one (pool A).
        for pool, env in ((pool_b, POOL_B), (pool_a, POOL_A)):
            pids = [p.pid for p in pool if p.poll() is None]
            victim = wait_until(lambda pids=pids: pids_holding(pids), 60, "a pool worker holding items")[0]
            os.kill(victim, signal.SIGKILL)
            pool += cluster.start_workers(1, **env)

        status = cluster.wait_for_job(job_id, timeout=120)
        assert status.succeeded == total, status
        records = settled_exactly_once(cluster, job_id, total)

    for record in records:
        assert [step.name for step in record.steps or []] == ORDER
        words = len(document(record.index).split())
        assert record.result is not None and record.result.text() == str(float(words + record.index))
    starts = step_starts(record_file, job_id)
    assert set(starts) == set(range(total))
    for index, calls in starts.items():
        for earlier, later in itertools.pairwise(ORDER):
            assert max(calls[earlier]) < min(calls[later]), f"item {index}: {earlier} ran after {later} began"
    # Items went from pool to pool in chunks (each worker's chunk reports say how many it sent on).
    handed = [int(n) for n in re.findall(r"'handed_off': (\d+)", cluster.worker_logs(tail=10**7))]
    assert sum(handed) >= 2 * total and max(handed) > 1
