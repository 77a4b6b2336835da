"""The ledger's DHT records: how peers publish their ledger entries and pull everybody else's (docs/design.md §2, step 7).

Layout, all owner-signed (``[owner:...]`` subkeys, so hivemind's ``RSASignatureValidator`` lets only that key write):

* ``<run_id>.ledger.heads``, subkey ``[owner:<key>]``: a :class:`LedgerHead` — the author's last seq and hash, and
  whether it has finished writing (``final``); one small record per author, read by every peer each sync;
* ``<run_id>.ledger.<author peer id>``, subkey ``b"<first seq>:[owner:<key>]"``: a chunk of that author's consecutive
  entries from ``first seq`` on, each as (canonical bytes, signature, commitment body or ``b""``), msgpack'ed and
  zlib-compressed to at most :data:`~swarm.network.records.MAX_RECORD_BYTES` bytes.

Readers take only what the named author's key signed (a head or chunk under another owner's subkey is ignored),
bound what they decompress, and drop anything malformed with a debug line; they never raise on network input.
The entries themselves are checked by the ledger (signatures, chains, commitments): this module moves bytes.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import hivemind
from hivemind.utils import MSGPackSerializer, get_dht_time
from pydantic import BaseModel, ConfigDict, Field

from swarm.identity import Identity
from swarm.network.records import (
    MAX_RECORD_BYTES,
    bounded_store,
    dict_entries,
    owned_records,
    owner_marker,
    owner_peer_id,
)

logger = logging.getLogger(__name__)

LedgerItem = tuple[bytes, bytes, bytes]  # (canonical entry bytes, signature, commitment body or b"")
MAX_CHUNK_ITEMS = 64
MAX_INFLATED_BYTES = 1 << 20  # a chunk never inflates past this (zip-bomb guard)


class LedgerHead(BaseModel):
    """An author's chain head as it announces it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    author: str = Field(max_length=128)
    seq: int = Field(ge=0)  # its last entry's seq
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    final: bool = False  # the author has finished writing (its run ended): nothing more will come


def heads_key(run_id: str) -> str:
    return f"{run_id}.ledger.heads"


def chunks_key(run_id: str, author: str) -> str:
    return f"{run_id}.ledger.{author}"


def encode_chunk(items: list[LedgerItem]) -> bytes:
    """The compressed bytes of a chunk (what :func:`decode_chunk` reads back)."""
    return zlib.compress(MSGPackSerializer.dumps([list(item) for item in items]), 9)


def decode_chunk(data: Any) -> list[LedgerItem] | None:
    """The items of a chunk, or None if ``data`` is not a well-formed chunk (never raises)."""
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        return None
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, MAX_INFLATED_BYTES)
        if inflater.unconsumed_tail:
            return None
        items = MSGPackSerializer.loads(raw)
    except Exception:
        return None
    if not isinstance(items, list) or len(items) > MAX_CHUNK_ITEMS:
        return None
    if not all(
        isinstance(item, list) and len(item) == 3 and all(isinstance(part, bytes) for part in item)
        for item in items
    ):
        return None
    return [tuple(item) for item in items]  # type: ignore[misc]


class LedgerBoard:
    """Publishes this peer's ledger heads and chunks and reads everybody's (see the module docstring).

    :param ttl: seconds a published head or chunk stays in the DHT (republish before it runs out)
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, identity: Identity, ttl: float):
        self.dht, self.run_id, self.ttl = dht, run_id, ttl
        self.peer_id = str(identity.peer_id)
        self.marker = owner_marker(identity)

    def publish_head(self, head: LedgerHead) -> bool:
        """:raises ValueError: if the head is not this identity's"""
        if head.author != self.peer_id:
            raise ValueError(f"a head of {head.author} cannot be published as {self.peer_id}")
        return bounded_store(
            self.dht, heads_key(self.run_id), head.model_dump(), get_dht_time() + self.ttl, subkey=self.marker
        )

    def publish_chunk(self, first_seq: int, data: bytes) -> bool:
        """Store a chunk (from :func:`encode_chunk`) of this peer's entries starting at ``first_seq``.

        :raises ValueError: if it is larger than :data:`MAX_RECORD_BYTES`
        """
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"a ledger chunk of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        subkey = f"{first_seq}:".encode() + self.marker
        return bounded_store(
            self.dht,
            chunks_key(self.run_id, self.peer_id),
            dict(first_seq=first_seq, data=data),
            get_dht_time() + self.ttl,
            subkey=subkey,
        )

    def fetch_heads(self) -> dict[str, LedgerHead]:
        """Author -> its head, for heads signed by the author they name; others are dropped."""
        return {
            head.author: head
            for head in owned_records(self.dht, heads_key(self.run_id), LedgerHead, "author")
        }

    def fetch_chunks(self, author: str) -> list[tuple[int, list[LedgerItem]]]:
        """``author``'s chunks as (first seq, items), by first seq: only those its key signed and that decode."""
        chunks = []
        for subkey, value in dict_entries(self.dht, chunks_key(self.run_id, author)):
            if owner_peer_id(subkey) != author or not isinstance(value, dict):
                continue
            first_seq, items = value.get("first_seq"), decode_chunk(value.get("data"))
            if type(first_seq) is not int or first_seq < 0 or items is None:
                logger.debug(f"Dropped a malformed ledger chunk of {author}")
                continue
            if subkey != f"{first_seq}:".encode() + subkey[subkey.index(b"[owner:") :]:
                continue  # signed for another position
            chunks.append((first_seq, items))
        return sorted(chunks, key=lambda chunk: chunk[0])
