"""Where a worker's CPU goes: py-spy samples of a live worker process, grouped by component.

``WorkerProfile`` records a running process with py-spy (raw, collapsed stacks; idle threads are
left out, so samples are time on the CPU or waiting for the GIL). ``components`` charges each
sample to the component of its innermost frame (its own time), by the file the frame is in, so
the breakdown says which code spends the time, not which code called it.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# shared/ is no package, so py-spy names its files bare ("limiter.py"): known by their names.
SHARED_MODULES = frozenset(path.name for path in (ROOT / "shared").glob("*.py"))
TOOLSWARM_MODULES = {
    "limiter.py": "toolswarm: cluster slots (limiter)",
    "committer.py": "toolswarm: commits",
    "store.py": "toolswarm: store",
    "executor.py": "toolswarm: executor",
    "calls.py": "toolswarm: calls and retries",
    "mcp_client.py": "toolswarm: session pool",
    "metrics.py": "toolswarm: metrics",
    "log_context.py": "toolswarm: log context",
    "batching.py": "toolswarm: batching",
    "models.py": "toolswarm: models",
}
# Everything else, first match wins: the innermost frame's file path -> component.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("/tasks/", "toolswarm: worker runtime"),
    ("/workers/", "toolswarm: worker runtime"),
    ("/mcp/", "MCP SDK"),
    ("/httpx", "HTTP client (httpx, httpcore, h11)"),
    ("/httpcore", "HTTP client (httpx, httpcore, h11)"),
    ("/h11/", "HTTP client (httpx, httpcore, h11)"),
    ("/anyio/", "anyio"),
    ("/redis/", "redis-py"),
    ("/hiredis", "redis-py"),
    ("/celery/", "Celery, kombu"),
    ("/kombu/", "Celery, kombu"),
    ("/billiard/", "Celery, kombu"),
    ("/vine/", "Celery, kombu"),
    ("/pydantic", "pydantic"),
    ("/tenacity/", "tenacity"),
    ("/json/", "json"),
    ("/asyncio/", "event loop (asyncio, uvloop)"),
    ("/uvloop/", "event loop (asyncio, uvloop)"),
    ("/logging/", "logging"),
    ("/threading.py", "threads"),
    ("/ssl.py", "ssl"),
)
FRAME_FILE = re.compile(r"\(([^():]+)(?::\d+)?\)\s*$")


class WorkerProfile:
    """py-spy recording one process until :meth:`stop`."""

    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        executable = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
        self.output = output
        self.process = subprocess.Popen(
            [
                executable,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                str(rate),
                "--nonblocking",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> Path:
        self.process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        _, errors = self.process.communicate(timeout=60)
        if not self.output.exists():
            raise RuntimeError(f"py-spy wrote no profile: {errors.decode(errors='replace')[-500:]}")
        return self.output


def component_of(frame: str) -> str:
    match = FRAME_FILE.search(frame)
    path = "/" + (match.group(1) if match else frame).lstrip("/")  # py-spy shortens paths to packages
    name = path.rsplit("/", 1)[-1]
    if "/shared/" in path or (path.count("/") == 1 and name in SHARED_MODULES):
        return TOOLSWARM_MODULES.get(name, "toolswarm: other shared/")
    for needle, component in COMPONENTS:
        if needle in path:
            return component
    return "other"


def components(raw: Path) -> Counter[str]:
    """Samples by component of the innermost frame, from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[component_of(stack.rsplit(";", 1)[-1])] += int(count)
    return counts


def breakdown(counts: Counter[str], cpu_ms_per_item: float) -> list[str]:
    """Lines of the breakdown: each component's share of the samples and the CPU per item it is."""
    total = sum(counts.values()) or 1
    return [
        f"{component:<40} {100 * samples / total:5.1f}%  {cpu_ms_per_item * samples / total:5.2f} ms/item"
        for component, samples in counts.most_common()
    ]
