"""``swarm doctor``: check this machine and the configured network before a peer is started, and say what to fix.

Each check gives OK, WARN or FAIL with one line of detail and, for WARN/FAIL, what to do about it. The command
exits 0 when nothing failed and 1 otherwise (2 for a bad config or a malformed multiaddress, like every command).
A check that raises never produces a traceback: it becomes a FAIL line naming the check and the exception.

Only :func:`add_doctor_parser` is needed to build the ``swarm`` parser; the heavy imports happen inside checks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import ipaddress
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.errors import UserError

if TYPE_CHECKING:
    from swarm.config import SwarmConfig

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GIB = 1024**3
MIN_PYTHON = (3, 11)
DISK_FAIL_BYTES = 1 * GIB
DISK_WARN_BYTES = 5 * GIB
MEMORY_WARN_BYTES = 2 * GIB
CLOCK_WARN_SECONDS = 60.0
KEY_PACKAGES = ("hivemind", "transformers", "trl", "datasets", "accelerate", "numpy")
INSTALL_HINT = (
    "reinstall the project's dependencies: ./launch.sh, or pip install -e . in the virtual environment"
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # OK / WARN / FAIL
    detail: str
    fix: str = ""


def add_doctor_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``doctor`` on the ``swarm`` command's ``subparsers``.

    The options carry the attribute names :func:`swarm.arguments.config_from_args` reads (config, overrides, recipe,
    max_epochs, workdir, join), so the effective config is the one ``swarm run`` would use with the same options.
    """
    doctor = subparsers.add_parser(
        "doctor", help="check Python, torch, memory, disk, ports and the initial peers; print what to fix"
    )
    doctor.add_argument("--config", type=Path, help="YAML config file (default: configs/default.yaml)")
    doctor.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set network.host_maddrs=[/ip4/0.0.0.0/tcp/31337] (repeatable)",
    )
    doctor.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="multiaddress of a peer to check (repeatable; also SWARM_INITIAL_PEERS, network.initial_peers)",
    )
    doctor.add_argument("--workdir", type=Path, help="work directory to check (workdir)")
    doctor.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time limit of each network check in seconds (default 5)",
    )
    doctor.add_argument("--plain", action="store_true", help="print plain lines instead of a table")
    doctor.set_defaults(recipe=None, max_epochs=None)
    return doctor


def run_doctor(args: argparse.Namespace) -> int:
    """Run every check, print the results and a summary line; 0 if nothing failed, 1 if something did, 2 for a
    bad config or multiaddress (printed as one ``swarm: error:`` line on stderr)."""
    try:
        config = _load_config(args)
    except UserError as error:
        print(f"swarm: error: {error}", file=sys.stderr)
        return error.exit_code
    timeout = getattr(args, "timeout", None) or 5.0
    if timeout <= 0:
        print(f"swarm: error: --timeout must be positive, got {timeout:g}", file=sys.stderr)
        return 2
    from swarm.arguments import explicit_keys

    results = run_checks(config, timeout, explicit_keys(args))
    _print_results(
        results, plain=getattr(args, "plain", False), config_path=args.config, workdir=Path(config.workdir)
    )
    return 1 if any(result.status == FAIL for result in results) else 0


def _load_config(args: argparse.Namespace) -> SwarmConfig:
    from swarm.arguments import config_from_args
    from swarm.network.dht import check_multiaddrs

    config = config_from_args(args)
    check_multiaddrs(config.network.initial_peers, "initial peer")
    check_multiaddrs(config.network.host_maddrs, "network.host_maddrs")
    check_multiaddrs(config.network.announce_maddrs, "network.announce_maddrs")
    return config


