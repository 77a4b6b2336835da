"""Throughput and communication benchmark of the swarm, with its baseline measured in the same run.

What is measured (every figure comes from the ``metrics.jsonl`` line each peer appends per epoch):

* **solo** — one peer training alone (``swarm run``, E epochs): ``sum(samples) / sum(compute_s + sync_s)``.
* **swarm** — N peers (``swarm local``, E epochs): samples/s of each peer computed as above, averaged over
  the peers, and the compute fraction ``sum(compute_s) / sum(compute_s + sync_s)`` over all peers and
  epochs. Both are compared with the solo baseline: per peer, and in aggregate (N x per peer).
* **bytes per epoch** — for each compression (none, fp16, 8bit) a 2-peer ``swarm local`` of 2 epochs: the
  mean all-reduce payload one peer sends in one round, over rounds whose outcome is ``averaged``. With 2
  peers the butterfly all-reduce has each peer send half its gradient and half of the averaged result, so
  the uncompressed (fp32) figure should be about ``4 bytes x parameters``; fp16 half of it; 8bit a quarter
  plus a 1 KiB codebook (256 fp32 levels) per tensor part sent, which weighs a lot next to the tiny model.

Epoch 0 is a warm-up (imports, first TRL set-up, peers finding each other) and is left out of the
throughput figures when more than one epoch runs. Every run gets a fresh directory under the work dir and
its own ``run_id``; each subprocess runs in its own session under a timeout, and its process group is
stopped on timeout so that no ``p2pd`` daemon is left behind (the benchmark checks, and warns if one is).

Usage::

    python bench/throughput.py                 # table on stdout, progress on stderr (about 3-5 minutes)
    python bench/throughput.py --json          # one JSON object on stdout
    python bench/throughput.py --quick         # 2 peers, 2 epochs: a smoke run
    python bench/throughput.py --peers 4 --epochs 6 --workdir /tmp/bench   # keep the runs' files

Timings are wall-clock seconds on a shared machine: other processes competing for the CPU slow the swarm
(N processes) more than the solo run (one), so read the ratios together with the load average printed
with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.monitor.summary import METRICS_FILE

if TYPE_CHECKING:
    from rich.table import Table

    from swarm.config import SwarmConfig

COMPRESSIONS = ("none", "fp16", "8bit")
# the protocol's figures are measured on GRPO rounds from epoch 0 (the shipped default starts with SFT warm-start
# rounds, which bench/learning.py measures), at the from-scratch GRPO rate
PROTOCOL_SCHEDULE = ["warm_start.epochs=0", "training.learning_rate=0.01"]
TAG_VARIABLE = "SWARM_BENCH_TAG"  # set in every subprocess, so daemons they leave behind can be told apart
DEFAULT_PEERS, DEFAULT_EPOCHS = 3, 4
QUICK_PEERS, QUICK_EPOCHS = 2, 2
BYTES_PEERS, BYTES_EPOCHS = 2, 2
STOP_GRACE_S = 30.0  # after SIGINT on timeout: swarm local itself waits 20 s for its peers to leave
DAEMON_EXIT_WAIT_S = 5.0  # how long p2pd daemons get to exit after their peer did


class BenchError(Exception):
    """A failure that ends the benchmark with one line on stderr and exit status 1."""


@dataclass(frozen=True)
class EpochMetrics:
    """One line of a peer's ``metrics.jsonl``: what the peer did in one swarm epoch."""

    epoch: int
    outcome: str
    samples: int
    compute_s: float
    sync_s: float
    bytes_sent: int

    @property
    def total_s(self) -> float:
        return self.compute_s + self.sync_s


@dataclass(frozen=True)
class Payload:
    """Bytes one peer sent per averaged round, for one compression. A round whose first all-reduce
    attempts failed counts the bytes of every attempt: ``largest`` above ``smallest`` means a retry."""

    mean: int
    smallest: int
    largest: int
    rounds: int

    def as_json(self) -> dict[str, int]:
        return {"mean": self.mean, "min": self.smallest, "max": self.largest, "rounds": self.rounds}


