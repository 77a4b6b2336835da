"""Soak benchmark: does the memory of every process of a peer stay flat over thousands of epochs?

Two modes:

* **records** (default) — the swarm's own DHT record traffic at epoch cadence, as fast as it goes: ``--peers``
  simulated peers, each with a real DHT node process (:func:`swarm.network.dht.start_dht`, the run's validators,
  its p2p daemon) and the real boards. Per epoch every peer publishes its status and reads everybody's (the
  barrier), publishes its commitment and reads the epoch's (after the round), declares itself under the averager's
  matchmaking key and its state-sharing key (as hivemind's averager does), reads every verdict (the verifier's
  ``_finalize``) and, with ``--audit-probability``, one auditor publishes a verdict. Every peer runs a real
  :class:`~swarm.training.ledger_recorder.LedgerRecorder` (SQLite, replication thread): a contribution entry per round, an
  audit entry per verdict. What is not simulated: training, all-reduce traffic, contributions on disk.
* **training** (``--training``) — a real ``swarm local`` of ``--peers`` peers for ``--epochs`` epochs.

At each checkpoint (every ``--every`` epochs) the resident set size (RSS) of every process is sampled: the driver
(records mode: the process holding the boards and recorders, like a training process) or each peer's training
process, its DHT process, its averager process and p2p daemon. The table shows the mean per role, and the growth
from the first to the last checkpoint (target: at most 5 %). Records mode also prints what one DHT node holds
(entries, heap entries including hivemind's stale ones, bytes).

Usage::

    python bench/soak.py                          # records mode: 3 peers, 5000 epochs, checkpoints every 1000
    python bench/soak.py --quick                  # 2 peers, 600 epochs, every 200 (about a minute)
    python bench/soak.py --no-sweep               # without the DHT storage sweep (swarm.network.storage)
    python bench/soak.py --training --epochs 300 --every 50   # a real swarm local
    python bench/soak.py --json                   # one JSON object on stdout

The first checkpoint is the baseline: before it, start-up allocations, caches and time-bounded records (statuses,
averager keys) reach their steady state. RSS of forked processes includes pages shared with their parent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from throughput import PROTOCOL_SCHEDULE, BenchError, log, stop_group

from swarm.local import local_argv

DEFAULT_PEERS, DEFAULT_EPOCHS, DEFAULT_EVERY = 3, 5000, 1000
QUICK_PEERS, QUICK_EPOCHS, QUICK_EVERY = 2, 600, 200
TARGET_GROWTH = 0.05
ROLES = ("driver", "train", "dht", "averager", "p2pd")


@dataclass
class Checkpoint:
    epoch: int
    seconds: float  # since the start of the run
    rss_mb: dict[str, float]  # role -> mean RSS over the peers (MB)
    rss_max_mb: dict[str, float]
    storage: dict[str, Any] = field(default_factory=dict)  # records mode: what DHT node 0 holds


@dataclass
class Results:
    mode: str
    peers: int
    epochs: int
    sweep: bool
    checkpoints: list[Checkpoint]
    runtime_s: float
    load_average: float

    def growth(self) -> dict[str, float]:
        """role -> relative growth of the mean RSS from the first to the last checkpoint."""
        if len(self.checkpoints) < 2:
            return {}
        first, last = self.checkpoints[0].rss_mb, self.checkpoints[-1].rss_mb
        return {
            role: (last[role] - first[role]) / first[role] for role in first if role in last and first[role]
        }

    def flat(self) -> bool:
        return all(value <= TARGET_GROWTH for value in self.growth().values())

    def as_json(self) -> dict[str, Any]:
        return dict(
            mode=self.mode,
            peers=self.peers,
            epochs=self.epochs,
            sweep=self.sweep,
            checkpoints=[asdict(checkpoint) for checkpoint in self.checkpoints],
            growth={role: round(value, 4) for role, value in self.growth().items()},
            target_growth=TARGET_GROWTH,
            flat=self.flat(),
            runtime_s=round(self.runtime_s, 1),
            load_average=self.load_average,
        )


def rss_mb(pid: int) -> float | None:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def summarize(samples: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    mean = {role: round(sum(values) / len(values), 1) for role, values in samples.items() if values}
    top = {role: round(max(values), 1) for role, values in samples.items() if values}
    return mean, top


# ---- records mode ------------------------------------------------------------------------------------------------
class SimulatedPeer:
    """One peer's DHT node, boards and ledger recorder."""

    def __init__(self, index: int, root: Path, run_id: str, initial_peers: list[str], audit_window: int):
        from swarm.config import NetworkConfig, SwarmConfig
        from swarm.identity import Identity
        from swarm.ledger.config import LedgerConfig
        from swarm.network.dht import start_dht
        from swarm.network.records import CommitmentBoard, StatusBoard, VerdictBoard
        from swarm.training.ledger_recorder import LedgerRecorder

        self.workdir = root / f"peer_{index}"
        self.identity = Identity.load_or_create(self.workdir / "identity.key")
        self.peer_id = str(self.identity.peer_id)
        network = NetworkConfig(client_mode=False, initial_peers=initial_peers)
        self.dht = start_dht(network, self.identity, self.workdir, run_id=run_id)
        self.config = SwarmConfig(run_id=run_id, workdir=self.workdir, verify=dict(audit_window=audit_window))
        ttl = audit_window * self.config.averaging.round_timeout * 2  # as the verifier sets it
        self.status = StatusBoard(self.dht, run_id, self.identity, ttl=self.config.averaging.peer_timeout)
        self.commitments = CommitmentBoard(self.dht, run_id, self.identity, ttl)
        self.verdicts = VerdictBoard(self.dht, run_id, self.identity, ttl)
        self.recorder = LedgerRecorder(
            self.config, self.identity, self.dht, settings=LedgerConfig(anchor="none")
        )
        self.recorder.start()
        self.averager_key = f"{run_id}_grads.0b"  # hivemind's matchmaking key with no group bits
        self.state_key = f"{run_id}_grads.all_averagers"

    def maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    def close(self) -> None:
        self.recorder.close(timeout=2.0)
        self.dht.shutdown()


