"""A listening port that survives restarts, so the address a peer gives out stays the same.

A host multiaddr with TCP port 0 ("any free port") would get a new port from the kernel on every start, and with
it a new join address. :func:`stable_host_maddrs` replaces port 0 with the port kept in ``WORKDIR/listen_port``,
or, the first time (or when that port is taken), with the first free port of :data:`DEFAULT_PORTS`, and keeps it
there. Peers started at the same moment on one machine (``swarm local``) never pick the same port: each holds an
advisory lock on its port from the choice until its p2p daemon has bound it (:func:`release_ports`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import tempfile
from pathlib import Path

from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

PORT_FILE = "listen_port"
DEFAULT_PORTS = range(31330, 31530)
_held: dict[int, int] = {}  # port -> the file descriptor of its lock, until the daemon has bound the port


def _lock(port: int) -> bool:
    """Hold this machine's advisory lock on ``port`` (another swarm process holding it: False)."""
    if port in _held:
        return True
    path = Path(tempfile.gettempdir()) / f"swarm-port-{port}.lock"
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        return True  # no shared temp directory to coordinate through: the bind test alone decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _held[port] = fd
    return True


def _release(port: int) -> None:
    fd = _held.pop(port, None)
    if fd is not None:
        os.close(fd)


def release_ports() -> None:
    """Let go of the locks on chosen ports: call once the node listens on them (or failed to start)."""
    for port in list(_held):
        _release(port)


def _bindable(host: str, port: int, family: socket.AddressFamily) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _claim(host: str, port: int, family: socket.AddressFamily) -> bool:
    if not _lock(port):
        return False
    if _bindable(host, port, family):
        return True
    _release(port)
    return False


def stable_host_maddrs(host_maddrs: list[str], workdir: Path) -> list[str]:
    """``host_maddrs`` with every ``/tcp/0`` replaced by this work directory's port (module docstring). Addresses
    with an explicit port are left as they are. Falls back to port 0 when no port of the range is free."""
    kept_file = Path(workdir) / PORT_FILE
    try:
        kept = int(kept_file.read_text().strip())
    except (OSError, ValueError):
        kept = None
    result = []
    chosen: int | None = None
    for address in host_maddrs:
        parsed = Multiaddr(address)
        protocols = [protocol.name for protocol in parsed.protocols()]
        if "tcp" not in protocols or parsed.value_for_protocol("tcp") != "0":
            result.append(address)
            continue
        family = socket.AF_INET6 if "ip6" in protocols else socket.AF_INET
        host = parsed.value_for_protocol("ip6" if family == socket.AF_INET6 else "ip4")
        if chosen is None:
            candidates = ([kept] if kept is not None else []) + [
                port for port in DEFAULT_PORTS if port != kept
            ]
            chosen = next((port for port in candidates if _claim(host, port, family)), 0)
            if kept is not None and chosen != kept:
                logger.warning(
                    f"port {kept} (kept in {kept_file}) is taken: listening on {chosen or 'a random port'}"
                    " instead; give out the new address"
                )
            if chosen:
                Path(workdir).mkdir(parents=True, exist_ok=True)
                kept_file.write_text(f"{chosen}\n")
        result.append(address.replace("/tcp/0", f"/tcp/{chosen}", 1))
    return result