@dataclass(frozen=True)
class Results:
    """Every figure of one benchmark run."""

    params: int
    solo_samples_per_s: float
    peers: int
    epochs: int
    samples_per_s_per_peer: float
    compute_fraction: float
    outcomes: dict[str, int]  # of the swarm run's peer-rounds, warm-up included
    payloads: dict[str, Payload]
    load_average: float
    runtime_s: float

    @property
    def bytes_per_epoch(self) -> dict[str, int]:
        return {name: payload.mean for name, payload in self.payloads.items()}

    @property
    def aggregate_samples_per_s(self) -> float:
        return self.peers * self.samples_per_s_per_peer

    @property
    def theoretical_fp32_bytes(self) -> int:
        """fp32 payload one peer sends per round in a 2-peer butterfly all-reduce: half out, half back."""
        return 4 * self.params

    def ratios(self) -> dict[str, float]:
        none = self.bytes_per_epoch["none"]
        return {
            "per_peer_vs_solo": self.samples_per_s_per_peer / self.solo_samples_per_s,
            "aggregate_vs_solo": self.aggregate_samples_per_s / self.solo_samples_per_s,
            "none_vs_theoretical": none / self.theoretical_fp32_bytes,
            **{f"{name}_vs_none": self.bytes_per_epoch[name] / none for name in COMPRESSIONS},
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "solo_samples_per_s": self.solo_samples_per_s,
            "swarm": {
                "peers": self.peers,
                "epochs": self.epochs,
                "samples_per_s_per_peer": self.samples_per_s_per_peer,
                "aggregate_samples_per_s": self.aggregate_samples_per_s,
                "compute_fraction": self.compute_fraction,
                "outcomes": dict(self.outcomes),
            },
            "bytes_per_epoch": self.bytes_per_epoch,
            "bytes_per_epoch_detail": {name: payload.as_json() for name, payload in self.payloads.items()},
            "ratios": self.ratios(),
            "params": self.params,
            "theoretical_fp32_bytes_per_epoch": self.theoretical_fp32_bytes,
            "load_average": self.load_average,
            "runtime_s": self.runtime_s,
        }


# ---- running the swarm -------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs ``swarm`` commands, each in a fresh directory under ``root`` with its own run id and a timeout."""

    def __init__(self, root: Path, timeout: float):
        self.root = root
        self.timeout = timeout
        self.tag = uuid.uuid4().hex[:8]

    def solo(self, name: str, epochs: int) -> Path:
        """One ``swarm run`` peer alone; returns its work directory."""
        workdir = self._fresh_dir(name)
        command = ["run", "--workdir", str(workdir), "--max-epochs", str(epochs), *self._sets(name)]
        self._run(name, command, workdir, self.timeout)
        return workdir

    def swarm(self, name: str, peers: int, epochs: int, overrides: Sequence[str] = ()) -> list[Path]:
        """``swarm local`` with ``peers`` peers; returns the peers' work directories."""
        workdir = self._fresh_dir(name)
        command = [
            "local",
            "--peers",
            str(peers),
            "--max-epochs",
            str(epochs),
            "--workdir",
            str(workdir),
            "--plain",
            "--timeout",
            str(self.timeout),
            *self._sets(name, overrides),
        ]
        # swarm local stops its own peers at --timeout, and needs some grace to do so before it is stopped
        self._run(name, command, workdir, self.timeout + STOP_GRACE_S)
        return [workdir / f"peer_{index}" for index in range(peers)]

    def _fresh_dir(self, name: str) -> Path:
        workdir = self.root / name
        if workdir.exists():
            raise BenchError(f"{workdir} already exists; give an empty --workdir")
        workdir.mkdir(parents=True)
        return workdir

    def _sets(self, name: str, overrides: Sequence[str] = ()) -> list[str]:
        pairs = [f"run_id=bench-{self.tag}-{name}", *PROTOCOL_SCHEDULE, *overrides]
        return [item for pair in pairs for item in ("--set", pair)]

    def _run(self, name: str, arguments: list[str], workdir: Path, timeout: float) -> None:
        log_path = workdir / "bench.log"
        environment = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        environment[TAG_VARIABLE] = self.tag
        started = time.monotonic()
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "swarm.cli", *arguments],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                start_new_session=True,  # its own process group, to stop it with everything it started
            )
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_group(process)
                message = f"run {name!r} timed out after {timeout:.0f}s: {last_line(log_path)}"
                raise BenchError(message) from None
            except BaseException:  # Ctrl+C: stop the run before leaving
                stop_group(process)
                raise
        if code != 0:
            raise BenchError(f"run {name!r} failed (exit {code}): {last_line(log_path)}")
        log(f"{name}: done in {time.monotonic() - started:.0f}s")


