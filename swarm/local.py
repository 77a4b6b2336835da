"""``swarm local``: simulate a swarm on one machine with N real peer processes and the deployment's code path.

Each peer is ``swarm run`` in its own process group with its own work directory (``WORKDIR/peer_<i>``); the first
one starts the swarm and the others join it through the address it writes. On exit, on Ctrl+C or on ``--timeout``,
every peer is asked to stop (SIGINT: checkpoint, leave), and whatever is still running after a grace period is
killed with its whole process group, p2p daemons included.

On Linux ``swarm local`` imports the training stack (torch, transformers, TRL: about 10 s of
CPU) once and forks each peer from itself, so N peers do not pay for N imports; each forked peer then runs exactly
what ``swarm run`` would (:class:`ForkedPeer`). Elsewhere each peer is a ``python -m swarm.cli run`` subprocess.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import multiprocessing.util
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from swarm.config import SwarmConfig
from swarm.errors import UserError
from swarm.monitor.summary import PEER_SUMMARY_FILE, STATUS_FILE, read_json, write_summary
from swarm.network.dht import PEER_ADDR_FILE

GRACE_SECONDS = 20.0
FIRST_PEER_START_TIMEOUT = 120.0


# runs ``swarm ARGV`` in this process and returns its exit code (``swarm.cli.run_forked_peer``)
PeerMain = Callable[[list[str]], int]


def _own_hivemind_locks() -> None:
    """Give this forked peer hivemind's process-shared locks of its own. hivemind makes them at import time
    (``MPFuture``'s update and initialization locks, ``SharedBytes``' lock, the context executor's lock), so every
    process forked from the importing one shares them: a sibling peer killed (``kill -9``) while holding one left
    every later peer's DHT hanging in ``MPFuture.set_result`` (seen: "the DHT process was not ready after 60s").
    Within this peer, its DHT and averager processes keep sharing its locks, as hivemind expects."""
    mpfuture = sys.modules.get("hivemind.utils.mpfuture")
    if mpfuture is not None:
        mpfuture.MPFuture.reset_backend()
    asyncio_utils = sys.modules.get("hivemind.utils.asyncio")
    if asyncio_utils is not None:
        asyncio_utils._AsyncContextWrapper.EXECUTOR_LOCK = multiprocessing.Lock()


class ForkedPeer:
    """A peer forked from ``swarm local``, with the part of :class:`subprocess.Popen` that ``swarm local`` uses.

    The child starts its own session (its process group takes its p2p daemon and averager with it), reads nothing
    from stdin, writes stdout and stderr to ``log_fd`` (stderr to ``stderr_fd`` where given), and runs
    ``main(argv)``. It then ends as a Python program does: non-daemon threads are joined and ``atexit`` hooks run
    (W&B's service teardown is one) before it exits with ``main``'s code; an exception that escapes ``main`` prints its traceback to the log and exits 1. Nothing of the
    parent's stack runs in the child."""

    def __init__(
        self,
        main: PeerMain,
        argv: list[str],
        log_fd: int,
        environment: dict[str, str],
        stderr_fd: int | None = None,
    ):
        sys.stdout.flush()
        sys.stderr.flush()  # else the child would write the parent's buffered output a second time
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            self._child(main, argv, log_fd, environment, log_fd if stderr_fd is None else stderr_fd)

    @staticmethod
    def _child(
        main: PeerMain, argv: list[str], log_fd: int, environment: dict[str, str], stderr_fd: int
    ) -> None:
        code = 1
        try:
            _forget_parent_exit_handlers()
            _own_hivemind_locks()
            os.setsid()
            stdin = os.open(os.devnull, os.O_RDONLY)
            os.dup2(stdin, 0)
            os.dup2(log_fd, 1)
            os.dup2(stderr_fd, 2)
            # fresh line-buffered streams on the log (as PYTHONUNBUFFERED gives a subprocess peer), whatever the
            # parent's sys.stdout had become
            sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            os.environ.update(environment)
            sys.argv = [
                sys.argv[0],
                *argv,
            ]  # what the subprocess peer's sys.argv would be (recipes may read it)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            threads = environment.get("OMP_NUM_THREADS", "")
            if "torch" in sys.modules and threads.isdigit():  # imported before the fork: it read the parent's
                sys.modules["torch"].set_num_threads(int(threads))
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                threading._shutdown()  # type: ignore[attr-defined]  # what interpreter exit does first
                atexit._run_exitfuncs()
                logging.shutdown()  # its own atexit hook was the parent's
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"peer process {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def _forget_parent_exit_handlers() -> None:
    """In a forked child: the parent's ``atexit`` hooks and ``weakref.finalize`` exit callbacks are not run at the
    child's exit. They release the parent's resources, which the parent and its other children still use — W&B's
    media directory, made when TRL imports wandb, is one: the first peer to exit removed it under the others. What
    the child registers itself still runs (as in a ``multiprocessing`` child, whose exit runs none of the parent's
    hooks either).

    ``multiprocessing``'s own exit hook is registered again, with the parent's finalizers and children forgotten
    (as ``multiprocessing`` does for the children it forks): at exit the child then stops
    its daemonic children (the DHT and averager processes) and removes its ``pymp-*`` directory, as a peer started
    by ``python -m swarm.cli run`` does. Without it they outlived the peer (a DHT process still reading its pipe
    failed with a traceback in the peer's log) and every peer left a directory in /tmp behind."""
    atexit._clear()  # type: ignore[attr-defined]
    for info in weakref.finalize._registry.values():  # type: ignore[attr-defined]
        info.atexit = False
    weakref.finalize._registered_with_atexit = False  # type: ignore[attr-defined]  # the child's own, when made
    multiprocessing.util._finalizer_registry.clear()  # type: ignore[attr-defined]
    # the parent's children are not the child's: at exit it would terminate them (a DHT process of the parent)
    # and then fail joining them, leaving its own directory behind
    multiprocessing.process._children.clear()  # type: ignore[attr-defined]
    atexit.register(multiprocessing.util._exit_function)  # type: ignore[attr-defined]


@dataclass
class LocalPeer:
    index: int
    workdir: Path
    process: subprocess.Popen | ForkedPeer
    log_file: object

    @property
    def status(self) -> dict:
        return read_json(self.workdir / STATUS_FILE) or {}


def peer_command(
    args: argparse.Namespace,
    workdir: Path,
    join: list[str],
    expected_peers: int,
    honest: bool = True,
    audit_everything: bool = False,
) -> list[str]:
    """The ``swarm run`` command line of one simulated peer: the user's config and overrides, plus its own dir.
    A configured ``verify.attack`` is kept for the dishonest peer only (``honest=False``)."""
    command = [sys.executable, "-m", "swarm.cli", "run", "--workdir", str(workdir)]
    if args.config is not None:
        command += ["--config", str(args.config)]
    for override in args.overrides:
        command += ["--set", override]
    if honest:
        command += ["--set", "verify.attack=null"]
    if audit_everything:
        command += ["--set", "verify.audit_probability=1.0"]
    if args.recipe:
        command += ["--recipe", args.recipe]
    if args.max_epochs is not None:
        command += ["--max-epochs", str(args.max_epochs)]
    for address in join:
        command += ["--join", address]
    return command + ["--expected-peers", str(expected_peers), "--exit-with-parent", "--settings-from-parent"]


def local_argv(
    workdir: Path, peers: int, epochs: int | None, settings: Iterable[str] = (), *extra: str
) -> list[str]:
    """The arguments of ``swarm local`` (what follows ``swarm``), as the tests and benchmarks that drive a simulated
    swarm build them: ``peers`` peers for ``epochs`` epochs (None: no limit) under ``workdir`` (``peer_<i>``), plain
    output, the ``extra`` arguments, then each of ``settings`` as ``--set``."""
    argv = ["local", "--peers", str(peers), "--plain", "--workdir", str(workdir)]
    if epochs is not None:
        argv += ["--max-epochs", str(epochs)]
    argv += extra
    for setting in settings:
        argv += ["--set", setting]
    return argv


def preload() -> bool:
    """Import what every peer imports, so that forked peers start with it; False where peers are not forked: off
    Linux (macOS's system libraries are not safe to use in a child forked after they were loaded, which is why
    Python's multiprocessing spawns there)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    import swarm.monitor.dashboard  # noqa: F401
    import swarm.monitor.tracking  # noqa: F401
    import swarm.training.trainer  # noqa: F401

    return True


def start_peer(
    args: argparse.Namespace,
    root: Path,
    index: int,
    join: list[str],
    audit_everything: bool = False,
    main: PeerMain | None = None,
) -> LocalPeer:
    """Start simulated peer ``index``; the last ``args.cheaters`` of ``args.peers`` peers are those a
    ``verify.attack`` applies to.
    ``audit_everything``: every peer audits every contribution (``verify.audit_probability=1``).
    ``main``: fork the peer from this process and run ``main(argv)`` in it (see :class:`ForkedPeer`); without it
    the peer is a subprocess."""
    workdir = root / f"peer_{index}"
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in (STATUS_FILE, PEER_ADDR_FILE, PEER_SUMMARY_FILE):
        (workdir / stale).unlink(missing_ok=True)
    log_file = open(workdir / "stdout.log", "ab")
    environment = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # N peers on one machine: split the cores instead of letting every peer's torch use all of them
    threads = max(1, (os.cpu_count() or 1) // max(1, args.peers))
    environment.setdefault("OMP_NUM_THREADS", str(threads))
    command = peer_command(
        args,
        workdir,
        join,
        args.peers,
        honest=index < args.peers - getattr(args, "cheaters", 1),
        audit_everything=audit_everything,
    )
    if main is not None:
        # command is [python, -m, swarm.cli, run, ...]: the fork runs what follows swarm.cli
        forked = ForkedPeer(main, command[3:], log_file.fileno(), environment)
        return LocalPeer(index, workdir, forked, log_file)
    process = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=environment,
        start_new_session=True,  # its own process group: p2pd and averager children go down with it
    )
    return LocalPeer(index, workdir, process, log_file)


def error_line(peer: LocalPeer) -> str:
    """The line that says why ``peer`` exited: its last ``swarm: error:`` line, else the last line it printed."""
    try:
        lines = [
            line.strip() for line in (peer.workdir / "stdout.log").read_text(errors="replace").splitlines()
        ]
    except OSError:
        return "(no output)"
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("swarm: error:")]
    return (errors or lines or ["(no output)"])[-1][:400]


def wait_for_address(peer: LocalPeer, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    path = peer.workdir / PEER_ADDR_FILE
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise UserError(f"peer_0 exited with code {peer.process.returncode}: {error_line(peer)}")
        if path.is_file() and path.read_text().strip():
            return path.read_text().split()
        time.sleep(0.2)
    raise UserError(f"peer_0 did not start within {timeout:.0f}s (see {peer.workdir / 'stdout.log'})")


def stop_peers(peers: list[LocalPeer], grace: float = GRACE_SECONDS) -> None:
    """SIGINT every running peer, wait up to ``grace`` seconds, then SIGKILL their whole process groups."""
    for peer in peers:
        if peer.process.poll() is None:  # the peer itself shuts its DHT, averager and p2pd down in order
            peer.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for peer in peers:
        try:
            peer.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for peer in peers:
        _signal_group(peer.process.pid, signal.SIGKILL)  # also reaps daemons the peer left behind
        if peer.process.poll() is None:
            peer.process.wait()
        peer.log_file.close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def progress_table(peers: list[LocalPeer], max_epochs: int | None) -> Table:
    table = Table(title=f"swarm local: {len(peers)} peers" + (f", {max_epochs} epochs" if max_epochs else ""))
    for column in ("peer", "name", "epoch", "last round", "reward", "loss", "samples", "state"):
        table.add_column(column)
    for peer in peers:
        status = peer.status
        code = peer.process.poll()
        state = "running" if code is None else ("done" if code == 0 else f"exit {code}")
        train, swarm = status.get("train", {}), status.get("swarm", {})
        reward, loss = train.get("reward"), train.get("loss")
        table.add_row(
            f"peer_{peer.index}",
            status.get("name", "…"),
            str(status.get("epoch", 0)),
            str(swarm.get("outcome", "")),
            "" if reward is None else f"{reward:.3f}",
            "" if loss is None else f"{loss:.4f}",
            str(train.get("total_samples", 0)),
            state,
        )
    return table


def run_local(args: argparse.Namespace, config: SwarmConfig, main: PeerMain | None = None) -> int:
    """Run the simulation to the end; returns 0 if every peer finished cleanly. With ``main`` (what ``swarm``
    runs for an argv) and a platform that forks, peers are forked from this process (see :func:`preload`)."""
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    peers: list[LocalPeer] = []
    deadline = time.monotonic() + args.timeout if args.timeout else float("inf")
    interrupted = False
    first_failure: LocalPeer | None = None
    # a simulated cheater is a demo: audit every contribution so that the run shows it caught, unless the user chose
    audit_everything = (
        config.verify.attack is not None and "audit_probability" not in config.verify.model_fields_set
    )
    if audit_everything:
        console.print(
            f"swarm local: verify.attack={config.verify.attack} (the last {getattr(args, 'cheaters', 1)} peer(s) cheat):"
            " every contribution"
            " is audited (set verify.audit_probability to choose otherwise)"
        )
    try:
        if main is not None and not preload():
            main = None
        peers.append(start_peer(args, root, 0, [], audit_everything, main))
        addresses = wait_for_address(peers[0], FIRST_PEER_START_TIMEOUT)
        for index in range(1, args.peers):
            peers.append(start_peer(args, root, index, addresses[:1], audit_everything, main))
        last_line = ""
        live = (
            Live(
                progress_table(peers, config.training.max_epochs),
                console=console,
                auto_refresh=False,
                transient=False,
            )
            if console.is_terminal and not args.plain
            else None
        )
        if live is not None:
            live.start()
        try:
            while any(peer.process.poll() is None for peer in peers) and time.monotonic() < deadline:
                crashed = next((peer for peer in peers if peer.process.poll() not in (None, 0)), None)
                if crashed is not None:  # the others would only wait for it: stop them now
                    first_failure = crashed
                    break
                if live is not None:
                    live.update(progress_table(peers, config.training.max_epochs), refresh=True)
                else:
                    line = " | ".join(
                        f"peer_{p.index} epoch {p.status.get('epoch', 0)} {p.status.get('swarm', {}).get('outcome', '')}"
                        for p in peers
                    )
                    if line != last_line:
                        print(line, file=sys.stderr, flush=True)
                        last_line = line
                time.sleep(0.5)
        finally:
            if live is not None:
                live.update(progress_table(peers, config.training.max_epochs), refresh=True)
                live.stop()
    except KeyboardInterrupt:
        interrupted = True
        console.print("Stopping every peer (checkpoints are saved)…")
    finally:
        stop_peers(peers)
    timed_out = time.monotonic() >= deadline
    reports = [read_json(peer.workdir / PEER_SUMMARY_FILE) for peer in peers]
    peer_reports = [report["peers"][0] for report in reports if report and report.get("peers")]
    summary_path = args.summary or root / "summary.json"
    write_summary(summary_path, config.run_id, peer_reports)
    failed = [
        f"peer_{p.index} (exit {p.process.returncode})" for p in peers if p.process.returncode not in (0,)
    ]
    if interrupted:
        return 130
    if timed_out:
        console.print(f"swarm local: stopped after the --timeout of {args.timeout:.0f}s")
        return 1
    if first_failure is not None:
        # one line, never wrapped
        print(
            f"swarm local: peer_{first_failure.index} exited with code {first_failure.process.returncode}: "
            f"{error_line(first_failure)}",
            file=sys.stderr,
            flush=True,
        )
        console.print(f"swarm local: stopped the other peers; logs in {root}/peer_*/stdout.log")
        return 1
    if failed:
        console.print(f"swarm local: {', '.join(failed)} failed; logs in {root}/peer_*/stdout.log")
        return 1
    console.print(f"swarm local: all {len(peers)} peers finished; summary in {summary_path}")
    return 0
