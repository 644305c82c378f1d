"""The state layer under contention: CAS records vs an append-only log, and what a commit costs.

- CAS and log modes at 1, 8 and 64 concurrent writers on one record/log: ops/s, conflict rate,
  p50/p99 latency of one update (CAS: read, transform, compare-and-swap, retried on conflict;
  log: one append, with a snapshotter folding and trimming every 500 events).
- The cost a committed result adds per item over a bare HSET of the same record (commit.lua:
  epoch and settled checks, result, counters, two stream appends, pub/sub), one item per call,
  and per item when batched as the workers do.
Last line: ``state: log/cas@64=X.XX commit_p50_ms=Y.YY``.

    python bench/state.py [--ops 3200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.embedded import EmbeddedRedis
from shared.eventlog import EventLog
from shared.jobview import JobView, apply_job_event
from shared.keys import Keys
from shared.models import ItemSpec, ResultRecord
from shared.settings import Settings
from shared.state import VersionedRecords
from shared.store import JobStore, Settlement, connect

WRITERS = (1, 8, 64)
SNAPSHOT_EVERY = 500


@dataclass
class Run:
    mode: str
    writers: int
    ops: int
    seconds: float
    conflicts: int
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies_ms)
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        conflict_rate = self.conflicts / (self.ops + self.conflicts)
        return (
            f"{self.mode:>3} @{self.writers:>2} writers: {self.rate:8.0f} ops/s  "
            f"conflicts {conflict_rate:6.1%}  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms"
        )


async def run_cas(url: str, writers: int, ops: int) -> Run:
    client = connect(url, max_connections=writers + 4)
    records = VersionedRecords(client)
    key = f"bench:cas:{uuid.uuid4().hex}"
    latencies: list[float] = []
    per_writer = ops // writers

    async def writer() -> None:
        for _ in range(per_writer):
            started = time.perf_counter()
            await records.update(key, lambda value: (value or 0) + 1)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    final = await records.get(key)
    assert final.value == per_writer * writers, "CAS lost an update"
    await client.aclose()
    return Run("cas", writers, per_writer * writers, elapsed, records.conflicts, latencies)


async def run_log(url: str, writers: int, ops: int) -> Run:
    client = connect(url, max_connections=writers + 4)
    name = f"bench:log:{uuid.uuid4().hex}"
    log = EventLog(client, f"{name}:events", f"{name}:snapshot", apply_job_event, JobView)
    latencies: list[float] = []
    per_writer = ops // writers
    done = asyncio.Event()

    async def writer() -> None:
        for i in range(per_writer):
            started = time.perf_counter()
            await log.append({"type": "item.settled", "index": str(i), "status": "succeeded"})
            latencies.append((time.perf_counter() - started) * 1000)

    async def snapshotter() -> None:
        while not done.is_set():
            await log.snapshot(min_tail=SNAPSHOT_EVERY)
            await asyncio.sleep(0.01)

    snapshots = asyncio.create_task(snapshotter())
    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    done.set()
    await snapshots
    view = (await log.read()).state
    assert view.succeeded == per_writer * writers, "the log lost an event"
    await client.aclose()
    return Run("log", writers, per_writer * writers, elapsed, 0, latencies)


async def commit_cost(url: str, samples: int) -> tuple[float, float, float]:
    """p50 of a bare HSET, of a one-item commit, and per item of a 100-item commit (ms)."""
    client = connect(url)
    store = JobStore(client, Keys(f"bench{uuid.uuid4().hex[:6]}"))
    total = samples + 100 * 20
    job_id = uuid.uuid4().hex[:16]
    await store.create_job(
        job_id, [ItemSpec(tool="echo", arguments={"text": "x"}, server="demo")] * total, ["demo"]
    )
    claims = {c.index: c for c in await store.claim(job_id, list(range(total)), "bench")}

    def settlement(index: int) -> Settlement:
        record = ResultRecord(
            item_id=f"{job_id}:{index}", job_id=job_id, index=index, tool="echo", server="demo",
            status="succeeded", attempts=1, worker="bench", duration_ms=1.0, finished_at_ms=1,
            result={"content": [{"type": "text", "text": "x"}], "structured_content": {"result": "x"}},
        )  # fmt: skip
        return Settlement(record=record, epoch=claims[index].epoch)

    hset_ms: list[float] = []
    commit_ms: list[float] = []
    for index in range(samples):  # interleaved, so both see the same machine
        s = settlement(index)
        payload = s.record.model_dump_json(exclude_none=True)
        started = time.perf_counter()
        await client.hset(f"bench:bare:{job_id}", str(index), payload)
        hset_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        outcome = await store.commit(job_id, [s])
        commit_ms.append((time.perf_counter() - started) * 1000)
        assert outcome.committed == 1
    batch_ms: list[float] = []
    for batch in range(20):
        settlements = [settlement(samples + batch * 100 + i) for i in range(100)]
        started = time.perf_counter()
        outcome = await store.commit(job_id, settlements)
        batch_ms.append((time.perf_counter() - started) * 1000 / 100)
        assert outcome.committed == 100
    await store.discard_job(job_id)
    await client.delete(f"bench:bare:{job_id}")
    await client.aclose()
    return statistics.median(hset_ms), statistics.median(commit_ms), statistics.median(batch_ms)


async def main(args: argparse.Namespace, url: str) -> None:
    runs: dict[tuple[str, int], Run] = {}
    for writers in WRITERS:
        for mode, runner in (("cas", run_cas), ("log", run_log)):
            run = await runner(url, writers, args.ops)
            runs[(mode, writers)] = run
            print(run.line(), flush=True)
    hset, commit, batched = await commit_cost(url, args.samples)
    print(f"bare HSET p50 {hset:.3f} ms; one-item commit p50 {commit:.3f} ms")
    print(f"batched commit (100 items a call, as workers do): {batched:.3f} ms/item")
    added = commit - hset
    print(f"a committed result adds {added:.3f} ms at p50 over a bare HSET (one item per call)")
    ratio = runs[("log", 64)].rate / runs[("cas", 64)].rate
    print(f"state: log/cas@64={ratio:.2f} commit_p50_ms={added:.2f}")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=3200, help="updates per configuration")
    parser.add_argument("--samples", type=int, default=2000, help="commit latency samples")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="toolswarm-bench-") as tmp:
        redis = EmbeddedRedis(Settings(state_dir=tmp))
        url = redis.start(publish=False)
        try:
            asyncio.run(main(args, url))
        finally:
            redis.stop()


if __name__ == "__main__":
    cli()
