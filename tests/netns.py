"""Hosts on one machine: Linux network namespaces wired to one switch, and links to cut.

A :class:`Network` is a switch (a bridge in a namespace of its own) on a private /24 that no
interface of this machine uses. Each :meth:`Network.add_host` is a namespace joined to the switch
by a veth pair; :meth:`Network.attach_here` joins the calling process's own namespace the same
way, so a test can reach what runs inside. :meth:`Network.cut` takes a host's port on the switch
down (its packets are dropped, as in a real partition: nothing tells its TCP connections) and
:meth:`Network.heal` brings it back.

Names carry the creating process's pid and a random suffix, so two runs never collide.
:meth:`Network.close` removes every namespace and link it made (the caller stops its processes
first, by pid). What runs in a host is killed when the process that started it dies, and a new
Network removes the namespaces left by runs whose process is gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from shared.embedded import pid_alive

HERE_HOST_NUMBER = 254  # the calling process's address on the switch is .254
PREFIX = "tsw"
OWNED = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")
# Run in a host, a program gets SIGKILL when the process that started it dies (setpriv execs it,
# and ip netns exec execs setpriv, so the pid stays the program's).
DIES_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    try:
        # What a Network is made of, tried inside the probe (removed with it).
        for kind in (["veth", "peer", "name", "probe1"], ["bridge"]):
            ip("link", "add", "probe0", "type", *kind, netns=probe)
            ip("link", "delete", "probe0", netns=probe)
    except RuntimeError as exc:
        return f"links cannot be made here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def ip(*args: str, netns: str | None = None) -> None:
    """Run one `ip` command (inside ``netns`` if given); a failure raises naming the command."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces of Networks whose creating process is gone; returns their names."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    stale = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = OWNED.match(name)
        if owner is not None and not pid_alive(int(owner.group(1))):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            stale.append(name)
    return stale


def used_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this namespace's addresses and routes."""
    addresses: list[dict[str, Any]] = json.loads(
        subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    )
    routes: list[dict[str, Any]] = json.loads(
        subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True, check=True).stdout
    )
    networks = [
        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
        for link in addresses
        for a in link.get("addr_info", [])
    ]
    networks += [ipaddress.ip_network(r["dst"], strict=False) for r in routes if r["dst"] != "default"]
    return [n for n in networks if isinstance(n, ipaddress.IPv4Network)]


def free_subnet() -> ipaddress.IPv4Network:
    """A random /24 in 10.0.0.0/8 that overlaps nothing this namespace uses."""
    used = used_networks()
    for _ in range(100):
        candidate = ipaddress.IPv4Network(f"10.{secrets.randbelow(156) + 100}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise RuntimeError("no free private /24 in 10.100.0.0-10.255.255.0")


@dataclass(frozen=True)
class Host:
    """A network namespace with one address on the switch."""

    label: str
    netns: str
    address: str
    switch_port: str  # its veth end on the switch: down means partitioned

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside this host, the pid being the program's (see DIES_WITH_PARENT)."""
        return ["ip", "netns", "exec", self.netns, *DIES_WITH_PARENT, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*argv), **kwargs)


class Network:
    """A switch and the hosts on it; see the module's text."""

    def __init__(self) -> None:
        remove_stale_namespaces()
        self.suffix = secrets.token_hex(3)
        self.subnet = free_subnet()
        self.netns_prefix = f"{PREFIX}-{os.getpid()}-{self.suffix}"
        self.switch_netns = f"{self.netns_prefix}-switch"
        self.hosts: list[Host] = []
        self._here_link: str | None = None
        self._made_netns: list[str] = []
        try:
            self._netns(self.switch_netns)
            ip("link", "add", "br0", "type", "bridge", netns=self.switch_netns)
            ip("link", "set", "br0", "up", netns=self.switch_netns)
        except BaseException:
            self.close()
            raise

    def _netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._made_netns.append(name)
        ip("link", "set", "lo", "up", netns=name)

    def _address(self, number: int) -> str:
        return str(self.subnet[number])

    def _wire(self, inside: str, netns: str | None, number: int) -> str:
        """A veth pair from the switch to ``netns`` (None: this process's own), its end there named
        ``inside`` with address .``number``; returns the switch-side end's name."""
        port = f"{PREFIX}{self.suffix}p{number}"  # interface names are at most 15 characters
        outer = f"{PREFIX}{self.suffix}h{number}"
        ip("link", "add", outer, "type", "veth", "peer", "name", port)
        ip("link", "set", port, "netns", self.switch_netns)
        ip("link", "set", port, "master", "br0", netns=self.switch_netns)
        ip("link", "set", port, "up", netns=self.switch_netns)
        if netns is not None:
            ip("link", "set", outer, "netns", netns)
            ip("link", "set", outer, "name", inside, netns=netns)
            outer = inside
        ip("addr", "add", f"{self._address(number)}/{self.subnet.prefixlen}", "dev", outer, netns=netns)
        ip("link", "set", outer, "up", netns=netns)
        return port

    def add_host(self, label: str) -> Host:
        number = len(self.hosts) + 1
        netns = f"{self.netns_prefix}-{label}"
        self._netns(netns)
        port = self._wire("eth0", netns, number)
        host = Host(label=label, netns=netns, address=self._address(number), switch_port=port)
        self.hosts.append(host)
        return host

    def attach_here(self) -> str:
        """Join this process's namespace to the switch (once); returns its address there."""
        if self._here_link is None:
            self._wire("", None, HERE_HOST_NUMBER)
            self._here_link = f"{PREFIX}{self.suffix}h{HERE_HOST_NUMBER}"
        return self._address(HERE_HOST_NUMBER)

    def cut(self, host: Host) -> None:
        """Partition ``host``: its port on the switch goes down and its packets are dropped."""
        ip("link", "set", host.switch_port, "down", netns=self.switch_netns)

    def heal(self, host: Host) -> None:
        ip("link", "set", host.switch_port, "up", netns=self.switch_netns)

    def close(self) -> None:
        """Remove the links and namespaces made (a namespace's veth ends go with it)."""
        if self._here_link is not None:
            subprocess.run(["ip", "link", "delete", self._here_link], capture_output=True)
            self._here_link = None
        for netns in reversed(self._made_netns):
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        self._made_netns = []

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
