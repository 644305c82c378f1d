"""Failover under repeated kill -9 or network partitions: how fast a lost worker's items run
again, and that none is lost or committed twice.

Default settings (leases, heartbeats, reaper), the demo MCP server over streamable HTTP, N
workers, a job of slow items. While it runs, a random worker holding items is disrupted again
and again:

- kill mode (the default): the worker is killed with SIGKILL and a fresh one started;
- ``--partition``: each worker runs on a host of its own (a network namespace; Redis and the MCP
  server on two more, see tests/netns.py), and the worker's host is cut off the network for
  ``--partition-s`` seconds, then healed. The worker lives on: its late commits must be refused.
  A healed host counts as down until its worker heartbeats again, and ``--max-down`` [1] hosts
  are down at once (kill mode, too, takes one worker away at a time).

For every item a disrupted worker held, the time from the disruption until the item started
again elsewhere is taken from its committed result (finished_at - duration). Duplicate commits
are counted from the item.settled events. Items that end ``poison`` are counted: none of these
calls misbehaves, so every one would be a bystander wrongly blamed. Last line:
``failover: p99_s=X.X lost=N duplicates=M poison=P``.

    python bench/failover.py [--kills 20] [--workers 4] [--items 4000] [--sleep-ms 1000]
    python bench/failover.py --partition [--partitions 20] [--partition-s 8] [--max-down 1]
        [--items 16000] ...  (root, Linux)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.processes import stop_processes, wait_for_port
from shared.embedded import EmbeddedRedis
from shared.models import ResultRecord
from shared.settings import Settings
from shared.store import JobStore
from tests.harness import Cluster, demo_http_server, http_demo, make_cluster
from tests.multihost import MultiHostCluster, multihost_cluster
from tests.netns import Host, Network, unavailable_reason

DEMO_PORT = 8765  # on the MCP host of its own, in --partition mode
REJOIN_TIMEOUT_S = 120.0
# A partition takes a host away for --partition-s and one host is down at a time, so 20 of them
# take about four times as long as 20 kills: the job is as much bigger.
KILL_ITEMS, PARTITION_ITEMS = 4000, 16000


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


class Disruptor(Protocol):
    """What happens to a worker holding items: killed, or cut off the network."""

    what: str  # "kill" or "partition"
    struck: str  # what a disrupted worker is called: "killed" or "cut-off"

    def candidates(self, held: dict[str, list[int]]) -> list[str]:
        """The workers holding items that may be disrupted now."""
        ...

    def strike(self, worker_id: str) -> str:
        """Disrupt it; says what was done."""
        ...

    def tick(self) -> None:
        """Called often: end disruptions that are due."""
        ...

    def settle(self) -> None:
        """End every disruption (at its due time)."""
        ...

    def report(self) -> list[str]:
        """Lines of its own figures."""
        ...


class Killer:
    """kill -9 of the worker, and a fresh one in its place."""

    what, struck = "kill", "killed"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def candidates(self, held: dict[str, list[int]]) -> list[str]:
        return sorted(worker for worker in held if _alive(worker))

    def strike(self, worker_id: str) -> str:
        pid = _pid(worker_id)
        os.kill(pid, signal.SIGKILL)
        for worker in [w for w in self.cluster.workers if w.pid == pid]:
            worker.wait()  # reap it, so it no longer looks alive
        self.cluster.workers = [w for w in self.cluster.workers if w.pid != pid]
        self.cluster.start_workers(1)
        return f"worker {worker_id}"

    def tick(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def report(self) -> list[str]:
        return []


class Partitioner:
    """The worker's host is cut off the network for ``partition_s``, then healed. A healed host
    counts as down until its worker heartbeats again (its connections come back only when TCP
    retransmits), and at most ``max_down`` hosts are down at once."""

    what, struck = "partition", "cut-off"

    def __init__(self, hosts: MultiHostCluster, partition_s: float, max_down: int) -> None:
        self.hosts = hosts
        self.partition_s = partition_s
        self.max_down = max_down
        self.cut: dict[str, tuple[Host, str, float]] = {}  # host label -> (host, worker, heal time)
        self.healed: dict[str, tuple[str, float]] = {}  # host label -> (worker, wall-clock heal time)
        self.rejoin_s: list[float] = []  # heal → the worker heartbeats again, per partition

    def candidates(self, held: dict[str, list[int]]) -> list[str]:
        down = self.cut.keys() | self.healed.keys()
        if len(down) >= self.max_down:
            return []
        return sorted(
            worker
            for worker in held
            if (host := self.hosts.host_of(worker)) is not None and host.label not in down
        )

    def strike(self, worker_id: str) -> str:
        host = self.hosts.host_of(worker_id)
        assert host is not None, worker_id
        self.hosts.network.cut(host)
        self.cut[host.label] = (host, worker_id, time.monotonic() + self.partition_s)
        return f"host {host.label} (worker {worker_id})"

    def tick(self) -> None:
        for label, (host, worker, due) in list(self.cut.items()):
            if time.monotonic() >= due:
                self.hosts.network.heal(host)
                del self.cut[label]
                self.healed[label] = (worker, time.time())
        for label, (worker, healed_at) in list(self.healed.items()):
            if self.hosts.last_beat(worker) > healed_at:
                self.rejoin_s.append(time.time() - healed_at)
                del self.healed[label]

    def settle(self) -> None:
        deadline = time.monotonic() + self.partition_s + REJOIN_TIMEOUT_S
        while (self.cut or self.healed) and time.monotonic() < deadline:
            self.tick()
            time.sleep(0.1)

    def report(self) -> list[str]:
        if not self.rejoin_s:
            return []
        p50, worst = statistics.median(self.rejoin_s), max(self.rejoin_s)
        return [f"heal → the cut-off worker heartbeats again: p50 {p50:.1f} s, max {worst:.1f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", "--partitions", dest="disruptions", metavar="N", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--items", type=int, help="Items of the job (default 4000; 16000 with --partition: one is slower)"
    )
    parser.add_argument("--sleep-ms", type=int, default=1000)
    parser.add_argument("--between-kills-s", type=float, default=1.5)
    parser.add_argument(
        "--partition", action="store_true", help="Partition worker hosts instead of killing workers."
    )
    parser.add_argument("--partition-s", type=float, default=8.0, help="How long each partition lasts.")
    parser.add_argument("--max-down", type=int, default=1, help="Hosts cut off or not yet back at once.")
    args = parser.parse_args()
    if args.items is None:
        args.items = PARTITION_ITEMS if args.partition else KILL_ITEMS

    with tempfile.TemporaryDirectory(prefix="toolswarm-failover-") as tmp:
        if args.partition:
            partitioned(args, Path(tmp))
        else:
            killed(args, Path(tmp))


def killed(args: argparse.Namespace, workdir: Path) -> None:
    redis = EmbeddedRedis(Settings(state_dir=str(workdir)))
    url = redis.start(publish=False)
    try:
        with demo_http_server() as server_url:
            servers = {"demo": http_demo(server_url, max_concurrency=256)}
            cluster = make_cluster(workdir, url, servers)
            try:
                cluster.start_workers(args.workers)
                run(args, workdir, cluster, Killer(cluster))
            finally:
                cluster.stop_workers()
    finally:
        redis.stop()


def partitioned(args: argparse.Namespace, workdir: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        sys.exit(f"--partition needs network namespaces: {reason}")
    with Network() as network:
        mcp_host = network.add_host("mcp")
        network.attach_here()
        demo = ["-m", "workers.demo_server", "--transport", "http", "--port", str(DEMO_PORT)]
        server = mcp_host.popen(
            [sys.executable, *demo, "--host", mcp_host.address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(DEMO_PORT, 30, server, address=mcp_host.address)
            servers = {"demo": http_demo(f"http://{mcp_host.address}:{DEMO_PORT}/mcp", max_concurrency=256)}
            labels = [str(i) for i in range(args.workers)]
            with multihost_cluster(workdir, servers, worker_hosts=labels, network=network) as hosts:
                hosts.start_workers(hosts.worker_hosts)
                partitioner = Partitioner(hosts, args.partition_s, max_down=args.max_down)
                try:
                    run(args, workdir, hosts.cluster, partitioner)
                finally:
                    partitioner.settle()
        finally:
            stop_processes([server], grace_s=5)


def run(args: argparse.Namespace, workdir: Path, cluster: Cluster, disruptor: Disruptor) -> None:
    items = workdir / "items.jsonl"
    items.write_text("".join(json.dumps({"tool": "sleep", "arguments": {"ms": args.sleep_ms}}) + "\n"
                             for _ in range(args.items)))  # fmt: skip
    out = cluster.cli("submit", str(items), "--server", "demo", "--json")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    submitted = time.monotonic()

    struck_at: dict[int, float] = {}  # item -> time of the last disruption of a worker holding it
    strikes = 0
    rng = random.Random(11)
    time.sleep(2)
    while strikes < args.disruptions:
        disruptor.tick()
        held = held_by_worker(cluster, job_id)
        candidates = disruptor.candidates(held)
        if not candidates:
            if cluster.run(cluster.with_store(lambda s: s.status(job_id))).done:
                print(f"job finished after {strikes} {disruptor.what}s; use more --items for more")
                break
            time.sleep(0.1)
            continue
        victim = rng.choice(candidates)
        done = disruptor.strike(victim)
        now = time.time()
        for index in held[victim]:
            struck_at[index] = now
        strikes += 1
        print(f"{disruptor.what} {strikes:>2}: {done} holding {len(held[victim])} items", flush=True)
        pause_until = time.monotonic() + args.between_kills_s
        while time.monotonic() < pause_until:
            disruptor.tick()
            time.sleep(0.1)

    disrupted_for = time.monotonic() - submitted
    disruptor.settle()
    status = cluster.wait_for_job(job_id, timeout=600)
    print(
        f"{disruptor.what}s done {disrupted_for:.0f} s after submit; "
        f"job done after {time.monotonic() - submitted:.0f} s"
    )
    records = [
        ResultRecord.model_validate_json(line) for line in cluster.cli("results", job_id).stdout.splitlines()
    ]

    async def settled_events(store: JobStore) -> Counter[int]:
        entries = await store.client.xrange(store.keys.events)
        return Counter(
            int(f["index"]) for _, f in entries if f.get("job_id") == job_id and f["type"] == "item.settled"
        )

    settled = cluster.run(cluster.with_store(settled_events))
    refused = cluster.run(cluster.with_store(lambda s: s.refused_commits(job_id)))

    async def suspects(store: JobStore) -> int:
        lost = await store.client.hkeys(store.keys.job(job_id).lost)
        return sum(1 for field in lost if field.endswith(":suspect"))

    isolated = cluster.run(cluster.with_store(suspects))

    by_index = {r.index: r for r in records}
    delays = []
    for index, struck in struck_at.items():
        record = by_index.get(index)
        if record is not None and record.status == "succeeded":
            restarted = (record.finished_at_ms - record.duration_ms) / 1000
            delays.append(max(0.0, restarted - struck))
    lost = args.items - len(by_index)
    duplicates = sum(count - 1 for count in settled.values() if count > 1)
    what = disruptor.what
    print(f"job {status.state}: {status.succeeded} succeeded, {status.failed} failed of {status.total}")
    print(
        f"{what}s: {strikes}; items held by {disruptor.struck} workers: {len(struck_at)}; "
        f"late commits refused: {refused}"
    )
    print(f"restored by the coverage sweep: {status.restored_items} items")
    for line in disruptor.report():
        print(line)
    if delays:
        p50, p90, worst = statistics.median(delays), percentile(delays, 0.9), max(delays)
        print(f"{what} → started elsewhere: p50 {p50:.1f} s, p90 {p90:.1f} s, max {worst:.1f} s")
    failed_kinds = Counter(r.error.type for r in records if r.error is not None)
    if failed_kinds:
        print(f"failures by type: {dict(failed_kinds)}")
    poison = failed_kinds.get("poison", 0)
    print(f"isolated: {isolated} items lost their lease max_lease_losses times and ran once more alone")
    print(f"poison: {poison} items (bystanders of the {what}s; the rule is in shared/reaper.py)")
    p99 = percentile(delays, 0.99) if delays else float("nan")
    print(f"failover: p99_s={p99:.1f} lost={lost} duplicates={duplicates} poison={poison}")


def _pid(worker_id: str) -> int:
    return int(worker_id.rsplit(":", 1)[1])


def _alive(worker_id: str) -> bool:
    try:
        os.kill(_pid(worker_id), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


if __name__ == "__main__":
    main()
