"""Training over shaped links: sync gradient averaging against DiLoCo, 3 real peers, each behind its own link.

The kernel here has no ``sch_netem``, so each peer's link is shaped in user space (tests/link_shaper.py): the peer
listens on a private port and announces a relay's, which delays, jitters and rate-limits every byte in both
directions and makes a chunk wait one TCP retransmission timeout with the profile's loss probability. Profiles:

* ``lan`` — no shaping (the relay only);
* ``wan50`` — 50 ms ± 10 one way, 50 Mbit/s, 0.5 % loss;
* ``wan150`` — 150 ms, 10 Mbit/s, 1 % loss.

Strategies: ``sync`` (one all-reduce per step) and ``diloco`` at H = 10 and H = 50 inner steps per all-reduce.
Every run trains the same number of steps (``--steps``; an epoch is one step for sync, H for DiLoCo), so every
run sees the same samples; verification is off in all of them (DiLoCo's is not built yet), so the figures compare
communication alone. Each peer's ``metrics.jsonl`` and ``summary.json`` give, per run:

* ``compute_fraction`` — Σ compute_s / Σ (compute_s + sync_s) over every peer and epoch but the warm-up epoch 0
  (unless it is the only one). Three peers share this machine's cores, so a peer that waits for a slower one
  counts that as sync time; read the figures against the ``lan`` row;
* ``bytes_per_sample`` — all-reduce bytes the peers sent / samples they trained on;
* ``reward`` — the final model's held-out reward (sampled at the training temperature; 64 rows), the mean over
  peers: reward at equal samples;
* ``checksums_identical`` and ``forks`` (distinct final parameter checksums − 1);
* ``stall_s`` — the longest single round (``sync_s``) of any peer after the warm-up epoch.

Cases: ``equal`` (three peers of the same speed, no fault) on every profile, and on ``wan50`` also
``slow_peer``: the third peer computes a third of the time (``training.duty_cycle`` 1/3, so 3x slower), and DiLoCo
gets the time budget ``diloco.inner_seconds`` = what the equal run's peers took for H inner steps, so the slow
peer takes about H/3 of them. Its row's ``throughput_vs_equal`` is the swarm's samples/s against the equal run's:
a slow peer that costs only its own share leaves (2 + 1/3) / 3 = 0.78. The partition case of issue 14 needs the
healing that is not built yet.

Usage::

    python bench/wan.py                  # table; about 10 minutes on 2 cores
    python bench/wan.py --json           # {"runs": [{"profile", "strategy", "H", "case", ...}, ...]}
    python bench/wan.py --quick          # lan and wan50, sync and DiLoCo H=5, 10 steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402
    PROTOCOL_SCHEDULE,
    TAG_VARIABLE,
    BenchError,
    EpochMetrics,
    check_leftover_daemons,
    last_line,
    log,
    p2pd_pids,
    read_metrics,
    stop_group,
)
from swarm.monitor.summary import EVALUATIONS_FILE, PEER_SUMMARY_FILE  # noqa: E402
from swarm.network.dht import PEER_ADDR_FILE  # noqa: E402
from tests.link_shaper import LinkProfile, ShapedRelay, free_port  # noqa: E402

PROFILES = {
    "lan": LinkProfile("lan"),
    "wan50": LinkProfile("wan50", delay_ms=50, jitter_ms=10, rate_mbit=50, loss=0.005),
    "wan150": LinkProfile("wan150", delay_ms=150, rate_mbit=10, loss=0.01),
}
PEERS = 3
FULL = dict(
    profiles=("lan", "wan50", "wan150"),
    strategies=(("sync", None), ("diloco", 10), ("diloco", 50)),
    steps=50,
    slow_profiles=("wan50",),
)
# slow_profiles: where the slow-peer case runs too (after the equal one, whose pace it needs)
QUICK = dict(
    profiles=("lan", "wan50"), strategies=(("sync", None), ("diloco", 5)), steps=10, slow_profiles=()
)
SLOW_DUTY_CYCLE = 1 / 3  # the slow peer computes a third of the time: 3x slower
EVAL_KEY = "eval/sampled/reward"  # greedy decoding of the tiny model stays at 0 for the first 100 steps


@dataclass
class WanRun:
    """One row of ``--json``'s ``runs`` (issue 14's shape)."""

    profile: str
    strategy: str
    H: int | None
    case: str
    compute_fraction: float
    bytes_per_sample: float
    reward: float | None
    checksums_identical: bool
    forks: int
    stall_s: float
    epochs: int
    samples: int
    wall_s: float
    samples_per_s: float  # the swarm's: samples of the timed epochs / a peer's mean time in them
    throughput_vs_equal: float | None = None  # slow_peer: samples_per_s against the equal case's
    inner_budget_s: float | None = (
        None  # slow_peer with DiLoCo: diloco.inner_seconds (the equal case's epoch)
    )


def _sets(pairs: Sequence[str]) -> list[str]:
    return [item for pair in pairs for item in ("--set", pair)]


def run_case(
    root: Path,
    profile: LinkProfile,
    strategy: str,
    inner: int | None,
    steps: int,
    timeout: float,
    case: str = "equal",
    budget_s: float | None = None,
) -> WanRun:
    """Three ``swarm run`` peers, each behind a :class:`ShapedRelay` of ``profile``, for ``steps`` training steps.

    ``case="slow_peer"``: the last peer computes at ``training.duty_cycle`` 1/3, and DiLoCo's inner steps get the
    time budget ``budget_s`` (``diloco.inner_seconds``)."""
    name = f"{profile.name}-{strategy}{inner or ''}-{case}"
    epochs = steps if inner is None else max(1, steps // inner)
    workdirs = [root / name / f"peer_{index}" for index in range(PEERS)]
    ports = [free_port() for _ in range(PEERS)]
    relays = [ShapedRelay(port, profile, seed=index) for index, port in enumerate(ports)]
    tag = uuid.uuid4().hex[:8]
    common = [
        f"run_id=wan-{tag}",
        *PROTOCOL_SCHEDULE,
        "verify.enabled=false",
        "network.client_mode=false",
        "network.use_relay=false",
        f"averaging.strategy={strategy}",
        "monitor.eval_every=1000000",  # one held-out evaluation, of the final model
        "monitor.eval_rows=64",
    ]
    if inner is not None:
        common.append(f"diloco.inner_steps={inner}")
        if budget_s is not None:
            common.append(f"diloco.inner_seconds={budget_s:.3f}")
    processes: list[subprocess.Popen] = []
    environment = dict(
        os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled"
    )
    environment[TAG_VARIABLE] = os.environ.get(TAG_VARIABLE, tag)
    # as swarm local does: split the cores between the peers instead of every peer's torch spinning on all of them
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // PEERS)))
    started = time.monotonic()
    try:
        for index, (workdir, port, relay) in enumerate(zip(workdirs, ports, relays, strict=True)):
            workdir.mkdir(parents=True)
            own = [
                f"network.host_maddrs=[/ip4/127.0.0.1/tcp/{port}]",
                f"network.announce_maddrs=[{relay.address}]",
            ]
            if case == "slow_peer" and index == PEERS - 1:
                own.append(f"training.duty_cycle={SLOW_DUTY_CYCLE:.4f}")
            join: list[str] = []
            if index:
                join = ["--join", (workdirs[0] / PEER_ADDR_FILE).read_text().split()[0]]
            command = [
                sys.executable, "-m", "swarm.cli", "run", "--workdir", str(workdir), "--max-epochs", str(epochs),
                "--expected-peers", str(PEERS), *join, *_sets([*common, *own]),
            ]  # fmt: skip
            with open(workdir / "bench.log", "wb") as log_file:
                processes.append(
                    subprocess.Popen(
                        command,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=environment,
                        start_new_session=True,
                    )  # fmt: skip
                )
            if index == 0:
                address_file = workdir / PEER_ADDR_FILE
                deadline = time.monotonic() + 120
                while not (address_file.is_file() and address_file.read_text().strip()):
                    if time.monotonic() > deadline or processes[0].poll() is not None:
                        raise BenchError(
                            f"{name}: the first peer did not start: {last_line(workdir / 'bench.log')}"
                        )
                    time.sleep(0.3)
                if relay.address not in address_file.read_text():
                    raise BenchError(f"{name}: the first peer does not announce its relay {relay.address}")
        for index, process in enumerate(processes):
            try:
                code = process.wait(timeout=max(1.0, started + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"{name}: timed out after {timeout:.0f}s") from None
            if code != 0:
                raise BenchError(
                    f"{name}: peer {index} failed (exit {code}): {last_line(workdirs[index] / 'bench.log')}"
                )
    finally:
        for process in processes:
            if process.poll() is None:
                stop_group(process)
        for relay in relays:
            relay.close()
    wall = time.monotonic() - started
    run = _figures(name, profile.name, strategy, inner, workdirs, wall)
    run.case, run.inner_budget_s = case, budget_s
    return run


def timed(records: list[EpochMetrics]) -> list[EpochMetrics]:
    """All but the warm-up epoch 0 (imports, the first TRL set-up, peers finding each other), as in
    bench/throughput.py, unless it is the only one."""
    return [record for record in records if record.epoch > 0] or records


def epoch_compute_s(workdir: Path) -> float:
    """The median compute seconds of a peer's epochs after the warm-up (what H inner steps take it)."""
    return statistics.median(record.compute_s for record in timed(read_metrics(workdir)))