def run_checks(
    config: SwarmConfig, timeout: float = 5.0, explicit: list[str] | None = None
) -> list[CheckResult]:
    """Every check in order; a check that raises becomes a FAIL result naming it and the exception.

    :param explicit: the config keys the user chose on purpose (a difference there from the swarm's fails)"""
    workdir = Path(config.workdir)
    checks: list[tuple[str, Callable[[], Iterable[CheckResult] | CheckResult]]] = [
        ("python", check_python),
        ("torch", check_torch),
        ("memory", check_memory),
        ("disk", lambda: check_disk(workdir)),
        ("packages", check_packages),
        ("p2pd", check_p2pd),
        ("workdir", lambda: check_workdir(workdir)),
        ("identity", lambda: check_identity(config.key_path)),
        ("listen ports", lambda: check_host_ports(config)),
        ("initial peers", lambda: check_initial_peers(config.network.initial_peers, timeout)),
        ("swarm settings", lambda: check_swarm_settings(config, explicit or [], timeout * 3)),
        ("clock", lambda: check_clock(workdir)),
    ]
    results: list[CheckResult] = []
    for name, check in checks:
        try:
            outcome = check()
            results.extend([outcome] if isinstance(outcome, CheckResult) else outcome)
        except Exception as error:
            results.append(
                CheckResult(
                    name,
                    FAIL,
                    f"the check itself failed: {type(error).__name__}: {error}",
                    "report this as a bug in swarm doctor, with the line above",
                )
            )
    return results


# -- the machine ---------------------------------------------------------------------------------------------


