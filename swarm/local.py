"""``swarm local``: simulate a swarm on one machine with N real peer processes and the deployment's code path.

Each peer is ``swarm run`` in its own process group with its own work directory (``WORKDIR/peer_<i>``); the first
one starts the swarm and the others join it through the address it writes. On exit, on Ctrl+C or on ``--timeout``,
every peer is asked to stop (SIGINT: checkpoint, leave), and whatever is still running after a grace period is
killed with its whole process group, p2p daemons included.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
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


@dataclass
class LocalPeer:
    index: int
    workdir: Path
    process: subprocess.Popen
    log_file: object

    @property
    def status(self) -> dict:
        return read_json(self.workdir / STATUS_FILE) or {}


def peer_command(
    args: argparse.Namespace, workdir: Path, join: list[str], expected_peers: int, honest: bool = True,
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


def start_peer(
    args: argparse.Namespace, root: Path, index: int, join: list[str], audit_everything: bool = False
) -> LocalPeer:
    """Start simulated peer ``index``; the last ``args.cheaters`` of ``args.peers`` peers are those a
    ``verify.attack`` applies to.
    ``audit_everything``: every peer audits every contribution (``verify.audit_probability=1``)."""
    workdir = root / f"peer_{index}"
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in (STATUS_FILE, PEER_ADDR_FILE, PEER_SUMMARY_FILE):
        (workdir / stale).unlink(missing_ok=True)
    log_file = open(workdir / "stdout.log", "ab")
    environment = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # N peers on one machine: split the cores instead of letting every peer's torch use all of them
    threads = max(1, (os.cpu_count() or 1) // max(1, args.peers))
    environment.setdefault("OMP_NUM_THREADS", str(threads))
    process = subprocess.Popen(
        peer_command(args, workdir, join, args.peers, honest=index < args.peers - getattr(args, "cheaters", 1),
                     audit_everything=audit_everything),
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
        lines = [line.strip() for line in (peer.workdir / "stdout.log").read_text(errors="replace").splitlines()]
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
        reward, loss = status.get("reward"), status.get("loss")
        table.add_row(
            f"peer_{peer.index}",
            status.get("name", "…"),
            str(status.get("epoch", 0)),
            str(status.get("outcome", "")),
            "" if reward is None else f"{reward:.3f}",
            "" if loss is None else f"{loss:.4f}",
            str(status.get("samples", 0)),
            state,
        )
    return table


def run_local(args: argparse.Namespace, config: SwarmConfig) -> int:
    """Run the simulation to the end; returns 0 if every peer finished cleanly."""
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    peers: list[LocalPeer] = []
    deadline = time.monotonic() + args.timeout if args.timeout else float("inf")
    interrupted = False
    first_failure: LocalPeer | None = None
    # a simulated cheater is a demo: audit every contribution so that the run shows it caught, unless the user chose
    audit_everything = config.verify.attack is not None and "audit_probability" not in config.verify.model_fields_set
    if audit_everything:
        console.print(f"swarm local: verify.attack={config.verify.attack} (the last {getattr(args, 'cheaters', 1)} peer(s) cheat):"
                      " every contribution"
                      " is audited (set verify.audit_probability to choose otherwise)")
    try:
        peers.append(start_peer(args, root, 0, [], audit_everything))
        addresses = wait_for_address(peers[0], FIRST_PEER_START_TIMEOUT)
        for index in range(1, args.peers):
            peers.append(start_peer(args, root, index, addresses[:1], audit_everything))
        last_line = ""
        live = Live(progress_table(peers, config.training.max_epochs), console=console, auto_refresh=False,
                    transient=False) if console.is_terminal and not args.plain else None
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
                        f"peer_{p.index} epoch {p.status.get('epoch', 0)} {p.status.get('outcome', '')}" for p in peers
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
    failed = [f"peer_{p.index} (exit {p.process.returncode})" for p in peers if p.process.returncode not in (0,)]
    if interrupted:
        return 130
    if timed_out:
        console.print(f"swarm local: stopped after the --timeout of {args.timeout:.0f}s")
        return 1
    if first_failure is not None:
        print(f"swarm local: peer_{first_failure.index} exited with code {first_failure.process.returncode}: "
              f"{error_line(first_failure)}", file=sys.stderr, flush=True)  # one line, never wrapped
        console.print(f"swarm local: stopped the other peers; logs in {root}/peer_*/stdout.log")
        return 1
    if failed:
        console.print(f"swarm local: {', '.join(failed)} failed; logs in {root}/peer_*/stdout.log")
        return 1
    console.print(f"swarm local: all {len(peers)} peers finished; summary in {summary_path}")
    return 0
