"""A LAN of Linux network namespaces for partition tests: one namespace per peer, each with one veth link to a
bridge in a switch namespace of its own. ``cut(i)`` takes peer i's port off the bridge — its packets are then
silently lost both ways, as on a broken upstream link (no reset, no refusal: TCP retransmits into the void) —
and ``heal(i)`` puts it back.

Everything is created under names unique to this process and removed by :meth:`NamespaceLan.close` (deleting a
namespace deletes its links); nothing is created in the caller's namespace. Needs CAP_NET_ADMIN (root) and
iproute2's ``ip``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
SUBNET = "10.201.0"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    return None


class NamespaceLan:
    """``peers`` namespaces on one bridge; peer i has the address ``10.201.0.{i + 1}``."""

    def __init__(self, peers: int) -> None:
        self.tag = f"sw{os.getpid() % 100000}"
        self.switch = f"{self.tag}-s"
        self.names = [f"{self.tag}-{index}" for index in range(peers)]
        self._made: list[str] = []
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, name in enumerate(self.names):
            _ip("netns", "add", name)
            self._made.append(name)
            inside, port = f"{self.tag}p{index}", f"{self.tag}q{index}"
            _ip("link", "add", inside, "type", "veth", "peer", "name", port)
            _ip("link", "set", inside, "netns", name)
            _ip("link", "set", port, "netns", self.switch)
            _ip("-n", name, "addr", "add", f"{self.address(index)}/24", "dev", inside)
            _ip("-n", name, "link", "set", inside, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")

    @staticmethod
    def address(index: int) -> str:
        return f"{SUBNET}.{index + 1}"

    def cut(self, index: int) -> None:
        _ip("-n", self.switch, "link", "set", f"{self.tag}q{index}", "nomaster")

    def heal(self, index: int) -> None:
        _ip("-n", self.switch, "link", "set", f"{self.tag}q{index}", "master", "br0")

    def close(self) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._made.clear()


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block in network namespace ``name`` (this thread only): what it forks stays there."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)
