"""Test hosts as network namespaces on this machine (iproute2, as root).

:func:`make_hosts` makes N namespaces, each with loopback up and one veth whose other end is
on a bridge in the root namespace; the bridge has ``10.<a>.<b>.1/24`` and host i
``10.<a>.<b>.(10+i)``, with a/b from the pid so that parallel test workers do not meet.
The root namespace reaches every host and plays the controller and the backup host.
The namespaces share the filesystem (and the process table): give each host its own paths.

``Hosts.close()`` kills what runs in the namespaces (``ip netns pids``), deletes them and the
bridge; the ``netns_hosts`` fixture calls it at teardown, also after a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import List

import pytest

from .policy import missing


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS`` (fails the test with its stderr when CHECK)."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Hosts:
    """The namespaces (names) and their addresses; the bridge."""
    tag: str
    bridge: str
    gateway: str
    names: List[str] = field(default_factory=list)
    addresses: List[str] = field(default_factory=list)

    def close(self) -> None:
        for ns in self.names:
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.bridge, check=False)


def make_hosts(count: int) -> Hosts:
    """COUNT namespaces on a fresh bridge (see the module doc)."""
    pid = os.getpid()
    tag = "%x" % (pid % 0xFFFF)
    net = "10.%d.%d" % (100 + (pid >> 8) % 100, pid % 256)
    hosts = Hosts(tag=tag, bridge=f"fbr{tag}", gateway=f"{net}.1")
    try:
        ip("link", "add", hosts.bridge, "type", "bridge")
        ip("addr", "add", f"{hosts.gateway}/24", "dev", hosts.bridge)
        ip("link", "set", hosts.bridge, "up")
        for i in range(count):
            ns, outer, inner = f"fleet{tag}h{i}", f"fv{tag}o{i}", f"fv{tag}i{i}"
            ip("netns", "add", ns)
            hosts.names.append(ns)
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", hosts.bridge)
            ip("link", "set", outer, "up")
            addr = f"{net}.{10 + i}"
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            hosts.addresses.append(addr)
    except BaseException:
        hosts.close()
        raise
    return hosts


@pytest.fixture
def netns_hosts():
    """Factory ``netns_hosts(count) -> Hosts``; everything is removed at teardown."""
    if os.geteuid() != 0:
        missing("root (network namespaces for the fleet test)")
    made: List[Hosts] = []

    def make(count: int) -> Hosts:
        hosts = make_hosts(count)
        made.append(hosts)
        return hosts

    yield make
    for hosts in made:
        hosts.close()
