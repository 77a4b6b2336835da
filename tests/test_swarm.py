"""Multi-peer behaviour with real peer processes on 127.0.0.1: lock-step parameters, peers leaving and joining."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from swarm.monitor.record import EpochMetrics
from tests.conftest import (
    Processes,
    clean_env,
    finish,
    local_argv,
    peer_epoch,
    read_json,
    read_metrics,
    read_wandb_offline_run,
    run_swarm,
    wait_until,
)

pytestmark = pytest.mark.e2e

# shorter than the defaults so that a dead peer is noticed quickly, still generous for a loaded 2-core machine
FAST = ["--set", "averaging.peer_timeout=8", "--set", "averaging.round_timeout=60"]


def start_first(processes: Processes, root: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    workdir = root / "peer_0"
    process = processes.swarm("run", "--workdir", str(workdir), *FAST, *args, log=workdir / "out.log")
    addr_file = workdir / "peer_addr.txt"
    wait_until(lambda: addr_file.is_file() and addr_file.read_text().strip(), 90, "the first peer's address")
    return process, addr_file.read_text().split()[0], workdir


def start_joiner(processes: Processes, root: Path, index: int, address: str, *args: str):
    workdir = root / f"peer_{index}"
    process = processes.swarm(
        "run", "--workdir", str(workdir), "--join", address, *FAST, *args, log=workdir / "out.log"
    )
    return process, workdir


def summary_of(workdir: Path) -> dict:
    summary = read_json(workdir / "summary.json")
    assert summary is not None, f"{workdir} wrote no summary"
    return summary["peers"][0]


@pytest.mark.timeout(420)
def test_local_swarm_trains_in_lockstep_and_improves(tmp_path: Path) -> None:
    """The acceptance run: 3 peers, 5 epochs, identical parameters, samples > 0, reward better at the end."""
    summary_path = tmp_path / "S.json"
    argv = local_argv(tmp_path / "w", 3, 5, (), "--summary", str(summary_path))
    result = run_swarm(argv, tmp_path, 400, clean_env(wandb="offline"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_json(summary_path)
    peers = summary["peers"]
    assert summary["run_id"] == "swarm-default"
    assert len(peers) == 3
    assert len({peer["peer_id"] for peer in peers}) == 3
    assert len({peer["param_checksum"] for peer in peers}) == 1, "peers ended with different parameters"
    for peer in peers:
        assert peer["epochs"] == 5 and peer["samples"] > 0
    first = [peer["history"][0]["reward"] for peer in peers if peer["history"][0]["epoch"] == 0]
    last = [peer["history"][-1]["reward"] for peer in peers if peer["history"][-1]["epoch"] == 4]
    assert first and last
    assert sum(last) / len(last) > sum(first) / len(first), f"reward did not improve: {first} -> {last}"
    # every peer really averaged with the others (not three solo runs that happened to be resynced)
    grouped = [
        m
        for i in range(3)
        for m in read_metrics(tmp_path / "w" / f"peer_{i}")
        if m["swarm"]["group_size"] == 3
    ]
    assert len(grouped) >= 3 * 3
    # W&B (offline here: no API key): one run per peer, grouped by the run id, holding the logged epochs
    for index in range(3):
        runs = list((tmp_path / "w" / f"peer_{index}" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        groups, history = read_wandb_offline_run(runs[0])
        assert groups == {"swarm-default"}
        epochs = [row for row in history if "epoch" in row]
        assert [row["epoch"] for row in epochs] == [0, 1, 2, 3, 4]
        assert all(
            isinstance(row["train/reward"], float) and row["swarm/peers_online"] >= 1 for row in epochs
        )
        # swarm-level verification and ledger figures, and the credits table at the end
        assert all("verify/audits_done" in row and "ledger/my_credit" in row for row in epochs)
        assert epochs[-1]["ledger/swarm_credit"] > 0
        # one record per epoch: W&B logged exactly the figures of metrics.jsonl, under the same names
        records = [EpochMetrics.from_json(line) for line in read_metrics(tmp_path / "w" / f"peer_{index}")]
        assert [
            {key: row[key] for key in record.flat()} for row, record in zip(epochs, records, strict=True)
        ] == [record.flat() for record in records]
        table = [row for row in history if row.get("credits/_type") == "table-file"]
        assert table and table[-1]["credits/nrows"] == 3  # one row per peer


@pytest.mark.timeout(420)
def test_killed_peer_does_not_stop_the_others(tmp_path: Path, processes: Processes) -> None:
    epochs = "7"
    first, address, dir0 = start_first(processes, tmp_path, "--max-epochs", epochs, "--expected-peers", "3")
    second, dir1 = start_joiner(
        processes, tmp_path, 1, address, "--max-epochs", epochs, "--expected-peers", "3"
    )
    victim, dir2 = start_joiner(
        processes, tmp_path, 2, address, "--max-epochs", epochs, "--expected-peers", "3"
    )
    wait_until(lambda: peer_epoch(dir2) >= 2, 240, "the third peer to reach epoch 2")
    processes.kill(victim)  # kill -9 of the peer and its p2p daemon, mid-run
    finish(first, 300, dir0 / "out.log")
    finish(second, 300, dir1 / "out.log")
    survivors = [summary_of(dir0), summary_of(dir1)]
    assert all(peer["epochs"] == 7 for peer in survivors)
    assert survivors[0]["param_checksum"] == survivors[1]["param_checksum"]
    # after the kill the two survivors kept averaging with each other
    late_rounds = [m for m in read_metrics(dir0) + read_metrics(dir1) if m["epoch"] >= 4]
    assert (
        sum(m["swarm"]["outcome"] == "averaged" and m["swarm"]["group_size"] == 2 for m in late_rounds) >= 4
    ), late_rounds


@pytest.mark.timeout(420)
def test_late_peer_catches_up_to_the_same_parameters(tmp_path: Path, processes: Processes) -> None:
    epochs = "10"
    first, address, dir0 = start_first(processes, tmp_path, "--max-epochs", epochs, "--expected-peers", "2")
    second, dir1 = start_joiner(
        processes, tmp_path, 1, address, "--max-epochs", epochs, "--expected-peers", "2"
    )
    wait_until(lambda: peer_epoch(dir0) >= 2, 240, "the swarm to reach epoch 2")
    late, dir3 = start_joiner(processes, tmp_path, 3, address, "--max-epochs", epochs)
    for process, workdir in ((first, dir0), (second, dir1), (late, dir3)):
        finish(process, 300, workdir / "out.log")
    reports = [summary_of(dir0), summary_of(dir1), summary_of(dir3)]
    assert len({peer["param_checksum"] for peer in reports}) == 1
    assert reports[2]["epochs"] == 10
    late_history = [entry["epoch"] for entry in reports[2]["history"]]
    assert late_history and min(late_history) >= 2, (
        "the late peer recomputed epochs instead of downloading state"
    )
    assert any(
        m["swarm"]["outcome"] == "averaged" and m["swarm"]["group_size"] == 3 for m in read_metrics(dir3)
    )


@pytest.mark.timeout(300)
def test_restarted_peer_resumes_from_its_checkpoint(tmp_path: Path, processes: Processes) -> None:
    workdir = tmp_path / "solo"
    run = processes.swarm("run", "--workdir", str(workdir), "--max-epochs", "2", log=workdir / "out.log")
    finish(run, 200, workdir / "out.log")
    before = summary_of(workdir)
    run = processes.swarm("run", "--workdir", str(workdir), "--max-epochs", "3", log=workdir / "out.log")
    finish(run, 200, workdir / "out.log")
    after = summary_of(workdir)
    assert before["epochs"] == 2 and after["epochs"] == 3
    assert [entry["epoch"] for entry in after["history"]] == [0, 1, 2]  # epochs 0-1 were not recomputed
    assert after["history"][:2] == before["history"]
    assert after["peer_id"] == before["peer_id"]  # the identity persisted too


@pytest.mark.timeout(300)
def test_kill_9_mid_run_leaves_a_usable_checkpoint(tmp_path: Path, processes: Processes) -> None:
    workdir = tmp_path / "solo"
    run = processes.swarm("run", "--workdir", str(workdir), "--max-epochs", "50", log=workdir / "out.log")
    wait_until(lambda: peer_epoch(workdir) >= 2, 200, "epoch 2")
    processes.kill(run)
    run.wait(timeout=30)
    reached = peer_epoch(workdir)
    run = processes.swarm(
        "run", "--workdir", str(workdir), "--max-epochs", str(reached + 1), log=workdir / "out.log"
    )
    finish(run, 200, workdir / "out.log")
    report = summary_of(workdir)
    assert report["epochs"] == reached + 1
    assert "unreadable checkpoint" not in (workdir / "out.log").read_text()