def make_commitment(peer_id: str, epoch: int):
    from swarm.network.records import Commitment

    digest = hashlib.sha256(f"{peer_id}:{epoch}".encode()).hexdigest()
    return Commitment(
        peer_id=peer_id,
        epoch=epoch,
        state_hash=digest,
        data_seed=digest[::-1],
        samples=128,
        tokens=128 * 12,
        rollouts_hash=digest,
        gradient_hash=digest[::-1],
        precision="fp32",
    )


def run_epoch(
    peers: list[SimulatedPeer],
    epoch: int,
    rng: random.Random,
    audit_probability: float,
    pool: ThreadPoolExecutor,
) -> None:
    """What one epoch of every peer does to the DHT (module docstring); the peers' DHT calls run in parallel, the
    ledger hooks in this thread (the recorders' SQLite connections belong to it)."""
    from hivemind.utils import get_dht_time

    from swarm.network.records import AuditVerdict, PeerStatus

    def publish(peer: SimulatedPeer) -> None:
        peer.status.publish(
            PeerStatus(
                peer_id=peer.peer_id,
                name=f"sim-{peer.peer_id[-6:]}",
                epoch=epoch,
                state_hash="0" * 64,
                ready_epoch=epoch,
                samples=128 * epoch,
                reward=0.5,
            )
        )
        peer.dht.store(peer.averager_key, True, get_dht_time() + 15, subkey=peer.identity.peer_id.to_bytes())
        peer.dht.store(
            peer.state_key, float(epoch), get_dht_time() + 15, subkey=peer.identity.peer_id.to_bytes()
        )
        peer.commitments.publish(make_commitment(peer.peer_id, epoch))

    def read_round(peer: SimulatedPeer) -> dict:
        peer.status.fetch()  # the barrier
        return peer.commitments.fetch(epoch)  # after the round

    list(pool.map(publish, peers))
    found = list(pool.map(read_round, peers))
    for peer, commitments in zip(peers, found):
        peer.recorder.on_round(epoch, commitments)
    published = []
    for index, audited in enumerate(peers):
        if len(peers) > 1 and rng.random() < audit_probability:
            auditor = peers[(index + 1) % len(peers)]
            commitment = found[0].get(audited.peer_id) or make_commitment(audited.peer_id, epoch)
            verdict = AuditVerdict(
                auditor=auditor.peer_id,
                audited=audited.peer_id,
                epoch=epoch,
                commitment=commitment.digest(),
                verdict="pass",
                error=0.0,
                role="primary",
            )
            published.append((auditor, verdict))
    list(pool.map(lambda item: item[0].verdicts.publish(item[1]), published))
    for auditor, verdict in published:
        auditor.recorder.on_verdict(verdict)
    list(pool.map(lambda peer: peer.verdicts.fetch(None), peers))  # the verifier's _finalize reads them all
    for peer in peers:
        peer.recorder.on_epoch_end(epoch + 1)