def _figures(
    name: str, profile: str, strategy: str, inner: int | None, workdirs: list[Path], wall: float
) -> WanRun:
    records: list[EpochMetrics] = []
    measured: list[EpochMetrics] = []
    checksums, rewards = [], []
    for workdir in workdirs:
        peer_records = read_metrics(workdir)
        records.extend(peer_records)
        measured.extend(timed(peer_records))
        try:
            checksums.append(
                json.loads((workdir / PEER_SUMMARY_FILE).read_text())["peers"][0]["param_checksum"]
            )
        except (OSError, ValueError, KeyError, IndexError) as error:
            raise BenchError(f"{name}: {workdir} left no usable {PEER_SUMMARY_FILE} ({error!r})") from None
        evaluations = workdir / EVALUATIONS_FILE
        lines = evaluations.read_text().splitlines() if evaluations.is_file() else []
        if lines:
            rewards.append(json.loads(lines[-1])["figures"].get(EVAL_KEY))
    compute = sum(record.compute_s for record in measured)
    busy = sum(record.total_s for record in measured)
    samples = sum(record.samples for record in records)
    sent = sum(record.bytes_sent for record in records)
    present = [reward for reward in rewards if isinstance(reward, int | float)]
    return WanRun(
        profile=profile,
        strategy=strategy,
        H=inner,
        case="equal",
        compute_fraction=round(compute / busy, 4) if busy > 0 else 0.0,
        bytes_per_sample=round(sent / samples, 1) if samples else 0.0,
        reward=round(statistics.mean(present), 4) if present else None,
        checksums_identical=len(set(checksums)) == 1,
        forks=len(set(checksums)) - 1,
        stall_s=round(max((record.sync_s for record in measured), default=0.0), 3),
        epochs=max(record.epoch for record in records) + 1 if records else 0,
        samples=samples,
        wall_s=round(wall, 1),
        samples_per_s=round(sum(r.samples for r in measured) / (busy / len(workdirs)), 1)
        if busy > 0
        else 0.0,
    )


