"""Typed DHT records. This module and :mod:`swarm.network.dht` are the only places that speak to the DHT.

Every record a peer owns sits under a subkey holding its public key (``[owner:...]``), so hivemind's
``RSASignatureValidator`` lets only that key write it, and the reader checks that the claimed peer id is the one
derived from that key. Anything malformed is dropped, never raised: the network is untrusted input.
"""

from __future__ import annotations

import hashlib
import logging

import hivemind
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm.identity import Identity

logger = logging.getLogger(__name__)

MAX_RECORD_BYTES = 4096


class PeerStatus(BaseModel):
    """What a peer announces about itself every few seconds while it is alive."""

    model_config = ConfigDict(extra="forbid", strict=True)

    peer_id: str = Field(max_length=128)
    name: str = Field(max_length=64)
    epoch: int = Field(ge=0)
    state_hash: str = Field(max_length=128)
    ready_epoch: int = Field(ge=-1)  # the epoch whose gradient this peer has computed and wants to average; -1: busy
    samples: int = Field(ge=0)  # samples this peer contributed since it started
    reward: float | None = None  # mean reward of its last round
    client_mode: bool = False


def peer_id_from_public_key(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (same derivation as ``PeerID.from_identity``)."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(proto).digest(), multihash.coerce_code("sha2-256")))


def owner_peer_id(subkey: bytes) -> str | None:
    """The peer id of the key that owns (signed) a record with this subkey, or None if it is not owned."""
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey) if isinstance(subkey, bytes) else []
    if len(keys) != 1:
        return None
    try:
        return str(peer_id_from_public_key(RSAPublicKey.from_bytes(keys[0])))
    except Exception:
        return None


class StatusBoard:
    """Publishes this peer's :class:`PeerStatus` and reads everybody's, under the key ``<run_id>.peers``.

    :param ttl: a status not refreshed for this many seconds expires, and its peer counts as gone
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, identity: Identity, ttl: float):
        self.dht, self.key, self.ttl = dht, f"{run_id}.peers", ttl
        self.subkey = RSASignatureValidator(identity.private_key).local_public_key

    def publish(self, status: PeerStatus) -> bool:
        return bool(
            self.dht.store(self.key, status.model_dump(), get_dht_time() + self.ttl, subkey=self.subkey)
        )

    def fetch(self) -> dict[str, PeerStatus]:
        """Live peers by peer id (this one included once published). Forged or malformed entries are skipped."""
        found = self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        statuses = {}
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            if not isinstance(value, dict):
                continue
            try:
                status = PeerStatus.model_validate(value)
            except ValidationError:
                logger.debug("Dropped a malformed peer status")
                continue
            if owner_peer_id(subkey) != status.peer_id:
                logger.debug(f"Dropped a status for {status.peer_id} not signed by its key")
                continue
            statuses[status.peer_id] = status
        return statuses
