"""The DHT records of rollout sharing (SAPO-style, :mod:`swarm.sharing`): how a peer publishes the completions it
sampled for its own prompts, and how others read them.

Layout: ``<run_id>.rollouts``, subkey ``b"<epoch>:[owner:<key>]"``, value ``{"bundle": bytes, "signature": bytes}``
where ``bundle`` is the zlib-compressed canonical bytes of a :class:`swarm.sharing.RolloutBundle` and ``signature``
its sender's signature over them. The owner subkey lets only the sender's key write its slot (hivemind's
``RSASignatureValidator``); the bundle's own signature travels on into contribution files, so that an auditor can
check, long after the record expired, that rollouts a peer trained on were really published by their sender.

This module moves bytes. Readers bound what they decompress and drop malformed entries with a debug line; they
never raise on network input. Signatures and contents are checked by :mod:`swarm.sharing`.
"""

from __future__ import annotations

import logging
import re
import zlib
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from swarm.identity import Identity
from swarm.network.records import bounded_store, dict_entries, owner_marker, owner_peer_id

logger = logging.getLogger(__name__)

MAX_INFLATED_BYTES = 16 << 20  # a bundle never inflates past this (zip-bomb guard)
MAX_STORED_BYTES = 4 << 20  # what a DHT node stores per entry at most; sharing.max_record_kb stays below it
_EPOCH_RE = re.compile(rb"^(\d{1,20}):")


def rollouts_key(run_id: str) -> str:
    return f"{run_id}.rollouts"


def compress_bundle(canonical: bytes) -> bytes:
    return zlib.compress(canonical, 6)


def inflate_bundle(data: Any, max_bytes: int = MAX_INFLATED_BYTES) -> bytes | None:
    """The canonical bytes inside a published bundle, or None if ``data`` is not one (never raises)."""
    if not isinstance(data, bytes):
        return None
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, max_bytes)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail or not inflater.eof else raw


class RolloutBoard:
    """Publishes this peer's rollout bundle per epoch and reads everybody's, under ``<run_id>.rollouts``.

    :param ttl: seconds a published bundle stays in the DHT
    :param max_record_bytes: bundles larger than this (compressed) are neither published nor read
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, identity: Identity, ttl: float, max_record_bytes: int):
        self.dht, self.key, self.ttl, self.max_record_bytes = dht, rollouts_key(run_id), ttl, max_record_bytes
        self.marker = owner_marker(identity)

    def publish(self, epoch: int, canonical: bytes, signature: bytes) -> bool:
        """Store a signed bundle under ``epoch``'s subkey; False if it is too large or the DHT refused it."""
        compressed = compress_bundle(canonical)
        if len(compressed) > self.max_record_bytes:
            logger.warning(
                f"rollout sharing: the epoch {epoch} bundle is {len(compressed)} bytes compressed, over"
                f" sharing.max_record_kb; not published"
            )
            return False
        value = {"bundle": compressed, "signature": signature}
        return bounded_store(
            self.dht, self.key, value, get_dht_time() + self.ttl, subkey=f"{epoch}:".encode() + self.marker
        )

    def fetch(self, epochs: set[int]) -> list[tuple[str, int, bytes, bytes]]:
        """(owner peer id, epoch, canonical bytes, signature) of every readable bundle published for ``epochs``.
        The owner is the peer whose key wrote the entry; the caller checks that the bundle names it and is signed."""
        found = []
        for subkey, value in dict_entries(self.dht, self.key):
            match = _EPOCH_RE.match(subkey) if isinstance(subkey, bytes) else None
            if match is None or int(match.group(1)) not in epochs:
                continue
            owner = owner_peer_id(subkey)
            if owner is None or not isinstance(value, dict) or not isinstance(value.get("signature"), bytes):
                logger.debug("rollout sharing: dropped an entry without an owner key or a signature")
                continue
            data = value.get("bundle")
            if not isinstance(data, bytes) or len(data) > self.max_record_bytes:
                logger.debug(f"rollout sharing: dropped an oversized or malformed bundle from {owner}")
                continue
            canonical = inflate_bundle(data)
            if canonical is None:
                logger.debug(f"rollout sharing: dropped a bundle from {owner} that does not inflate")
                continue
            found.append((owner, int(match.group(1)), canonical, value["signature"]))
        return found


class RolloutRecordValidator(RecordValidatorBase):
    """Makes DHT nodes refuse entries of ``<run_id>.rollouts`` that could not be a bundle: a value without an owner
    subkey (it would replace the whole dictionary) or larger than :data:`MAX_STORED_BYTES`. Registered next to the
    verification records' validator by :func:`swarm.network.dht.start_dht`; every other key passes untouched.
    The bundle itself (signature, contents) is checked by the peers that read it."""

    def __init__(self, run_id: str):
        self._keys = {DHTID.generate(source=rollouts_key(run_id)).to_bytes(): run_id}

    @property
    def priority(self) -> int:
        return 5  # after RSASignatureValidator (10) has checked and stripped the owner's signature

    def validate(self, record: DHTRecord) -> bool:
        run_id = self._keys.get(record.key)
        if run_id is None:
            return True
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            problem = "a value without a subkey"
        elif len(RSASignatureValidator._SIGNATURE_RE.sub(b"", record.value)) > MAX_STORED_BYTES:
            problem = f"oversized: {len(record.value)} bytes > {MAX_STORED_BYTES}"
        else:
            return True
        logger.warning(f"Rejected a rollout bundle record of run {run_id!r}: {problem}")
        return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, RolloutRecordValidator):
            return False
        self._keys.update(other._keys)
        return True
