"""The ledger's acceptance in a real local swarm: 3 honest peers and a sign-flipping cheater, every contribution
audited. Afterwards every peer's copy holds the same entries, each honest peer's balance is its verified samples ×
the credit rate, the cheater's is at most zero, and ``swarm ledger verify`` passes on every copy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from swarm.ledger.entries import MICRO
from swarm.ledger.store import LedgerStore
from tests.conftest import (
    Processes,
    clean_env,
    finish,
    local_argv,
    read_json,
    read_metrics,
    run_swarm,
    wait_until,
)
from tests.test_swarm import start_first, start_joiner

pytestmark = pytest.mark.e2e

PEERS = 4
EPOCHS = 6
# the audit probability is swarm local's default with an attack: every contribution is audited
SETTINGS = [
    "training.prompts_per_round=4",
    "training.num_generations=4",
    "averaging.peer_timeout=8",
    "averaging.round_timeout=40",
    "ledger.sync_interval=2",
]


def ledger(*args: str) -> subprocess.CompletedProcess:
    """``swarm ledger ARGS`` (``--db`` names the copy); its output is also kept next to the database."""
    return run_swarm(["ledger", *args], Path(args[args.index("--db") + 1]).parent, 120, clean_env())


@pytest.mark.timeout(600)
def test_every_copy_credits_honest_work_and_slashes_the_cheater(tmp_path: Path) -> None:
    argv = local_argv(tmp_path, PEERS, EPOCHS, ["verify.attack=sign_flip", *SETTINGS], "--timeout", "540")
    result = run_swarm(argv, tmp_path, 580, clean_env())
    names = [f"peer_{index}" for index in range(PEERS)]
    summaries = {
        name: (read_json(tmp_path / name / "summary.json") or {}).get("peers", [{}])[0] for name in names
    }
    assert all(summaries[name].get("peer_id") for name in names), result.stderr[-3000:]
    cheater = summaries[names[-1]]["peer_id"]

    copies = {}
    for name in names:
        db = tmp_path / name / "ledger.db"
        checked = ledger("verify", "--db", str(db))
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"
        shown = ledger("balance", "--json", "--db", str(db))
        assert shown.returncode == 0, shown.stderr
        copies[name] = json.loads(shown.stdout)
    logs = {name: (tmp_path / name / "stdout.log").read_text(errors="replace")[-3000:] for name in names}
    assert all(copies[name] == copies[names[0]] for name in names), (copies, logs)

    balances = copies[names[0]]
    for name in names[:-1]:
        verified = sum(
            record["train"]["samples"]
            for record in read_metrics(tmp_path / name)
            if record["swarm"]["outcome"] == "averaged" and record["swarm"]["group_size"] >= 2
        )
        balance = balances[summaries[name]["peer_id"]]
        # credit_per_sample 1
        assert verified > 0 and balance["work"] == verified * MICRO, (
            name,
            balance,
            logs,
        )
        assert (
            balance["final"] + balance["provisional"] == balance["work"] + balance["audits"] > balance["work"]
        )
        assert balance["penalties"] == 0
        # honest work that passed its audit window gave the other honest peers weight in this peer's view (itself,
        # at least one other: trust spreads through attested work); the slashed cheater has none
        status = read_json(tmp_path / name / "status.json")
        assert status["swarm"]["trusted_peers"] >= 2 and status["swarm"]["my_weight"] > 1, (name, status)
    assert balances[cheater]["final"] + balances[cheater]["provisional"] <= 0 and balances[cheater]["banned"]


def own_entries(db: Path, author: str) -> set[str]:
    """Hashes of the entries ``author`` wrote that ``db`` holds (opened read-write: WAL readers need the -shm file)."""
    with LedgerStore(db) as store:
        return {entry.hash for entry in store.entries() if entry.author == author}


@pytest.mark.timeout(420)
def test_a_peer_killed_mid_run_keeps_every_entry_it_had_committed(
    tmp_path: Path, processes: Processes
) -> None:
    small = [arg for setting in SETTINGS for arg in ("--set", setting)]
    first, address, dir0 = start_first(
        processes, tmp_path, "--max-epochs", "9", "--expected-peers", "2", *small
    )
    second, dir1 = start_joiner(
        processes, tmp_path, 1, address, "--max-epochs", "9", "--expected-peers", "2", *small
    )
    peer_id = dir1 / "peer_addr.txt"
    wait_until(lambda: peer_id.is_file() and peer_id.read_text().strip(), 120, "the second peer's address")
    me = peer_id.read_text().split()[0].rsplit("/p2p/", 1)[1]
    wait_until(
        lambda: len(own_entries(dir1 / "ledger.db", me)) >= 3,
        240,
        "three entries in the second peer's ledger",
    )
    processes.kill(second)  # kill -9 of the peer and its p2p daemon, while it trains and writes its ledger
    second.wait(timeout=30)
    committed = own_entries(dir1 / "ledger.db", me)
    restarted, _ = start_joiner(processes, tmp_path, 1, address, "--max-epochs", "9", *small)
    finish(restarted, 300, dir1 / "out.log")
    finish(first, 300, dir0 / "out.log")
    after = own_entries(dir1 / "ledger.db", me)
    assert committed <= after, f"{len(committed - after)} committed entries lost"
    assert len(after) > len(committed)  # and it went on writing after the restart
    checked = ledger("verify", "--db", str(dir1 / "ledger.db"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