def print_table(runs: list[WanRun]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{PEERS} peers behind shaped links, verification off")
    columns = (
        "profile",
        "strategy",
        "H",
        "case",
        "compute fraction",
        "bytes/sample",
        "samples/s",
        "vs equal",
    )
    for column in (*columns, "reward", "checksums", "stall s", "wall s"):
        table.add_column(column, justify="left" if column in ("profile", "strategy", "case") else "right")
    sync_bytes = {
        run.profile: run.bytes_per_sample for run in runs if run.strategy == "sync" and run.case == "equal"
    }
    for run in runs:
        ratio = sync_bytes.get(run.profile)
        fewer = (
            f" ({ratio / run.bytes_per_sample:.0f}x fewer)"
            if run.strategy != "sync" and ratio and run.bytes_per_sample
            else ""
        )
        table.add_row(
            run.profile, run.strategy, "-" if run.H is None else str(run.H), run.case, f"{run.compute_fraction:.2f}",
            f"{run.bytes_per_sample:,.0f}{fewer}", f"{run.samples_per_s:.0f}",
            "-" if run.throughput_vs_equal is None else f"{run.throughput_vs_equal:.2f}",
            "-" if run.reward is None else f"{run.reward:.3f}",
            "identical" if run.checksums_identical else f"{run.forks + 1} distinct", f"{run.stall_s:.1f}",
            f"{run.wall_s:.0f}",
        )  # fmt: skip
    Console().print(table)


def equal_name(run: WanRun) -> str:
    return f"{run.profile}-{run.strategy}{run.H or ''}-equal"


def _log_run(run: WanRun) -> None:
    extra = "" if run.throughput_vs_equal is None else f", throughput {run.throughput_vs_equal:.2f} of equal"
    log(
        f"  {run.case}: compute fraction {run.compute_fraction:.2f}, {run.bytes_per_sample:,.0f} B/sample,"
        f" {run.samples_per_s:.0f} samples/s{extra}, {run.wall_s:.0f}s"
    )


def _known(name: str, known: dict, what: str) -> str:
    if name not in known:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(known)})")
    return name


