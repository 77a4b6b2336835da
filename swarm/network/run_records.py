"""Which run a peer is in, and with what shared settings, under one key that every swarm peer reads: ``swarm.runs``.

A joiner does not know the run id of the swarm it was pointed at (that is the point: a second hobbyist's
``./launch.sh --join ADDR`` must land in the first one's run). Every peer therefore announces, signed under its own
key, a :class:`RunAnnouncement`: its run id, its :func:`~swarm.shared_settings.shared_settings` and their
fingerprint. :func:`discover` reads the announcements of the initial peers a joiner was given (their ids are in the
multiaddrs) through a short-lived client node, before the peer's own node starts under the run it settles on.
"""

from __future__ import annotations

import logging
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field

from swarm.identity import Identity
from swarm.network.records import bounded_store, owned_records

logger = logging.getLogger(__name__)

RUNS_KEY = "swarm.runs"
MAX_ANNOUNCEMENT_BYTES = 16384  # the shared settings with a recipe's options


class RunAnnouncement(BaseModel):
    """What a peer announces about the run it is in."""

    model_config = ConfigDict(extra="forbid", strict=True)

    peer_id: str = Field(max_length=128)
    run_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")
    settings: dict[str, Any]


class RunBoard:
    """Publishes this peer's :class:`RunAnnouncement` and reads everybody's under :data:`RUNS_KEY`."""

    def __init__(self, dht: hivemind.DHT, identity: Identity, ttl: float):
        self.dht, self.ttl = dht, ttl
        self.subkey = RSASignatureValidator(identity.private_key).local_public_key

    def publish(self, announcement: RunAnnouncement) -> bool:
        return bounded_store(
            self.dht, RUNS_KEY, announcement.model_dump(), get_dht_time() + self.ttl, subkey=self.subkey
        )


def fetch_announcements(dht: hivemind.DHT) -> dict[str, RunAnnouncement]:
    """Every peer's announcement by peer id; malformed and forged ones are dropped."""
    return {found.peer_id: found for found in owned_records(dht, RUNS_KEY, RunAnnouncement, "peer_id")}
