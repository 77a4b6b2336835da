"""Does the offline default visibly learn? Held-out exact answers against wall time and samples, for the shipped
schedule and the schedule it replaced, measured in the same run.

Two ``swarm local`` runs of ``--peers`` peers on the offline default (tiny model, sums of two digits), each for
``--minutes`` of wall time from launch (start-up included):

* **default** — the shipped configs/default.yaml: an SFT warm start on the recipe's reference answers
  (``warm_start.epochs``), then GRPO at ``training.learning_rate``;
* **grpo-only** (the baseline) — the schedule before the warm start: GRPO from random weights at 0.01.

Every peer scores the swarm's model on the recipe's held-out rows every ``--eval-every`` epochs
(``evaluations.jsonl``; the peers hold identical parameters, peer 0's file is read). The figure is
``eval/greedy/correct``: the share of held-out prompts whose greedy answer is exactly right. Reported per run: the
figure at a few wall times, the best and the last, the minutes until it first reached ``--target``, the epochs
reached and the samples the swarm computed (all peers, from ``metrics.jsonl``).

Usage::

    python bench/learning.py               # table on stdout, progress on stderr (2 x 10 minutes)
    python bench/learning.py --json        # one JSON object on stdout
    python bench/learning.py --quick       # 2 x 2 minutes: a smoke run
    python bench/learning.py --only default --minutes 10

The held-out rows are 64 prompts of a 100-prompt task: a figure moves in steps of 1/64, and tiny models learn
noisily, so read the curve, not one point.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from throughput import (
    PROTOCOL_SCHEDULE,
    STOP_GRACE_S,
    TAG_VARIABLE,
    BenchError,
    check_leftover_daemons,
    last_line,
    log,
    p2pd_pids,
    stop_group,
)

from swarm.local import local_argv
from swarm.monitor.summary import EVALUATIONS_FILE, METRICS_FILE

SCHEDULES: dict[str, list[str]] = {
    "default": [],  # configs/default.yaml as shipped
    "grpo-only": PROTOCOL_SCHEDULE,  # the schedule before the warm start
}
FIGURE = "eval/greedy/correct"
CHECKPOINTS_MIN = (2.5, 5.0, 7.5, 10.0)


@dataclass
class Point:
    minutes: float  # wall time since the swarm was launched
    epoch: int
    exact: float  # eval/greedy/correct
    samples: int  # samples the whole swarm computed up to then


@dataclass
class LearningRun:
    schedule: str
    minutes: float
    peers: int
    epochs: int = 0  # the last epoch any peer reached
    samples: int = 0  # all peers, the whole run
    curve: list[Point] = field(default_factory=list)

    def at(self, minutes: float) -> float | None:
        """The last figure measured at or before ``minutes`` (None: none yet)."""
        before = [point.exact for point in self.curve if point.minutes <= minutes]
        return before[-1] if before else None

    def minutes_to(self, target: float) -> float | None:
        return next((point.minutes for point in self.curve if point.exact >= target), None)

    @property
    def best(self) -> float | None:
        return max((point.exact for point in self.curve), default=None)

    @property
    def last(self) -> float | None:
        return self.curve[-1].exact if self.curve else None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when the run was stopped
            continue
    return records


def run_schedule(
    root: Path, tag: str, schedule: str, peers: int, minutes: float, eval_every: int, eval_rows: int
) -> LearningRun:
    """One ``swarm local`` for ``minutes`` of wall time; its curve read back from the peers' files."""
    workdir = root / schedule
    workdir.mkdir(parents=True)
    sets = [
        f"run_id=bench-{tag}-{schedule}",
        f"monitor.eval_every={eval_every}",
        f"monitor.eval_rows={eval_rows}",
        *SCHEDULES[schedule],
    ]
    argv = local_argv(workdir, peers, None, sets, "--timeout", str(minutes * 60))
    command = [sys.executable, "-m", "swarm.cli", *argv]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    environment = {
        key: value
        for key, value in environment.items()
        if not key.startswith("SWARM_") or key == TAG_VARIABLE
    }
    environment[TAG_VARIABLE] = tag
    log(
        f"{schedule}: {peers} peers for {minutes:g} minutes ({' '.join(SCHEDULES[schedule]) or 'as shipped'})"
    )
    launched = time.time()
    log_path = workdir / "bench.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=minutes * 60 + STOP_GRACE_S + 30)
        except subprocess.TimeoutExpired:
            stop_group(process)
            raise BenchError(
                f"run {schedule!r} did not stop after its --timeout: {last_line(log_path)}"
            ) from None
        except BaseException:
            stop_group(process)
            raise
    # swarm local exits 1 when it stops the peers at --timeout, which is how this run ends
    if code != 0 and "stopped after the --timeout" not in log_path.read_text(errors="replace"):
        raise BenchError(f"run {schedule!r} failed (exit {code}): {last_line(log_path)}")
    metrics = [
        record for index in range(peers) for record in read_jsonl(workdir / f"peer_{index}" / METRICS_FILE)
    ]
    run = LearningRun(
        schedule,
        minutes,
        peers,
        epochs=max((int(record["epoch"]) for record in metrics), default=0),
        samples=sum(int(record.get("train", {}).get("samples", 0)) for record in metrics),
    )
    for record in read_jsonl(workdir / "peer_0" / EVALUATIONS_FILE):
        figure = record.get("figures", {}).get(FIGURE)
        if figure is None:
            continue
        when = float(record["time"])
        run.curve.append(
            Point(
                minutes=round((when - launched) / 60, 2),
                epoch=int(record["epoch"]),
                exact=float(figure),
                samples=sum(
                    int(item.get("train", {}).get("samples", 0))
                    for item in metrics
                    if float(item.get("time", 0)) <= when
                ),
            )
        )
    log(f"{schedule}: epoch {run.epochs}, last {FIGURE} {run.last}, best {run.best}")
    return run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="2 minutes per run")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time of each run, from launch")
    parser.add_argument("--eval-every", type=int, default=20, help="monitor.eval_every")
    parser.add_argument("--eval-rows", type=int, default=64, help="monitor.eval_rows")
    parser.add_argument("--target", type=float, default=0.5, help="the held-out exact share to reach")
    parser.add_argument("--only", choices=sorted(SCHEDULES), action="append", help="run only this schedule")
    parser.add_argument(
        "--workdir", type=Path, help="keep the runs' files here (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 2.0
    return args


def table(runs: list[LearningRun], target: float):
    from rich.table import Table

    checkpoints = [minutes for minutes in CHECKPOINTS_MIN if minutes <= max(run.minutes for run in runs)]
    out = Table(title=f"held-out exact answers ({FIGURE}), {runs[0].peers}-peer swarm local, offline default")
    for column in (
        "schedule",
        *[f"at {minutes:g} min" for minutes in checkpoints],
        "best",
        "last",
        f"minutes to {target:.0%}",
        "epochs",
        "samples",
    ):
        out.add_column(column, justify="right")
    for run in runs:
        cells = [run.at(minutes) for minutes in checkpoints]
        reached = run.minutes_to(target)
        out.add_row(
            run.schedule,
            *["…" if cell is None else f"{cell:.1%}" for cell in cells],
            "…" if run.best is None else f"{run.best:.1%}",
            "…" if run.last is None else f"{run.last:.1%}",
            "not reached" if reached is None else f"{reached:.1f}",
            str(run.epochs),
            str(run.samples),
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="swarm-bench-learning-"))
    tag = uuid.uuid4().hex[:8]
    daemons_before = len(p2pd_pids())
    # a killed benchmark still stops the swarm it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        root.mkdir(parents=True, exist_ok=True)
        runs = [
            run_schedule(root, tag, schedule, args.peers, args.minutes, args.eval_every, args.eval_rows)
            for schedule in (args.only or list(SCHEDULES))
        ]
        check_leftover_daemons(daemons_before, tag)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    by_name = {run.schedule: run for run in runs}
    result: dict = dict(
        peers=args.peers,
        minutes=args.minutes,
        target=args.target,
        figure=FIGURE,
        runs=[
            dict(asdict(run), best=run.best, last=run.last, minutes_to_target=run.minutes_to(args.target))
            for run in runs
        ],
    )
    if "default" in by_name and "grpo-only" in by_name and (by_name["grpo-only"].last or 0) > 0:
        result["last_exact_ratio"] = (by_name["default"].last or 0) / by_name["grpo-only"].last
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 140).print(table(runs, args.target))
    if "last_exact_ratio" in result:
        print(f"last held-out exact, default / grpo-only: {result['last_exact_ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
