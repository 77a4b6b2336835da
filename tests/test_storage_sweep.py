"""Bounded DHT storage (swarm.network.storage): hivemind's storage no longer keeps stale heap entries, expired
entries go even from keys nobody touches, and per-epoch keys keep only their epoch window, on real DHT nodes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage
from hivemind.utils import get_dht_time
from hivemind.utils.timed_storage import TimedStorage

from swarm.config import NetworkConfig
from swarm.identity import Identity
from swarm.network.dht import start_dht
from swarm.network.records import (
    AuditVerdict,
    Commitment,
    CommitmentBoard,
    VerdictBoard,
    commitments_key,
    verdicts_key,
)
from swarm.network.storage import (
    _hivemind_store,
    _store_without_ghosts,
    install_sweeper,
    run_windows,
    storage_report,
    sweep,
    sweep_storage,
)

RUN = "sweep-run"
WINDOW = 3  # verify.audit_window: run_windows keeps WINDOW + 3 epochs


@pytest.fixture
def patched_store() -> Iterator[None]:
    """TimedStorage.store as the DHT process has it once the sweeper is installed (restored afterwards)."""
    TimedStorage.store = _store_without_ghosts
    try:
        yield
    finally:
        TimedStorage.store = _hivemind_store


@pytest.mark.unit
def test_restoring_an_unchanged_entry_leaves_no_heap_entry(patched_store) -> None:
    storage = DHTLocalStorage()
    key = DHTID.generate(source="k")
    expiration = get_dht_time() + 600
    for _ in range(1000):  # a reader's node re-storing what it found, again and again
        storage.store(key, b"v", expiration, subkey=b"s")
    assert len(storage.expiration_heap) == 1
    assert len(storage.get(key).value.expiration_heap) == 1
    # an older copy no longer shortens the stored value's life (hivemind pointed the key at the older heap entry)
    storage.store(key, b"v", get_dht_time() + 0.2, subkey=b"s")
    time.sleep(0.3)
    assert storage.get(key).value.get(b"s") is not None


@pytest.mark.unit
def test_hivemind_alone_keeps_a_heap_entry_per_store() -> None:
    """The fault the patch removes (if a hivemind upgrade fixes it, this test says so)."""
    storage = DHTLocalStorage()
    key = DHTID.generate(source="k")
    expiration = get_dht_time() + 600
    for _ in range(100):
        storage.store(key, b"v", expiration, subkey=b"s")
    assert len(storage.get(key).value.expiration_heap) == 100


@pytest.mark.unit
def test_sweep_drops_expired_subkeys_of_untouched_keys_and_ghosts() -> None:
    storage = DHTLocalStorage()
    idle, busy = DHTID.generate(source="idle"), DHTID.generate(source="busy")
    now = get_dht_time()
    storage.store(idle, b"keep", now + 600, subkey=b"alive")
    for index in range(50):
        storage.store(idle, b"x" * 100, now + 0.1, subkey=f"{index}".encode())
        storage.store(busy, b"y", now + 600 + index, subkey=b"same")  # a refresh: one ghost each
    time.sleep(0.2)
    # nobody touched it again: hivemind keeps the expired ones
    assert len(storage.data[idle].value.data) == 51
    stats = sweep_storage(storage)
    assert list(storage.data[idle].value.data) == [b"alive"]
    assert stats.subkeys == 50
    busy_value = storage.data[busy].value
    assert len(busy_value.data) == 1 and len(busy_value.expiration_heap) == 1
    assert len(storage.expiration_heap) <= 2 * len(storage.data) + 16


@pytest.mark.unit
def test_epoch_window_follows_the_owners_own_epoch_only() -> None:
    storage = DHTLocalStorage()
    key = DHTID.generate(source=commitments_key(RUN))
    mine, theirs = b"[owner:mine]", b"[owner:theirs]"
    expiration = get_dht_time() + 600
    for epoch in range(40):
        storage.store(key, b"c", expiration, subkey=f"{epoch}:".encode() + mine)
        storage.store(key, b"c", expiration, subkey=f"{epoch}:".encode() + theirs)
    storage.store(key, b"c", expiration, subkey=b"1000000:" + theirs)  # a far-future epoch moves nothing
    windows = {key.to_bytes(): 6}
    sweep_storage(storage, windows, own_marker=mine)
    epochs = sorted({int(subkey.split(b":")[0]) for subkey in storage.data[key].value.data})
    assert epochs == [*range(33, 40), 1000000]
    other = DHTLocalStorage()  # a node whose owner never published there prunes nothing by epoch
    for epoch in range(40):
        other.store(key, b"c", expiration, subkey=f"{epoch}:".encode() + theirs)
    sweep_storage(other, windows, own_marker=mine)
    assert len(other.data[key].value.data) == 40


# ---- real DHT nodes ----------------------------------------------------------------------------------------------
@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list]:
    identities = [Identity.load_or_create(tmp_path / f"key{index}") for index in range(2)]
    first = start_dht(NetworkConfig(client_mode=False), identities[0], tmp_path / "a", run_id=RUN)
    peers = [str(addr) for addr in first.get_visible_maddrs()]
    second = start_dht(
        NetworkConfig(client_mode=False, initial_peers=peers), identities[1], tmp_path / "b", run_id=RUN
    )
    started = [(first, identities[0]), (second, identities[1])]
    try:
        yield started
    finally:
        for dht, _ in started:
            dht.shutdown()


def _commitment(peer_id: str, epoch: int) -> Commitment:
    digest = hashlib.sha256(f"{peer_id}:{epoch}".encode()).hexdigest()
    return Commitment(
        peer_id=peer_id,
        epoch=epoch,
        state_hash=digest,
        data_seed=digest,
        samples=8,
        tokens=64,
        rollouts_hash=digest,
        gradient_hash=digest,
        precision="fp32",
    )


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_nodes_keep_only_the_audit_window_of_commitments_and_verdicts(nodes) -> None:
    (dht_a, id_a), (dht_b, id_b) = nodes
    ttl = 600.0  # far longer than this test: only the epoch window can drop anything
    boards = [
        (
            CommitmentBoard(dht, RUN, identity, ttl),
            VerdictBoard(dht, RUN, identity, ttl),
            str(identity.peer_id),
        )
        for dht, identity in nodes
    ]
    epochs = 24
    for epoch in range(epochs):
        for commitments, _, peer_id in boards:
            commitments.publish(_commitment(peer_id, epoch))
        for (_, verdicts, auditor), (_, _, audited) in zip(boards, reversed(boards)):
            verdicts.publish(
                AuditVerdict(
                    auditor=auditor,
                    audited=audited,
                    epoch=epoch,
                    commitment="0" * 64,
                    verdict="pass",
                    error=0.0,
                    role="primary",
                )
            )
        boards[0][0].fetch(epoch)  # readers make nodes cache and re-store what they find
        boards[1][1].fetch(None)
    keys = [commitments_key(RUN), verdicts_key(RUN)]
    before = storage_report(dht_a, keys)
    assert before.named[f"storage:{keys[0]}"].subkeys == 2 * epochs  # hivemind alone keeps all of them
    for dht, _ in nodes:
        sweep(dht, run_windows(RUN, WINDOW))
    kept = WINDOW + 3 + 1  # epochs (last - keep) .. last
    for dht, _ in nodes:
        report = storage_report(dht, keys)
        for key in keys:
            for where in ("storage", "cache"):
                figures = report.named.get(f"{where}:{key}")
                if figures is not None:
                    assert figures.subkeys <= 2 * kept, (where, key, figures)
                    assert figures.heap <= 2 * figures.subkeys + 16, (where, key, figures)
    # what the window keeps is still there for readers
    assert set(boards[1][0].fetch(epochs - 1)) == {str(id_a.peer_id), str(id_b.peer_id)}
    assert len(boards[0][1].fetch(epochs - 1)) == 2


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_installed_sweeper_runs_in_the_dht_process(nodes) -> None:
    (dht, identity), _ = nodes
    assert install_sweeper(dht, run_windows(RUN, WINDOW), interval=0.2)
    assert not install_sweeper(dht, run_windows(RUN, WINDOW), interval=0.2)  # once per node
    board = CommitmentBoard(dht, RUN, identity, 600.0)
    for epoch in range(30):
        board.publish(_commitment(str(identity.peer_id), epoch))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        figures = storage_report(dht, [commitments_key(RUN)]).named.get(f"storage:{commitments_key(RUN)}")
        if figures is not None and figures.subkeys <= WINDOW + 4:
            break
        time.sleep(0.2)
    assert figures is not None and figures.subkeys <= WINDOW + 4, figures
