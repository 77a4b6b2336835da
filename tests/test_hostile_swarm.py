"""Poisoned records under every key a training swarm reads (real processes): while a 3-peer ``swarm local`` trains,
a hostile plain-hivemind client keeps sending every honest node undecodable values, mixed-type subkeys,
far-future, NaN and infinite expirations, oversized values, wipes and wrongly typed values under each key. No peer
hangs, stalls or prints a traceback, and the swarm trains in lock-step as without them."""

from __future__ import annotations

import statistics
import threading
from pathlib import Path

import pytest
from hivemind.p2p import PeerID

from swarm.network.records import peer_id_from_public_key
from tests.conftest import Processes, local_argv, read_json, read_metrics, wait_until
from tests.hostile_client import HostileClient, poisoned
from tests.test_hostile_records import valid_records
from tests.test_verify_swarm import SMALL_AND_AUDITED

pytestmark = pytest.mark.e2e

PEERS, EPOCHS = 3, 6


def peer_ids(root: Path) -> list[PeerID]:
    found = []
    for index in range(PEERS):
        path = root / f"peer_{index}" / "peer_addr.txt"
        wait_until(
            lambda path=path: path.is_file() and path.read_text().strip(), 180, f"peer_{index}'s address"
        )
        found.append(PeerID.from_base58(path.read_text().split()[0].rsplit("/p2p/", 1)[1]))
    return found


@pytest.mark.timeout(600)
def test_poisoned_records_under_every_key_neither_hang_nor_stall_a_training_swarm(
    tmp_path: Path, processes: Processes
) -> None:
    settings = (*SMALL_AND_AUDITED, "verify.audit_probability=0.5")
    swarm = processes.swarm(
        *local_argv(tmp_path, PEERS, EPOCHS, settings, "--timeout", "500"), log=tmp_path / "local.log"
    )
    honest = peer_ids(tmp_path)
    client = HostileClient.start([(tmp_path / "peer_0" / "peer_addr.txt").read_text().split()[0]])
    own = str(peer_id_from_public_key(client.private_key.get_public_key()))
    stop = threading.Event()
    # (records sent, epochs peer_0 had finished when the batch was sent, and when every node had taken it)
    batches: list[tuple[int, int, int]] = []

    def attack() -> None:
        """Every poisoned variant under every key, to every honest node, until the swarm ends."""
        while not stop.is_set():
            records = [
                raw
                for key, tag, value in valid_records(own, client.marker, str(honest[0]), "swarm-default")
                for raw in poisoned(key, tag, value)
                if raw.family != "valid"
            ]
            started = len(read_metrics(tmp_path / "peer_0"))
            try:
                client.store_raw(records, honest, own=True, timeout=20)
                batches.append((len(records), started, len(read_metrics(tmp_path / "peer_0"))))
            except Exception:  # an honest node that has already left
                pass
            stop.wait(2.0)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        code = swarm.wait(timeout=560)
    finally:
        stop.set()
        attacker.join(timeout=30)
        client.dht.shutdown()
    assert code == 0, (tmp_path / "local.log").read_text()[-3000:]
    # the attack ran during the whole run: sent from the first epochs on, and still taken in the last ones
    assert len(batches) >= 2 and batches[0][1] <= 2 and batches[-1][2] >= EPOCHS - 1, batches
    summaries = [read_json(tmp_path / f"peer_{index}" / "summary.json")["peers"][0] for index in range(PEERS)]
    assert all(summary["epochs"] == EPOCHS for summary in summaries)
    assert len({summary["param_checksum"] for summary in summaries}) == 1, "peers diverged"
    for index in range(PEERS):
        log = (tmp_path / f"peer_{index}" / "stdout.log").read_text(errors="replace")
        assert "Traceback" not in log and "Unknown ExtType" not in log, log[-3000:]
        rounds = read_metrics(tmp_path / f"peer_{index}")
        assert sum(record["swarm"]["outcome"] == "averaged" for record in rounds) >= EPOCHS - 2, rounds
        # no round-timeout stalls
        assert statistics.median(record["swarm"]["sync_s"] for record in rounds) < 10.0, rounds