def _strategy(item: str) -> tuple[str, int | None]:
    """``sync`` or ``diloco:H``."""
    if item == "sync":
        return "sync", None
    name, _, inner = item.partition(":")
    if name != "diloco" or not inner.isdigit() or int(inner) < 1:
        raise ValueError(f"unknown strategy {item!r} (sync, or diloco:H with H >= 1)")
    return "diloco", int(inner)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quick", action="store_true", help="lan and wan50, sync and DiLoCo H=5, 10 steps")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default 50; quick 10)"
    )
    parser.add_argument(
        "--profiles", default=None, help="comma-separated profiles to run (lan, wan50, wan150)"
    )
    parser.add_argument(
        "--strategies",
        default=None,
        help="comma-separated strategies to run: sync, diloco:H (e.g. sync,diloco:10)",
    )
    parser.add_argument(
        "--slow-profiles",
        default=None,
        help="comma-separated profiles that also run the slow-peer case ('' for none)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    try:
        if args.profiles:
            plan["profiles"] = tuple(_known(name, PROFILES, "profile") for name in args.profiles.split(","))
        if args.slow_profiles is not None:
            names = [name for name in args.slow_profiles.split(",") if name]
            plan["slow_profiles"] = tuple(_known(name, PROFILES, "profile") for name in names)
        if args.strategies:
            plan["strategies"] = tuple(_strategy(item) for item in args.strategies.split(","))
    except ValueError as error:
        print(f"bench/wan.py: {error}", file=sys.stderr)
        return 2
    steps = args.steps or plan["steps"]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="swarm-wan-"))
    daemons_before = len(p2pd_pids())
    tag = os.environ.setdefault(TAG_VARIABLE, uuid.uuid4().hex[:8])
    runs: list[WanRun] = []
    try:
        for profile in plan["profiles"]:
            for strategy, inner in plan["strategies"]:
                log(f"{profile} {strategy}{'' if inner is None else f' H={inner}'}: {steps} steps")
                equal = run_case(root, PROFILES[profile], strategy, inner, steps, args.timeout)
                runs.append(equal)
                _log_run(equal)
                if profile not in plan["slow_profiles"]:
                    continue
                # DiLoCo's inner steps get the time the equal peers took for H of them: the slow peer takes fewer
                budget = None
                if inner is not None:
                    budget = statistics.median(
                        epoch_compute_s(d) for d in (root / equal_name(equal)).iterdir()
                    )
                slow = run_case(
                    root, PROFILES[profile], strategy, inner, steps, args.timeout, "slow_peer", budget
                )
                slow.throughput_vs_equal = round(slow.samples_per_s / equal.samples_per_s, 3)
                runs.append(slow)
                _log_run(slow)
    except BenchError as error:
        print(f"bench/wan.py: {error}", file=sys.stderr)
        return 1
    finally:
        check_leftover_daemons(daemons_before, tag)
    if args.json:
        print(json.dumps({"runs": [asdict(run) for run in runs], "steps": steps, "peers": PEERS}))
    else:
        print_table(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