def node_figures(peer: SimulatedPeer, run_id: str) -> dict[str, Any]:
    from swarm.network.records import commitments_key, verdicts_key
    from swarm.network.storage import storage_report

    names = [
        f"{run_id}.peers",
        commitments_key(run_id),
        verdicts_key(run_id),
        f"{run_id}.ledger.heads",
        f"{run_id}.ledger.{peer.peer_id}",
        peer.averager_key,
        peer.state_key,
    ]
    report = storage_report(peer.dht, names)
    return dict(
        keys=report.keys["storage"],
        subkeys=report.subkeys["storage"],
        heap=report.heap["storage"],
        kb=round(report.bytes["storage"] / 1024, 1),
        cache_keys=report.keys["cache"],
        cache_kb=round(report.bytes["cache"] / 1024, 1),
        named={
            name.split(":", 1)[1].replace(run_id, "<run>").replace(peer.peer_id, "<me>"): vars(figures)
            for name, figures in report.named.items()
            if name.startswith("storage:")
        },
    )


def sample_records(peers: list[SimulatedPeer]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {role: [] for role in ("driver", "dht", "p2pd")}
    samples["driver"].append(rss_mb(os.getpid()) or 0.0)
    for peer in peers:
        if (value := rss_mb(peer.dht.pid)) is not None:
            samples["dht"].append(value)
        try:
            children = psutil.Process(peer.dht.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            if child.name() == "p2pd" and (value := rss_mb(child.pid)) is not None:
                samples["p2pd"].append(value)
    return samples


def run_records(
    root: Path, peers: int, epochs: int, every: int, sweep: bool, audit_probability: float, audit_window: int
) -> list[Checkpoint]:
    from swarm.network.storage import install_sweeper, run_windows

    run_id = f"soak-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    simulated: list[SimulatedPeer] = []
    try:
        for index in range(peers):
            initial = simulated[0].maddrs() if simulated else []
            simulated.append(SimulatedPeer(index, root, run_id, initial, audit_window))
            if sweep:
                install_sweeper(simulated[-1].dht, run_windows(run_id, audit_window))
        log(
            f"{peers} DHT nodes up in {time.monotonic() - started:.0f}s; {epochs} epochs, checkpoint every {every}"
        )
        rng = random.Random(0)
        checkpoints = []
        pool = ThreadPoolExecutor(max_workers=peers, thread_name_prefix="soak")
        for epoch in range(epochs):
            run_epoch(simulated, epoch, rng, audit_probability, pool)
            if (epoch + 1) % every == 0:
                time.sleep(0.5)  # let replication threads finish what this epoch woke them for
                mean, top = summarize(sample_records(simulated))
                storage = node_figures(simulated[0], run_id)
                checkpoints.append(
                    Checkpoint(epoch + 1, round(time.monotonic() - started, 1), mean, top, storage)
                )
                log(
                    f"epoch {epoch + 1}: {time.monotonic() - started:.0f}s, RSS {mean}, node 0 holds "
                    f"{storage['subkeys']} entries / {storage['heap']} heap entries / {storage['kb']} KB"
                )
        pool.shutdown()
        return checkpoints
    finally:
        for peer in simulated:
            try:
                peer.close()
            except Exception as error:
                log(f"closing a simulated peer failed: {error!r}")


# ---- training mode -----------------------------------------------------------------------------------------------
def classify(root_pid: int) -> dict[str, list[int]]:
    """role -> pids of a running ``swarm local``: each peer's training process (a child running ``swarm.cli run``),
    its forked DHT process (the one with a p2pd child), averager (the other forks) and p2p daemon."""
    roles: dict[str, list[int]] = {role: [] for role in ("train", "dht", "averager", "p2pd")}
    try:
        peers = [
            child for child in psutil.Process(root_pid).children() if "swarm.cli" in " ".join(child.cmdline())
        ]
    except psutil.Error:
        return roles
    for peer in peers:
        roles["train"].append(peer.pid)
        try:
            forks = [child for child in peer.children() if "swarm.cli" in " ".join(child.cmdline())]
        except psutil.Error:
            continue
        for fork in forks:
            try:
                daemons = [child.pid for child in fork.children() if child.name() == "p2pd"]
            except psutil.Error:
                continue
            roles["dht" if daemons else "averager"].append(fork.pid)
            roles["p2pd"].extend(daemons)
    return roles


def peer_epoch(workdir: Path) -> int:
    try:
        return int(json.loads((workdir / "status.json").read_text()).get("epoch", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def run_training(
    root: Path, peers: int, epochs: int, every: int, timeout: float, overrides: Sequence[str]
) -> list[Checkpoint]:
    run_id = f"soak-{uuid.uuid4().hex[:8]}"
    workdir = root / "swarm"
    settings = [f"run_id={run_id}", *PROTOCOL_SCHEDULE, *overrides]
    command = [
        sys.executable,
        "-m",
        "swarm.cli",
        *local_argv(workdir, peers, epochs, settings, "--timeout", str(timeout)),
    ]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    started = time.monotonic()
    checkpoints: list[Checkpoint] = []
    workdir.mkdir(parents=True)
    with open(root / "local.log", "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )
    try:
        target = every
        while process.poll() is None and target <= epochs:
            time.sleep(1.0)
            if time.monotonic() - started > timeout + 30:
                raise BenchError(f"swarm local did not finish in {timeout:.0f}s")
            epoch = min((peer_epoch(workdir / f"peer_{index}") for index in range(peers)), default=0)
            if epoch < target:
                continue
            roles = classify(process.pid)
            samples = {
                role: [value for pid in pids if (value := rss_mb(pid)) is not None]
                for role, pids in roles.items()
            }
            mean, top = summarize(samples)
            checkpoints.append(Checkpoint(epoch, round(time.monotonic() - started, 1), mean, top))
            log(f"epoch {epoch}: {time.monotonic() - started:.0f}s, RSS {mean}")
            target = (epoch // every + 1) * every
        process.wait(timeout=max(1.0, timeout + 30 - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        raise BenchError(f"swarm local did not finish in {timeout:.0f}s") from None
    finally:
        if process.poll() is None:
            stop_group(process)
    if process.returncode != 0:
        if not checkpoints:
            raise BenchError(f"swarm local failed (exit {process.returncode}); see {root / 'local.log'}")
        log(f"swarm local exited {process.returncode} (its --timeout?): the checkpoints reached are shown")
    return checkpoints


# ---- output ------------------------------------------------------------------------------------------------------
def print_tables(results: Results) -> None:
    from rich.console import Console
    from rich.table import Table

    roles = [role for role in ROLES if any(role in c.rss_mb for c in results.checkpoints)]
    table = Table(
        title=f"RSS per process, mean over {results.peers} peers (MB); {results.mode} mode"
        f"{'' if results.sweep or results.mode == 'training' else ', no sweep'}"
    )
    table.add_column("epoch", justify="right")
    table.add_column("s", justify="right")
    for role in roles:
        table.add_column(role, justify="right")
    if results.mode == "records":
        for column in ("DHT entries", "heap", "KB"):
            table.add_column(column, justify="right")
    for checkpoint in results.checkpoints:
        row = [
            str(checkpoint.epoch),
            f"{checkpoint.seconds:.0f}",
            *(f"{checkpoint.rss_mb.get(role, 0):.1f}" for role in roles),
        ]
        if results.mode == "records":
            row += [
                str(checkpoint.storage.get("subkeys")),
                str(checkpoint.storage.get("heap")),
                f"{checkpoint.storage.get('kb', 0):.0f}",
            ]
        table.add_row(*row)
    growth = results.growth()
    if growth:
        first, last = results.checkpoints[0].epoch, results.checkpoints[-1].epoch
        table.add_row(
            f"{first}→{last}",
            "",
            *(f"{growth.get(role, 0) * 100:+.1f}%" for role in roles),
            *([""] * 3 if results.mode == "records" else []),
        )
    console = Console()
    console.print(table)
    if results.mode == "records" and results.checkpoints:
        named = Table(title="DHT node 0 at the last checkpoint: entries / heap entries / bytes per key")
        for column in ("key", "entries", "heap", "bytes"):
            named.add_column(column, justify="left" if column == "key" else "right")
        for name, figures in sorted(results.checkpoints[-1].storage.get("named", {}).items()):
            named.add_row(name, str(figures["subkeys"]), str(figures["heap"]), str(figures["bytes"]))
        console.print(named)
    verdict = "flat" if results.flat() else "NOT flat"
    console.print(
        f"growth target ≤ {TARGET_GROWTH:.0%} per role: {verdict}; load average at start "
        f"{results.load_average:.2f} on {os.cpu_count()} CPUs; took {results.runtime_s:.0f}s"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--training", action="store_true", help="run a real swarm local instead of the records"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_PEERS} peers, {QUICK_EPOCHS} epochs, every {QUICK_EVERY}",
    )
    parser.add_argument("--peers", type=int, help=f"peers (default {DEFAULT_PEERS})")
    parser.add_argument("--epochs", type=int, help=f"epochs (default {DEFAULT_EPOCHS}; training: 300)")
    parser.add_argument("--every", type=int, help=f"epochs between checkpoints (default {DEFAULT_EVERY})")
    parser.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="records mode: do not install the DHT storage sweep (the state before the fix)",
    )
    parser.add_argument("--audit-probability", type=float, default=0.09, help="records mode (default 0.09)")
    parser.add_argument("--audit-window", type=int, default=3, help="records mode: verify.audit_window (3)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training mode: config override for swarm local (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="training mode: seconds (default 1800)")
    parser.add_argument(
        "--workdir", type=Path, help="keep the files here (default: a temporary dir, removed)"
    )
    args = parser.parse_args(argv)
    if args.peers is None:
        args.peers = QUICK_PEERS if args.quick else DEFAULT_PEERS
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else (300 if args.training else DEFAULT_EPOCHS)
    if args.every is None:
        args.every = QUICK_EVERY if args.quick else (50 if args.training else DEFAULT_EVERY)
    if args.peers < 1 or args.epochs < 1 or args.every < 1:
        parser.error("--peers, --epochs and --every must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="swarm-soak-"))
    load = os.getloadavg()[0]
    started = time.monotonic()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if args.training:
            checkpoints = run_training(
                root, args.peers, args.epochs, args.every, args.timeout, args.overrides
            )
        else:
            checkpoints = run_records(
                root,
                args.peers,
                args.epochs,
                args.every,
                args.sweep,
                args.audit_probability,
                args.audit_window,
            )
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    results = Results(
        "training" if args.training else "records",
        args.peers,
        args.epochs,
        args.sweep,
        checkpoints,
        time.monotonic() - started,
        round(load, 2),
    )
    if args.json:
        print(json.dumps(results.as_json()))
    else:
        print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