def stop_group(process: subprocess.Popen) -> None:
    """SIGINT the process group (``swarm local`` then stops its peers), then SIGKILL what is still there."""
    _signal_group(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log at {path})"
    return lines[-1][:300] if lines else f"(empty log {path})"


# ---- leftover daemons --------------------------------------------------------------------------------------
def p2pd_pids() -> list[int]:
    try:
        found = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True, check=False)
    except OSError:  # no pgrep: the check is skipped
        return []
    return [int(pid) for pid in found.stdout.split()]


def tagged_pids(pids: Sequence[int], tag: str) -> list[int]:
    """Those of ``pids`` whose environment carries this benchmark's tag (so: started by one of its runs)."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    tagged = []
    for pid in pids:
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environment:
            tagged.append(pid)
    return tagged


def check_leftover_daemons(count_before: int, tag: str) -> None:
    """Warn about ``p2pd`` daemons left running; ours (tagged) are then killed, by pid."""
    deadline = time.monotonic() + DAEMON_EXIT_WAIT_S
    while (ours := tagged_pids(p2pd_pids(), tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    count_after = len(p2pd_pids())
    if ours:
        log(
            f"WARNING: {len(ours)} p2pd daemon(s) started by this benchmark outlived their peers "
            f"(pids {', '.join(map(str, ours))}); killing them"
        )
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    elif count_after > count_before:
        log(
            f"WARNING: {count_after} p2pd processes now, {count_before} before the benchmark "
            f"(none of them started by it: another swarm is running on this machine)"
        )


# ---- reading the figures -----------------------------------------------------------------------------------
def read_metrics(workdir: Path) -> list[EpochMetrics]:
    path = workdir / METRICS_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError:
        raise BenchError(f"{path}: no metrics were written") from None
    try:
        records = [_epoch_metrics(json.loads(line)) for line in lines if line.strip()]
    except (ValueError, KeyError, TypeError) as error:
        raise BenchError(f"{path}: unreadable metrics line ({error!r})") from None
    if not records:
        raise BenchError(f"{path}: no epoch was recorded")
    return records


def _epoch_metrics(item: dict[str, Any]) -> EpochMetrics:
    return EpochMetrics(
        epoch=int(item["epoch"]),
        outcome=str(item["swarm"]["outcome"]),
        samples=int(item["train"]["samples"]),
        compute_s=float(item["train"]["compute_s"]),
        sync_s=float(item["swarm"]["sync_s"]),
        bytes_sent=int(item["swarm"]["bytes_sent"]),
    )


def measured(records: Sequence[EpochMetrics], epochs: int) -> list[EpochMetrics]:
    """The records that count for throughput: all but the warm-up epoch 0, unless it is the only one."""
    return [record for record in records if epochs == 1 or record.epoch != 0]


def samples_per_s(records: Sequence[EpochMetrics], where: str) -> float:
    seconds = sum(record.total_s for record in records)
    samples = sum(record.samples for record in records)
    if seconds <= 0 or samples <= 0:
        raise BenchError(f"{where}: no samples or no time recorded in the measured epochs")
    return samples / seconds


def compute_fraction(records: Sequence[EpochMetrics], where: str) -> float:
    seconds = sum(record.total_s for record in records)
    if seconds <= 0:
        raise BenchError(f"{where}: no time was recorded in the measured epochs")
    return sum(record.compute_s for record in records) / seconds


def averaged_payload(peers: Sequence[list[EpochMetrics]], compression: str) -> Payload:
    """Bytes one peer sent in one round, over the rounds that were averaged (every peer's)."""
    sent = [record.bytes_sent for records in peers for record in records if record.outcome == "averaged"]
    if not sent:
        outcomes = sorted({record.outcome for records in peers for record in records})
        raise BenchError(
            f"compression {compression}: no round was averaged "
            f"(outcomes: {', '.join(outcomes)}), so there is no payload to measure"
        )
    return Payload(mean=round(sum(sent) / len(sent)), smallest=min(sent), largest=max(sent), rounds=len(sent))


def count_outcomes(peers: Sequence[list[EpochMetrics]], name: str) -> dict[str, int]:
    """How many peer-rounds ended with each outcome; warns when some were not averaged."""
    outcomes = dict(Counter(record.outcome for records in peers for record in records))
    total, averaged = sum(outcomes.values()), outcomes.get("averaged", 0)
    if averaged < total:
        log(f"WARNING: {name}: {total - averaged} of {total} peer-rounds were not averaged ({outcomes})")
    return outcomes


# ---- the benchmark -----------------------------------------------------------------------------------------
def runs_config() -> SwarmConfig:
    """The config every run starts from: configs/default.yaml and the SWARM_* environment variables."""
    from swarm.config import load_config
    from swarm.errors import UserError

    try:
        return load_config()
    except UserError as error:
        raise BenchError(f"the default config is invalid: {error}") from None


def count_parameters(config: SwarmConfig, cache_dir: Path) -> int:
    """Parameters of the model the runs train (the tiny model by default), loaded as a peer loads it."""
    from transformers.utils import logging as transformers_logging

    from swarm.errors import UserError
    from swarm.recipe import load_recipe
    from swarm.training.model import load_model_and_tokenizer

    transformers_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" on stderr
    try:
        alphabet = load_recipe(config.recipe.name, config.recipe.options).tokenizer_alphabet()
        model, _ = load_model_and_tokenizer(config.model, alphabet, cache_dir)
    except UserError as error:
        raise BenchError(f"cannot load the model: {error}") from None
    return sum(parameter.numel() for parameter in model.parameters())


def measure_solo(runner: Runner, epochs: int) -> float:
    log(f"solo: 1 peer, {epochs} epochs")
    workdir = runner.solo("solo", epochs)
    return samples_per_s(measured(read_metrics(workdir), epochs), "solo")


@dataclass(frozen=True)
class SwarmMeasurement:
    samples_per_s_per_peer: float
    compute_fraction: float
    outcomes: dict[str, int]
    per_peer: list[list[EpochMetrics]]  # every record of every peer, warm-up included


def measure_swarm(runner: Runner, peers: int, epochs: int) -> SwarmMeasurement:
    log(f"swarm: {peers} peers, {epochs} epochs")
    workdirs = runner.swarm("swarm", peers, epochs)
    per_peer = [read_metrics(workdir) for workdir in workdirs]
    rates = [
        samples_per_s(measured(records, epochs), f"swarm {workdir.name}")
        for records, workdir in zip(per_peer, workdirs)
    ]
    everything = [record for records in per_peer for record in measured(records, epochs)]
    return SwarmMeasurement(
        samples_per_s_per_peer=sum(rates) / len(rates),
        compute_fraction=compute_fraction(everything, "swarm"),
        outcomes=count_outcomes(per_peer, "swarm"),
        per_peer=per_peer,
    )


def measure_bytes(runner: Runner, uncompressed: list[list[EpochMetrics]] | None) -> dict[str, Payload]:
    """Payload per peer per averaged round for each compression. ``uncompressed``: the records of a run
    that already was a 2-peer, 2-epoch, uncompressed swarm (``--quick``'s swarm run), not to run it twice."""
    payloads = {}
    for compression in COMPRESSIONS:
        if compression == "none" and uncompressed is not None:
            per_peer = uncompressed
            log("bytes-none: the swarm run already was one (2 peers, 2 epochs, no compression)")
        else:
            log(f"bytes-{compression}: {BYTES_PEERS} peers, {BYTES_EPOCHS} epochs, compression {compression}")
            workdirs = runner.swarm(
                f"bytes-{compression}", BYTES_PEERS, BYTES_EPOCHS, [f"averaging.compression={compression}"]
            )
            per_peer = [read_metrics(workdir) for workdir in workdirs]
            count_outcomes(per_peer, f"bytes-{compression}")
        payloads[compression] = averaged_payload(per_peer, compression)
    if payloads["none"].mean <= 0:
        raise BenchError("compression none: averaged rounds sent no bytes (is bytes_sent counted?)")
    return payloads


def run_benchmark(root: Path, peers: int, epochs: int, timeout: float) -> Results:
    started = time.monotonic()
    load_average = os.getloadavg()[0]
    log(f"work dir {root}; load average {load_average:.2f} on {os.cpu_count()} CPUs")
    config = runs_config()
    params = count_parameters(config, root / "models")
    log(f"model: {params:,} parameters")
    runner = Runner(root, timeout)
    p2pd_before = len(p2pd_pids())
    try:
        solo = measure_solo(runner, epochs)
        swarm = measure_swarm(runner, peers, epochs)
        reusable = (peers, epochs) == (BYTES_PEERS, BYTES_EPOCHS) and config.averaging.compression == "none"
        payloads = measure_bytes(runner, swarm.per_peer if reusable else None)
    finally:
        check_leftover_daemons(p2pd_before, runner.tag)
    return Results(
        params=params,
        solo_samples_per_s=solo,
        peers=peers,
        epochs=epochs,
        samples_per_s_per_peer=swarm.samples_per_s_per_peer,
        compute_fraction=swarm.compute_fraction,
        outcomes=swarm.outcomes,
        payloads=payloads,
        load_average=load_average,
        runtime_s=round(time.monotonic() - started, 1),
    )


# ---- output ------------------------------------------------------------------------------------------------
def throughput_table(results: Results) -> Table:
    from rich.table import Table

    ratios = results.ratios()
    left_out = ", epoch 0 left out as warm-up" if results.epochs > 1 else ""
    table = Table(title=f"Throughput ({results.epochs} epochs{left_out})")
    for column in ("run", "samples/s", "vs solo", "compute fraction"):
        table.add_column(column, justify="left" if column == "run" else "right")
    table.add_row("solo (1 peer)", f"{results.solo_samples_per_s:.1f}", "1.00", "")
    table.add_row(
        f"swarm, per peer ({results.peers} peers)",
        f"{results.samples_per_s_per_peer:.1f}",
        f"{ratios['per_peer_vs_solo']:.2f}",
        f"{results.compute_fraction:.1%}",
    )
    table.add_row(
        f"swarm, aggregate ({results.peers} peers)",
        f"{results.aggregate_samples_per_s:.1f}",
        f"{ratios['aggregate_vs_solo']:.2f}",
        "",
    )
    outcomes = ", ".join(f"{count} {outcome}" for outcome, count in sorted(results.outcomes.items()))
    table.caption = f"swarm peer-rounds: {outcomes}"
    return table


def payload_table(results: Results) -> Table:
    from rich.table import Table

    ratios = results.ratios()
    table = Table(title=f"All-reduce payload sent per peer per epoch ({BYTES_PEERS} peers, averaged rounds)")
    for column in ("compression", "bytes (mean)", "vs none", "min-max", "rounds"):
        table.add_column(column, justify="left" if column == "compression" else "right")
    for name in COMPRESSIONS:
        stats = results.payloads[name]
        table.add_row(
            name,
            f"{stats.mean:,}",
            f"{ratios[f'{name}_vs_none']:.3f}",
            f"{stats.smallest:,}-{stats.largest:,}",
            str(stats.rounds),
        )
    theory = results.theoretical_fp32_bytes
    table.add_row(
        "fp32 theory, 4 B/param",
        f"{theory:,}",
        f"{theory / results.payloads['none'].mean:.3f}",
        "",
        "",
        style="dim",
    )
    if any(stats.largest > stats.smallest for stats in results.payloads.values()):
        table.caption = "max > min: some all-reduce was retried, and every attempt's bytes count"
    return table


def print_tables(results: Results) -> None:
    from rich.console import Console

    console = Console()
    console.print(throughput_table(results))
    console.print(payload_table(results))
    console.print(
        f"model: {results.params:,} parameters; measured none / fp32 theory = "
        f"{results.ratios()['none_vs_theoretical']:.3f}"
    )
    console.print(
        f"load average at start {results.load_average:.2f} on {os.cpu_count()} CPUs; "
        f"benchmark took {results.runtime_s:.0f}s"
    )


# ---- command line ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--peers", type=int, help=f"peers in the swarm run (default {DEFAULT_PEERS})")
    parser.add_argument(
        "--epochs", type=int, help=f"epochs of the solo and swarm runs (default {DEFAULT_EPOCHS})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_PEERS} peers, {QUICK_EPOCHS} epochs unless given",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the runs' files here (default: a temporary dir, removed at the end)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds each run may take (default 600)"
    )
    args = parser.parse_args(argv)
    if args.peers is None:
        args.peers = QUICK_PEERS if args.quick else DEFAULT_PEERS
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    if args.peers < 2:
        parser.error("--peers must be at least 2 (one peer is the solo baseline)")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        results = run_benchmark(root, args.peers, args.epochs, args.timeout)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results.as_json()))
    else:
        print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
