"""A real RabbitMQ node for tests: Debian's rabbitmq-server on free 127.0.0.1 ports, as user rabbitmq.

The node gets its own name, data and log directories, distribution port and epmd (started here in
the foreground so its pid is ours), and every process started is stopped by its pid.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import amqp

from cli.processes import free_port, stop_processes, wait_for_port
from tests.harness import wait_until

SERVER_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
RABBIT_USER = "rabbitmq"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0


def rabbitmq_missing() -> str | None:
    """Why a RabbitMQ node cannot be started here, or None when it can."""
    if not SERVER_SCRIPT.exists():
        return f"rabbitmq-server is not installed ({SERVER_SCRIPT} missing; apt-get install rabbitmq-server)"
    try:
        pwd.getpwnam(RABBIT_USER)
    except KeyError:
        return f"rabbitmq-server is installed but user {RABBIT_USER!r} does not exist"
    return None


@dataclass
class RabbitNode:
    url: str  # amqp://guest:guest@127.0.0.1:PORT// (guest may log in over loopback only)
    port: int
    node_name: str
    base: Path
    server: subprocess.Popen[bytes]
    epmd: subprocess.Popen[bytes]

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for log in sorted(self.base.rglob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def connect(self) -> amqp.Connection:
        connection = amqp.Connection(host=f"127.0.0.1:{self.port}", userid="guest", password="guest")
        connection.connect()
        return connection

    def declared_with(self, queue: str, arguments: dict[str, object]) -> bool:
        """Whether the durable queue exists with exactly these of the arguments RabbitMQ checks for
        equivalence (x-max-priority among them): a redeclare that differs is refused."""
        connection = self.connect()
        try:
            channel = connection.channel()
            try:
                channel.queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)
            except amqp.exceptions.PreconditionFailed:
                return False
            return True
        finally:
            connection.close()

    def purge(self, queue: str) -> int:
        """Delete the queue's ready messages, as an operator's purge does; returns how many."""
        connection = self.connect()
        try:
            return int(connection.channel().queue_purge(queue))
        finally:
            connection.close()

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node_name, *args],
            env=_node_env(self.base, self.node_name, self.port, 0, _epmd_port(self.epmd)),
            user=RABBIT_USER,
            # Its own directory: the checkout may be one the rabbitmq user cannot enter (mktemp -d
            # is 0700), and Erlang then fails reading its working directory.
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout


def _epmd_port(epmd: subprocess.Popen[bytes]) -> int:
    args = [str(a) for a in epmd.args]  # type: ignore[union-attr]
    return int(args[args.index("-port") + 1])


def _node_env(base: Path, node_name: str, port: int, dist_port: int, epmd_port: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(base),  # the Erlang cookie is written here
        "LANG": "C.UTF-8",
        "RABBITMQ_NODENAME": node_name,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),  # none: not the system's
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        # Run the VM in place of the script, so the pid we hold is the node's.
        "RUNNING_UNDER_SYSTEMD": "1",
    }


def _as_rabbit() -> dict[str, int]:
    user = pwd.getpwnam(RABBIT_USER)
    return {"user": user.pw_uid, "group": user.pw_gid}


def _accepts_amqp(port: int) -> bool:
    connection = amqp.Connection(host=f"127.0.0.1:{port}", userid="guest", password="guest")
    try:
        connection.connect()
    except (OSError, amqp.exceptions.AMQPError):
        return False
    with suppress(OSError, amqp.exceptions.AMQPError):
        connection.close()
    return True


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``root``: the node's Erlang helpers (erl_child_setup,
    inet_gethost, the disk monitor's shell), each in a session of its own."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append((int(entry.name), stat[19]))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (index 1 is the parent, 19 the start time)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _kill_left(processes: list[tuple[int, str]]) -> None:
    for pid, started in processes:
        stat = _stat(pid)
        if stat is not None and stat[19] == started:  # the same process, not a reused pid
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextmanager
def rabbitmq_node(config: str = "") -> Iterator[RabbitNode]:
    """A RabbitMQ node accepting AMQP on 127.0.0.1 when this yields; stopped by pid on the way out.

    Its data lives in a fresh directory owned by user rabbitmq (a directory of pytest's tmp tree
    would not do: pytest keeps those 0700 to root, so the node could not reach it)."""
    base = Path(tempfile.mkdtemp(prefix="toolswarm-rabbitmq-"))
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    node_name = f"ts{uuid.uuid4().hex[:10]}@localhost"
    (base / "mnesia").mkdir()
    (base / "log").mkdir()
    (base / "rabbitmq.conf").write_text(config, encoding="utf-8")
    (base / "enabled_plugins").write_text("[].\n", encoding="utf-8")
    ids = _as_rabbit()
    for path in [base, *base.rglob("*")]:
        os.chown(path, ids["user"], ids["group"])
    env = _node_env(base, node_name, port, dist_port, epmd_port)
    epmd = subprocess.Popen(
        [EPMD, "-port", str(epmd_port), "-address", "127.0.0.1"],
        env=env,
        cwd=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **ids,  # type: ignore[arg-type]
    )
    server: subprocess.Popen[bytes] | None = None
    try:
        wait_for_port(epmd_port, 30, epmd)
        with open(base / "log" / "console.log", "wb") as console:
            server = subprocess.Popen(
                [str(SERVER_SCRIPT)],
                env=env,
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **ids,  # type: ignore[arg-type]
            )
        node = RabbitNode(
            url=f"amqp://guest:guest@127.0.0.1:{port}//",
            port=port,
            node_name=node_name,
            base=base,
            server=server,
            epmd=epmd,
        )

        def accepting() -> bool:
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {server.returncode}:\n{node.log_tail()}")
            return _accepts_amqp(port)

        wait_until(accepting, START_TIMEOUT_S, f"RabbitMQ accepting AMQP on {port}", interval=0.2)
        yield node
    finally:
        if server is not None:
            helpers = _descendants(server.pid)
            stop_processes([server], grace_s=STOP_GRACE_S)
            _kill_left(helpers)
        stop_processes([epmd], grace_s=5)
        shutil.rmtree(base, ignore_errors=True)
