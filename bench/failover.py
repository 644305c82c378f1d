"""Failover under repeated kill -9: how fast a dead worker's items run again, and that none is
lost or committed twice.

Default settings (leases, heartbeats, reaper), the demo MCP server over streamable HTTP, N
workers, a job of slow items. While it runs, a random worker holding items is killed with
SIGKILL (and a fresh one started) again and again. For every item a killed worker held, the
time from the kill until the item started again elsewhere is taken from its committed result
(finished_at - duration). Duplicate commits are counted from the item.settled events.
Items that end ``poison`` are counted: none of these calls misbehaves, so every one would be a
bystander wrongly blamed. Last line: ``failover: p99_s=X.X lost=N duplicates=M poison=P``.

    python bench/failover.py [--kills 20] [--workers 4] [--items 4000] [--sleep-ms 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.embedded import EmbeddedRedis
from shared.models import ResultRecord
from shared.settings import Settings
from shared.store import JobStore
from tests.harness import Cluster, demo_http_server, http_demo, make_cluster


def held_by_worker(cluster: Cluster, job_id: str) -> dict[str, list[int]]:
    async def read(store: JobStore) -> dict[str, list[int]]:
        running = await store.client.hgetall(store.keys.job(job_id).running)
        held: dict[str, list[int]] = {}
        for index, value in running.items():
            held.setdefault(value.split()[0], []).append(int(index))
        return held

    result: dict[str, list[int]] = cluster.run(cluster.with_store(read))
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--sleep-ms", type=int, default=1000)
    parser.add_argument("--between-kills-s", type=float, default=1.5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="toolswarm-failover-") as tmp:
        workdir = Path(tmp)
        redis = EmbeddedRedis(Settings(state_dir=tmp))
        url = redis.start(publish=False)
        try:
            with demo_http_server() as server_url:
                run(args, workdir, url, server_url)
        finally:
            redis.stop()


def run(args: argparse.Namespace, workdir: Path, redis_url: str, server_url: str) -> None:
    cluster = make_cluster(workdir, redis_url, {"demo": http_demo(server_url, max_concurrency=256)})
    try:
        cluster.start_workers(args.workers)
        items = workdir / "items.jsonl"
        items.write_text("".join(json.dumps({"tool": "sleep", "arguments": {"ms": args.sleep_ms}}) + "\n"
                                 for _ in range(args.items)))  # fmt: skip
        out = cluster.cli("submit", str(items), "--server", "demo", "--json")
        assert out.returncode == 0, out.stderr
        job_id = json.loads(out.stdout)["job_id"]
        submitted = time.monotonic()

        killed_at: dict[int, float] = {}  # item -> time of the last kill of a worker holding it
        kills = 0
        rng = random.Random(11)
        time.sleep(2)
        while kills < args.kills:
            held = {w: ix for w, ix in held_by_worker(cluster, job_id).items() if _alive(w)}
            if not held:
                if cluster.run(cluster.with_store(lambda s: s.status(job_id))).done:
                    print(f"job finished after {kills} kills; use more --items for more kills")
                    break
                time.sleep(0.1)
                continue
            victim = rng.choice(sorted(held))
            pid = int(victim.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            now = time.time()
            for index in held[victim]:
                killed_at[index] = now
            kills += 1
            print(f"kill {kills:>2}: worker {victim} holding {len(held[victim])} items", flush=True)
            for worker in [w for w in cluster.workers if w.pid == pid]:
                worker.wait()  # reap it, so it no longer looks alive
            cluster.workers = [w for w in cluster.workers if w.pid != pid]
            cluster.start_workers(1)
            time.sleep(args.between_kills_s)

        kills_done = time.monotonic() - submitted
        status = cluster.wait_for_job(job_id, timeout=600)
        print(
            f"kills done {kills_done:.0f} s after submit; job done after {time.monotonic() - submitted:.0f} s"
        )
        records = [
            ResultRecord.model_validate_json(line)
            for line in cluster.cli("results", job_id).stdout.splitlines()
        ]

        async def settled_events(store: JobStore) -> Counter[int]:
            entries = await store.client.xrange(store.keys.events)
            return Counter(
                int(f["index"])
                for _, f in entries
                if f.get("job_id") == job_id and f["type"] == "item.settled"
            )

        settled = cluster.run(cluster.with_store(settled_events))
        refused = cluster.run(cluster.with_store(lambda s: s.refused_commits(job_id)))

        async def suspects(store: JobStore) -> int:
            lost = await store.client.hkeys(store.keys.job(job_id).lost)
            return sum(1 for field in lost if field.endswith(":suspect"))

        isolated = cluster.run(cluster.with_store(suspects))
    finally:
        cluster.stop_workers()

    by_index = {r.index: r for r in records}
    delays = []
    for index, kill_time in killed_at.items():
        record = by_index.get(index)
        if record is not None and record.status == "succeeded":
            restarted = (record.finished_at_ms - record.duration_ms) / 1000
            delays.append(max(0.0, restarted - kill_time))
    lost = args.items - len(by_index)
    duplicates = sum(count - 1 for count in settled.values() if count > 1)
    print(f"job {status.state}: {status.succeeded} succeeded, {status.failed} failed of {status.total}")
    print(f"kills: {kills}; items held by killed workers: {len(killed_at)}; late commits refused: {refused}")
    print(f"restored by the coverage sweep: {status.restored_items} items")
    if delays:
        p50, p90, worst = statistics.median(delays), percentile(delays, 0.9), max(delays)
        print(f"kill → started elsewhere: p50 {p50:.1f} s, p90 {p90:.1f} s, max {worst:.1f} s")
    failed_kinds = Counter(r.error.type for r in records if r.error is not None)
    if failed_kinds:
        print(f"failures by type: {dict(failed_kinds)}")
    poison = failed_kinds.get("poison", 0)
    print(f"isolated: {isolated} items lost their lease max_lease_losses times and ran once more alone")
    print(f"poison: {poison} items (bystanders of the kills; the rule is in shared/reaper.py)")
    p99 = percentile(delays, 0.99) if delays else float("nan")
    print(f"failover: p99_s={p99:.1f} lost={lost} duplicates={duplicates} poison={poison}")


def _alive(worker_id: str) -> bool:
    try:
        os.kill(int(worker_id.rsplit(":", 1)[1]), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


if __name__ == "__main__":
    main()
