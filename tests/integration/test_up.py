"""`toolswarm up` with no Redis configured: embedded Valkey, supervised workers, clean teardown.

The other commands, run from the same directory with no Redis URL anywhere, must find the
embedded server through ``.toolswarm/redis.json``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.processes import free_port, stop_processes
from tests.harness import ROOT, server_toml, stdio_demo, wait_until

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 40.0
JOB_TIMEOUT_S = 60.0
TEARDOWN_TIMEOUT_S = 30.0
ITEMS = 40


def clean_env() -> dict[str, str]:
    """The test's environment without any TOOLSWARM_* setting: the config file alone decides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSWARM_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with a toolswarm.toml that names no Redis, and an items file."""
    (tmp_path / "toolswarm.toml").write_text(
        server_toml("demo", **stdio_demo(timeout_s=10)), encoding="utf-8"
    )
    lines = [json.dumps({"tool": "echo", "arguments": {"text": f"up-{i}"}}) for i in range(ITEMS)]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def cli(workdir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=clean_env(),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def start_up(workdir: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `toolswarm up` processes in ``workdir``; whatever is still running is stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = open(workdir / f"up-{len(started)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", *args],
            env=clean_env(),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        started.append(process)
        return process

    yield start
    stop_processes(started, grace_s=30)


def up_log(workdir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in workdir.glob("up-*.log")
    )


# --- processes, from /proc ---------------------------------------------------------------------


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (a zombie has exited; only its entry is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


# --- the embedded server ------------------------------------------------------------------------


def embedded_info(workdir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((workdir / ".toolswarm" / "redis.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def worker_records(url: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2) as client:
        keys = list(client.scan_iter(match="toolswarm:worker:*"))
        return [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []


def wait_for_up(
    process: subprocess.Popen[bytes], workdir: Path, workers: int
) -> tuple[dict[str, Any], set[int]]:
    """Wait for redis.json and ``workers`` heartbeats; return the embedded info and the worker pids."""

    def ready() -> tuple[dict[str, Any], set[int]] | None:
        if process.poll() is not None:
            raise AssertionError(f"toolswarm up exited with {process.returncode}:\n{up_log(workdir)}")
        info = embedded_info(workdir)
        if info is None:
            return None
        try:
            records = worker_records(info["url"])
        except redis.RedisError:
            return None
        pids = {int(r["pid"]) for r in records}
        return (info, pids) if len(pids) >= workers else None

    try:
        result: tuple[dict[str, Any], set[int]] = wait_until(
            ready, READY_TIMEOUT_S, f"{workers} workers of toolswarm up not ready", interval=0.2
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{up_log(workdir)}") from None
    return result


def run_job_from(workdir: Path) -> None:
    """Submit, follow and read a job with no Redis URL anywhere but .toolswarm/redis.json."""
    submitted = cli(workdir, "submit", "items.jsonl", "--server", "demo", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]

    last: list[dict[str, Any]] = []

    def finished() -> dict[str, Any] | None:
        out = cli(workdir, "status", job_id, "--json")
        assert out.returncode == 0, out.stderr
        last[:] = [json.loads(out.stdout)]
        return last[0] if last[0]["state"] in ("finished", "cancelled") else None

    try:
        view = wait_until(finished, JOB_TIMEOUT_S, f"job {job_id} not finished", interval=0.3)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {last}\n{up_log(workdir)}") from None
    assert view["state"] == "finished"
    assert (view["total"], view["succeeded"], view["failed"]) == (ITEMS, ITEMS, 0)

    results = cli(workdir, "results", job_id)
    assert results.returncode == 0, results.stderr
    texts = sorted(json.loads(line)["result"]["content"][0]["text"] for line in results.stdout.splitlines())
    assert texts == sorted(f"up-{i}" for i in range(ITEMS))


def says_where_each_part_listens(workdir: Path, info: dict[str, Any], workers: set[int]) -> dict[str, str]:
    """The lines ``up`` prints once everything is ready, by part; none of them a library's warning."""
    wait_until(lambda: "Ctrl-C or SIGTERM" in up_log(workdir), READY_TIMEOUT_S, "up never said it was up")
    log = up_log(workdir)
    assert "superuser" not in log and "Warning" not in log, log
    parts = dict(
        line.strip().split(maxsplit=1) for line in log.split("toolswarm is up:\n", 1)[1].splitlines()[:5]
    )
    assert parts["Redis"] == f"{info['url']} (embedded, pid {info['server_pid']})", log
    host = socket.gethostname()
    said = parts["workers"]
    assert said.startswith(f"2 ready: w0@{host} (pid ") and f", w1@{host} (pid " in said, said
    assert {int(pid) for pid in re.findall(r"\(pid (\d+)\)", said)} == workers, (said, workers)
    return parts


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "sigterm-twice"])
def test_up_serves_the_directory_and_stops_everything(
    how: str, workdir: Path, start_up: Callable[..., subprocess.Popen[bytes]]
) -> None:
    # Once, the API beside the workers: up says where it listens, and it answers there.
    api_port = free_port() if how == "sigterm" else None
    up = start_up("--workers", "2", *([f"--api-port={api_port}"] if api_port else []))
    info, worker_pids = wait_for_up(up, workdir, workers=2)
    assert info["pid"] == up.pid
    server_pid = int(info["server_pid"])
    assert alive(server_pid)
    assert info["url"].startswith("redis://127.0.0.1:")
    parts = says_where_each_part_listens(workdir, info, worker_pids)
    if api_port is None:
        assert parts["API"] == "not started (--api-port PORT to run it)"
    else:
        assert re.fullmatch(rf"http://127\.0\.0\.1:{api_port} \(pid \d+\)", parts["API"]), parts
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=30) as response:
            assert response.status == 200

    run_job_from(workdir)

    started = descendants(up.pid)
    assert worker_pids <= started, f"heartbeating workers {worker_pids} are children of up: {started}"
    assert server_pid in started
    described = {pid: cmdline(pid) for pid in started}

    if how == "sigterm":
        up.send_signal(signal.SIGTERM)
    elif how == "sigterm-twice":
        # An impatient supervisor: a second SIGTERM while the workers are stopping must not
        # abandon the teardown half-way.
        up.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in up_log(workdir), 10, "up did not start stopping", interval=0.02)
        up.send_signal(signal.SIGTERM)
    else:
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group (up is its leader),
        # which includes the Valkey server it started.
        os.killpg(up.pid, signal.SIGINT)
    try:
        up.wait(timeout=TEARDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"toolswarm up still running {TEARDOWN_TIMEOUT_S}s after {how}") from None
    assert up.returncode == 0, up_log(workdir)

    try:
        wait_until(lambda: not any(alive(pid) for pid in started), 10, "processes of up still running")
    except TimeoutError:
        left = {pid: described[pid] for pid in started if alive(pid)}
        raise AssertionError(f"still running after up exited: {left}\n{up_log(workdir)}") from None
    assert not (workdir / ".toolswarm" / "redis.json").exists(), up_log(workdir)
    assert "Traceback" not in up_log(workdir)
    assert "Warm shutdown" not in up_log(workdir)  # Celery's own notice, of each supervised worker


def test_second_up_in_the_same_directory_fails_with_one_line(
    workdir: Path, start_up: Callable[..., subprocess.Popen[bytes]]
) -> None:
    first = start_up("--workers", "1")
    info, _ = wait_for_up(first, workdir, workers=1)

    second = cli(workdir, "up", "--workers", "1", timeout=30)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), second.stderr
    assert "already running" in lines[0] and info["url"] in lines[0]
    assert "Traceback" not in second.stdout + second.stderr

    # The first one is untouched: same server, still published, still serving.
    assert first.poll() is None
    assert embedded_info(workdir) == info
    assert alive(int(info["server_pid"]))
    assert len(worker_records(info["url"])) == 1