def check_python() -> CheckResult:
    version = platform.python_version()
    where = f"{platform.python_implementation()} {version} on {platform.platform()}"
    if sys.version_info[:2] < MIN_PYTHON:
        return CheckResult("python", FAIL, where, f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    return CheckResult("python", OK, where)


def check_torch() -> CheckResult:
    try:
        import torch
    except Exception as error:
        return CheckResult("torch", FAIL, f"cannot import torch: {error}", INSTALL_HINT)
    cpus = os.cpu_count() or 1
    if torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(f"{props.name} ({props.total_memory / GIB:.1f} GiB)")
        return CheckResult(
            "torch", OK, f"torch {torch.__version__}, CUDA {torch.version.cuda}: {', '.join(devices)}"
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return CheckResult("torch", OK, f"torch {torch.__version__}, Apple MPS available, {cpus} CPU cores")
    return CheckResult(
        "torch", OK, f"torch {torch.__version__}, no GPU: CPU only, {cpus} cores (small models / cpu tier)"
    )


def read_meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int] | None:
    """MemTotal / MemAvailable ... in bytes, or None where /proc/meminfo does not exist (not Linux)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0]) * (1024 if len(fields) > 1 and fields[1] == "kB" else 1)
    return values


def check_memory() -> CheckResult:
    info = read_meminfo()
    if not info or "MemTotal" not in info:
        return CheckResult(
            "memory",
            WARN,
            "unknown (no /proc/meminfo on this system)",
            "check free memory yourself: a peer needs the model, its gradients and optimizer state",
        )
    total = info["MemTotal"]
    available = info.get("MemAvailable", info.get("MemFree", 0))
    detail = f"{total / GIB:.1f} GiB total, {available / GIB:.1f} GiB available"
    if available < MEMORY_WARN_BYTES:
        return CheckResult(
            "memory",
            WARN,
            detail,
            "close other programs or pick a smaller model / the cpu tier; training may run out of memory",
        )
    return CheckResult("memory", OK, detail)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(workdir: Path) -> CheckResult:
    where = _existing_ancestor(workdir)
    free = shutil.disk_usage(where).free
    detail = f"{free / GIB:.1f} GiB free in {where}"
    if free < DISK_FAIL_BYTES:
        return CheckResult(
            "disk",
            FAIL,
            detail,
            "free some space or point --workdir at a larger disk: checkpoints and models need room",
        )
    if free < DISK_WARN_BYTES:
        return CheckResult(
            "disk",
            WARN,
            detail,
            "checkpoints and downloaded models may not fit: free space or use a larger disk",
        )
    return CheckResult("disk", OK, detail)


def _package_version(name: str, module: object) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def check_packages() -> list[CheckResult]:
    results = []
    for name in KEY_PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            results.append(
                CheckResult(
                    name, FAIL, f"cannot import {name}: {type(error).__name__}: {error}", INSTALL_HINT
                )
            )
            continue
        results.append(CheckResult(name, OK, _package_version(name, module)))
    return results


def check_p2pd() -> CheckResult:
    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.submodule_search_locations:
        return CheckResult(
            "p2pd", FAIL, "hivemind is not installed, so neither is its p2p daemon", INSTALL_HINT
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "hivemind_cli" / "p2pd"
    if not binary.is_file():
        return CheckResult(
            "p2pd",
            FAIL,
            f"{binary} is missing",
            "reinstall hivemind (pip install --force-reinstall hivemind==1.1.12); it builds p2pd",
        )
    if not os.access(binary, os.X_OK):
        return CheckResult("p2pd", FAIL, f"{binary} is not executable", f"chmod +x {binary}")
    return CheckResult("p2pd", OK, str(binary))


def check_workdir(workdir: Path) -> CheckResult:
    if workdir.exists() and not workdir.is_dir():
        return CheckResult(
            "workdir",
            FAIL,
            f"{workdir} exists and is not a directory",
            "pick another --workdir or move the file away",
        )
    target = workdir if workdir.is_dir() else _existing_ancestor(workdir)
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".swarm-doctor-"):
            pass
    except OSError as error:
        return CheckResult(
            "workdir",
            FAIL,
            f"cannot write in {target}: {error.strerror or error}",
            "fix its permissions or pick another --workdir",
        )
    if not workdir.is_dir():
        return CheckResult("workdir", OK, f"{workdir} does not exist yet; it can be created in {target}")
    return CheckResult("workdir", OK, f"{workdir} is writable")


def check_identity(key_path: Path) -> CheckResult:
    if not key_path.exists():
        return CheckResult("identity", OK, f"no key yet: one is created at {key_path} on the first run")
    from swarm.identity import Identity

    try:
        identity = Identity.load_or_create(key_path)
    except UserError as error:
        return CheckResult(
            "identity",
            FAIL,
            str(error),
            "move the file away to get a new identity (other peers will see a new peer id)",
        )
    return CheckResult("identity", OK, f"{identity.name} ({identity.peer_id}) from {key_path}")


def check_clock(workdir: Path) -> CheckResult:
    target = workdir if workdir.is_dir() else Path(tempfile.gettempdir())
    with tempfile.NamedTemporaryFile(dir=target, prefix=".swarm-doctor-clock-") as file:
        file.write(b"x")
        file.flush()
        mtime = os.stat(file.name).st_mtime
        now = time.time()
    difference = now - mtime
    honest = "true skew against other peers is not measured (no network time source)"
    detail = f"system clock vs. file time in {target}: {difference:+.1f} s; {honest}"
    if abs(difference) > CLOCK_WARN_SECONDS:
        return CheckResult(
            "clock",
            WARN,
            detail,
            "enable time synchronisation (NTP, e.g. timedatectl set-ntp true): epochs and "
            "DHT record expiry rely on clocks that roughly agree",
        )
    return CheckResult("clock", OK, detail)


# -- the network ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoint:
    host_protocol: str  # ip4 / ip6 / dns / dns4 / dns6
    host: str
    transport: str  # tcp / udp
    port: int
    relayed: bool  # the address goes through a relay (/p2p-circuit): host:port is the relay's


def _endpoint(address: str) -> _Endpoint | None:
    """The first host and transport port of a (valid) multiaddress, or None when it names neither."""
    from hivemind.utils.multiaddr import Multiaddr

    host_protocol = host = transport = None
    port = None
    relayed = False
    for protocol, value in Multiaddr(address).items():
        if protocol.name in ("ip4", "ip6", "dns", "dns4", "dns6") and host is None:
            host_protocol, host = protocol.name, value
        elif protocol.name in ("tcp", "udp") and host is not None and port is None:
            transport, port = protocol.name, int(value)
        elif protocol.name == "p2p-circuit":
            relayed = True
    if host is None or port is None:
        return None
    return _Endpoint(host_protocol, host, transport, port, relayed)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host_ports(config: SwarmConfig) -> list[CheckResult]:
    network = config.network
    results = []
    for address in network.host_maddrs:
        results.append(_check_bind(address))
    hosts = [endpoint.host for endpoint in map(_endpoint, network.host_maddrs) if endpoint is not None]
    remote_peers = [
        peer
        for peer in network.initial_peers
        if (endpoint := _endpoint(peer)) is not None and not _is_loopback(endpoint.host)
    ]
    if hosts and all(_is_loopback(host) for host in hosts) and remote_peers and network.client_mode is False:
        results.append(
            CheckResult(
                "listen",
                WARN,
                "listening on loopback only, but the initial peers are on other machines: "
                "they cannot connect back to this peer",
                "set network.host_maddrs=[/ip4/0.0.0.0/tcp/31337] (and open that port), or network.client_mode=true "
                "behind NAT",
            )
        )
    return results


def _check_bind(address: str) -> CheckResult:
    name = f"listen {address}"
    endpoint = _endpoint(address)
    if endpoint is None or endpoint.host_protocol not in ("ip4", "ip6"):
        return CheckResult(
            name,
            WARN,
            "not checked: only /ip4 and /ip6 addresses with a port are checked",
            "use an /ip4/ADDRESS/tcp/PORT form to have it checked",
        )
    if endpoint.port == 0:
        return CheckResult(name, OK, f"any free {endpoint.transport} port on {endpoint.host}")
    family = socket.AF_INET if endpoint.host_protocol == "ip4" else socket.AF_INET6
    kind = socket.SOCK_STREAM if endpoint.transport == "tcp" else socket.SOCK_DGRAM
    where = f"{endpoint.transport} port {endpoint.port} on {endpoint.host}"
    try:
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the p2p daemon does
            sock.bind((endpoint.host, endpoint.port))
            if kind == socket.SOCK_STREAM:
                sock.listen(1)
    except PermissionError:
        return CheckResult(
            name,
            FAIL,
            f"{where}: permission denied",
            "ports below 1024 need privileges: pick a port above 1024",
        )
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in (98, 48, 10048):  # EADDRINUSE on Linux / macOS / Windows
            return CheckResult(
                name,
                FAIL,
                f"{where} is already in use",
                "stop the program using it (another peer?) or pick another port (0: any free port)",
            )
        if error.errno in (99, 49, 10049):  # EADDRNOTAVAIL
            return CheckResult(
                name,
                FAIL,
                f"{where}: {endpoint.host} is not an address of this machine",
                "use 0.0.0.0 (all interfaces) or one of this machine's addresses",
            )
        return CheckResult(name, FAIL, f"cannot bind {where}: {reason}", "pick another address or port")
    return CheckResult(name, OK, f"{where} is free")


def check_initial_peers(peers: list[str], timeout: float) -> list[CheckResult]:
    if not peers:
        return [CheckResult("initial peers", OK, "no initial peers: this peer will start a new swarm")]
    with ThreadPoolExecutor(max_workers=min(8, len(peers))) as pool:
        return list(pool.map(lambda peer: _check_peer(peer, timeout), peers))


def _check_peer(address: str, timeout: float) -> CheckResult:
    name = f"peer {address}"
    fix = (
        "check the address (copy it from the peer's peer_addr.txt), that the peer is running, and that no "
        "firewall or NAT blocks the port"
    )
    try:
        endpoint = _endpoint(address)
        if endpoint is None:
            return CheckResult(
                name,
                WARN,
                "not checked: the address names no host and port (relay-only?)",
                "use an address with /ip4, /ip6 or /dns and /tcp",
            )
        if endpoint.transport != "tcp":
            return CheckResult(
                name,
                WARN,
                f"not checked: {endpoint.transport} (QUIC) addresses are not probed",
                "add a /tcp address of the same peer to have it checked",
            )
        family = {
            "ip4": socket.AF_INET,
            "dns4": socket.AF_INET,
            "ip6": socket.AF_INET6,
            "dns6": socket.AF_INET6,
        }
        try:
            infos = socket.getaddrinfo(
                endpoint.host, endpoint.port, family.get(endpoint.host_protocol, 0), socket.SOCK_STREAM
            )
        except socket.gaierror as error:
            return CheckResult(
                name,
                FAIL,
                f"cannot resolve {endpoint.host}: {error.strerror or error}",
                "check the host name and this machine's DNS",
            )
        target = f"{endpoint.host}:{endpoint.port}"
        if endpoint.relayed:
            target += " (the relay)"
        sock_family, sock_type, proto, _, sockaddr = infos[0]
        started = time.monotonic()
        with socket.socket(sock_family, sock_type, proto) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(sockaddr)
            except TimeoutError:  # socket.timeout is TimeoutError since 3.10
                return CheckResult(name, FAIL, f"{target}: no answer within {timeout:g} s", fix)
            except ConnectionRefusedError:
                return CheckResult(name, FAIL, f"{target}: connection refused (nothing listens there)", fix)
            except OSError as error:
                return CheckResult(name, FAIL, f"{target}: {error.strerror or error}", fix)
        elapsed = (time.monotonic() - started) * 1000
        return CheckResult(
            name, OK, f"tcp {target} answers ({elapsed:.0f} ms); its peer id is not verified here"
        )
    except Exception as error:
        return CheckResult(name, FAIL, f"the check itself failed: {type(error).__name__}: {error}", fix)


def check_swarm_settings(config: SwarmConfig, explicit: list[str], timeout: float) -> list[CheckResult]:
    """Compares this peer's shared settings (swarm/shared_settings.py) with those its first answering initial peer
    announces: what ``swarm run`` would take from the swarm, or refuse."""
    from swarm.network.discovery import discover
    from swarm.shared_settings import chosen_differences, describe, differences, shared_settings

    if not config.network.initial_peers:
        return []
    found = discover(config.network.initial_peers, timeout=timeout)
    if found is None:
        return [
            CheckResult(
                "swarm settings",
                WARN,
                "no initial peer announced its swarm's settings",
                "check that the initial peers run and are reachable (see above)",
            )
        ]
    found_differences = differences(shared_settings(config), found.settings)
    if not found_differences:
        return [
            CheckResult(
                "swarm settings",
                OK,
                f"the same as the swarm's (run {found.run_id!r}, fingerprint {found.fingerprint})",
            )
        ]
    chosen = chosen_differences(found_differences, explicit)
    if chosen:
        return [
            CheckResult(
                "swarm settings",
                FAIL,
                f"set here, different in the swarm: {describe(chosen)}",
                "drop those settings to use the swarm's",
            )
        ]
    return [
        CheckResult(
            "swarm settings",
            OK,
            f"run {found.run_id!r}: swarm run takes the swarm's settings ({describe(found_differences)})",
        )
    ]


# -- output --------------------------------------------------------------------------------------------------


def summary_line(results: list[CheckResult]) -> str:
    counts = {status: sum(result.status == status for result in results) for status in (OK, WARN, FAIL)}
    return f"{counts[OK]} checks passed, {counts[WARN]} warnings, {counts[FAIL]} failed"


def _print_results(results: list[CheckResult], plain: bool, config_path: Path | None, workdir: Path) -> None:
    from swarm.config import DEFAULT_CONFIG_PATH

    header = f"swarm doctor: config {config_path or DEFAULT_CONFIG_PATH}, workdir {workdir}"
    if plain:
        print(header)
        for result in results:
            print(f"{result.status:<4} {result.name}: {result.detail}")
            if result.fix:
                print(f"     fix: {result.fix}")
        print(summary_line(results))
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=sys.stdout)
    styles = {OK: "bold green", WARN: "bold yellow", FAIL: "bold red"}
    table = Table(title=escape(header), title_justify="left", show_lines=False)
    table.add_column("check", overflow="fold", max_width=36)
    table.add_column("status", no_wrap=True)
    table.add_column("detail / what to do", overflow="fold")
    for result in results:
        detail = escape(result.detail)
        if result.fix:
            detail += f"\n[italic]→ {escape(result.fix)}[/italic]"
        table.add_row(escape(result.name), f"[{styles[result.status]}]{result.status}[/]", detail)
    console.print(table)
    failed = any(result.status == FAIL for result in results)
    console.print(escape(summary_line(results)), style="bold red" if failed else "bold")
