"""The ledger store survives ``kill -9`` mid-write with every committed entry, and two processes of one peer
appending the same contributions credit each exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.identity import Identity
from swarm.ledger.store import LedgerStore

pytestmark = pytest.mark.e2e

# appends contribution entries for commitments START.. and prints each entry's hash once it is committed
WRITER = """
import sys
from swarm.identity import Identity
from swarm.ledger.entries import commitment_body
from swarm.ledger.store import DuplicateCredit, LedgerStore
from swarm.network.records import Commitment

key, db, start, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
identity = Identity.load_or_create(key)
store = LedgerStore(db)
for i in range(start, start + count):
    mine = Commitment(peer_id=str(identity.peer_id), epoch=i // 4, state_hash="s", data_seed=format(i, "064x"),
                      samples=8, tokens=0, rollouts_hash="r", gradient_hash="g", precision="fp32")
    try:
        entry = store.append(identity, commitment=commitment_body(mine), kind="contribution",
                             subject=str(identity.peer_id), epoch=i // 4, samples=8, refs=[mine.digest()])
    except DuplicateCredit:
        print("duplicate", flush=True)
        continue
    print(entry.hash, flush=True)
"""


def _writer(key: Path, db: Path, start: int, count: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(key), str(db), str(start), str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_kill_9_mid_write_loses_no_committed_entry(tmp_path: Path):
    key, db = tmp_path / "identity.key", tmp_path / "ledger.db"
    Identity.load_or_create(key)
    committed: list[str] = []
    for round_ in range(2):  # killed, restarted, killed again: the chain continues where it stopped
        writer = _writer(key, db, start=1000 * round_, count=100_000)
        try:
            deadline = time.monotonic() + 60
            while len(committed) < 30 * (round_ + 1) and time.monotonic() < deadline:
                line = writer.stdout.readline().strip()
                assert line, f"writer died: {writer.stderr.read()}"
                committed.append(line)
            os.killpg(writer.pid, signal.SIGKILL)  # while it is busy appending the next entries
            rest = writer.stdout.read().split()  # lines it printed (so had committed) before the kill landed
            committed.extend(rest)
        finally:
            _stop(writer)
        assert writer.returncode == -signal.SIGKILL
    with LedgerStore(db) as store:
        stored = {entry.hash for entry in store.entries()}
        assert store.verify() == len(stored)
    assert len(committed) >= 60 and set(committed) <= stored
    # at most the entry in flight at each kill, committed but not printed
    assert len(stored) - len(committed) <= 2


def test_two_processes_of_one_peer_credit_each_contribution_once(tmp_path: Path):
    key, db = tmp_path / "identity.key", tmp_path / "ledger.db"
    identity = Identity.load_or_create(key)
    LedgerStore(db).close()  # create the schema before both writers race
    writers = [_writer(key, db, start=0, count=40) for _ in range(2)]
    try:
        outputs = [writer.communicate(timeout=120) for writer in writers]
    finally:
        for writer in writers:
            _stop(writer)
    assert [writer.returncode for writer in writers] == [0, 0], [err for _, err in outputs]
    lines = [line for out, _ in outputs for line in out.split()]
    assert lines.count("duplicate") == 40 and len(lines) == 80
    with LedgerStore(db) as store:
        assert store.verify() == 40
        assert len({e.refs[0] for e in store.entries()}) == 40
        assert store.last_seq(str(identity.peer_id)) == 39
