"""The DHT node a peer starts survives large values: hivemind 1.1.12's DHT process reads its command pipe
non-blocking and dies on the first command that does not arrive in one read ("Resource temporarily unavailable",
then "EOFError: Ran out of input" — the crash RL-Swarm users report), after which every call on it hangs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time

from swarm.config import NetworkConfig
from swarm.identity import Identity
from swarm.network.dht import start_dht


@pytest.mark.timeout(120)  # with the upstream DHT the parent's send blocks forever on the dead process
def test_a_peer_dht_node_stores_megabyte_values_and_stays_alive(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "identity.key")
    dht = start_dht(NetworkConfig(client_mode=False), identity, tmp_path)
    try:
        for index in range(5):
            value = os.urandom(1 << 20)  # one command of about 1 MiB: it reaches the DHT process in pieces
            stored = dht.store(f"big-{index}", value, get_dht_time() + 60, return_future=True)
            assert stored.result(timeout=30), f"store {index} refused"
            assert dht.is_alive(), f"the DHT process died on store {index}"
        assert dht.get("big-4", latest=True).value == value
    finally:
        dht.shutdown()
