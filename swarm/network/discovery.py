"""Reading a swarm's settings before joining it: the run announcement of one of its initial peers, through a
throwaway client node (``swarm run --join`` and ``swarm doctor`` use it)."""

from __future__ import annotations

import logging
import time

import hivemind
from hivemind.dht.crypto import RSASignatureValidator

from swarm.network.dht import peer_ids_of
from swarm.network.run_records import RunAnnouncement, fetch_announcements
from swarm.network.validation import SwarmRecordValidator
from swarm.shared_settings import fingerprint

logger = logging.getLogger(__name__)


def discover(initial_peers: list[str], timeout: float = 15.0) -> RunAnnouncement | None:
    """The announcement of the first of ``initial_peers`` that answers with one within ``timeout`` seconds, read
    through a throwaway client node (its own random key, nothing stored); None when none does (an older peer, or
    nobody reachable: the peer's own start then says which). An announcement whose fingerprint is not that of
    its settings is ignored."""
    wanted = peer_ids_of(initial_peers)
    if not wanted:
        return None
    deadline = time.monotonic() + timeout
    try:
        probe = hivemind.DHT(
            initial_peers=initial_peers,
            client_mode=True,
            start=True,
            record_validators=[RSASignatureValidator(), SwarmRecordValidator("swarm-probe")],
        )
    except Exception as error:
        logger.debug(f"Could not start a node to read the swarm's settings: {error!r}")
        return None
    try:
        while True:
            found = fetch_announcements(probe)
            for peer_id in wanted:
                if peer_id in found and fingerprint(found[peer_id].settings) == found[peer_id].fingerprint:
                    return found[peer_id]
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)
    finally:
        probe.shutdown()
