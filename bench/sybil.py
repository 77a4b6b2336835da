"""What free identities cost a training swarm: the same local swarm with and without Sybil identities from a plain
hivemind client (tests/sybil_client.py: a third announce a far epoch, a third 'busy' at the swarm's epoch, a third
'lagging' at epoch 0), in one run.

    python bench/sybil.py                 # table
    python bench/sybil.py --json          # the same figures as JSON
    python bench/sybil.py --epochs 40 --sybils 30

Figures: the median and mean epoch time per honest peer (compute + sync + audit, from metrics.jsonl), the
difference and ratio against the baseline run, the share of averaged rounds, whether the honest peers ended on one
checksum, and how many states they loaded from a peer that is not one of them (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import PROTOCOL_SCHEDULE

from swarm.local import local_argv

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "swarm-default"
# GRPO rounds from epoch 0: audits, credit, weight
SETTINGS = [
    "training.prompts_per_round=4",
    "training.num_generations=4",
    "averaging.peer_timeout=8",
    "averaging.round_timeout=40",
    *PROTOCOL_SCHEDULE,
]


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SWARM_")}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    return env


def run_swarm(root: Path, peers: int, epochs: int, sybils: int) -> dict:
    """One ``swarm local`` run (with ``sybils`` identities announcing from the start when > 0); its figures."""
    argv = local_argv(root, peers, epochs, SETTINGS, "--timeout", str(30 * epochs + 300))
    command = [sys.executable, "-m", "swarm.cli", *argv]
    started = time.monotonic()
    swarm = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = None
    try:
        if sybils:
            address_file = root / "peer_0" / "peer_addr.txt"
            while not (address_file.is_file() and address_file.read_text().strip()):
                if swarm.poll() is not None or time.monotonic() - started > 180:
                    raise SystemExit(f"bench/sybil.py: peer_0 did not start (see {root})")
                time.sleep(0.3)
            client = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.sybil_client",
                    address_file.read_text().split()[0],
                    RUN_ID,
                    "--identities",
                    str(sybils),
                    "--mode",
                    "mixed",
                ],
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        code = swarm.wait(timeout=30 * epochs + 360)
    finally:
        for process in (client, swarm):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    if code != 0:
        raise SystemExit(f"bench/sybil.py: swarm local exited with {code} (logs in {root})")
    durations, averaged, rounds, checksums, ids, loads = [], 0, 0, set(), set(), []
    for index in range(peers):
        workdir = root / f"peer_{index}"
        summary = json.loads((workdir / "summary.json").read_text())["peers"][0]
        checksums.add(summary["param_checksum"])
        ids.add(summary["peer_id"])
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            durations.append(
                record["train"]["compute_s"]
                + record["swarm"]["sync_s"]
                + record.get("verify", {}).get("audit_s", 0)
            )
            averaged += record["swarm"]["outcome"] == "averaged"
            rounds += 1
        loads += re.findall(
            r"loaded epoch \d+ from (\w+)", (workdir / "stdout.log").read_text(errors="replace")
        )
    return dict(
        median_epoch_s=round(statistics.median(durations), 3),
        mean_epoch_s=round(statistics.mean(durations), 3),
        averaged_share=round(averaged / max(1, rounds), 3),
        one_checksum=len(checksums) == 1,
        foreign_loads=sum(peer not in ids for peer in loads),
        wall_s=round(time.monotonic() - started, 1),
    )


def main() -> None:
    # a killed benchmark still kills the swarms it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--sybils", type=int, default=30, help="Sybil identities (default 30: 10 per honest peer)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="swarm-bench-sybil-") as folder:
        baseline = run_swarm(Path(folder) / "baseline", args.peers, args.epochs, 0)
        attacked = run_swarm(Path(folder) / "sybils", args.peers, args.epochs, args.sybils)
    figures = dict(
        peers=args.peers,
        epochs=args.epochs,
        sybils=args.sybils,
        baseline=baseline,
        sybil=attacked,
        median_added_s=round(attacked["median_epoch_s"] - baseline["median_epoch_s"], 3),
        median_ratio=round(attacked["median_epoch_s"] / max(1e-9, baseline["median_epoch_s"]), 3),
    )
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"{args.peers} honest peers, {args.epochs} epochs, {args.sybils} Sybil identities (mixed: ahead, busy, "
        "lagging)"
    )
    print(f"{'figure':<28}{'baseline':>12}{'with Sybils':>14}")
    for key in (
        "median_epoch_s",
        "mean_epoch_s",
        "averaged_share",
        "one_checksum",
        "foreign_loads",
        "wall_s",
    ):
        print(f"{key:<28}{baseline[key]!s:>12}{attacked[key]!s:>14}")
    print(f"median epoch: +{figures['median_added_s']} s (ratio {figures['median_ratio']})")


if __name__ == "__main__":
    main()
