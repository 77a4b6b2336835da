"""A Merkle root over the ledger's balances, and inclusion proofs anyone can check without the ledger.

* **Leaves** are the peers sorted by peer id; a leaf's bytes are the canonical JSON
  ``["<peer id>",<final>,<provisional>]`` (micro-credits), see :func:`leaf_bytes`.
* **Domain separation**: a leaf hashes as ``sha256(0x00 || leaf bytes)`` and an inner node as
  ``sha256(0x01 || left || right)``, so a leaf can never be passed off as a node or the reverse.
* **Odd levels**: the last node of a level with an odd count is carried up unchanged (not duplicated), so no two
  different leaf lists share a root (the duplicated-last-leaf ambiguity of Bitcoin's tree cannot happen).
* The root of no leaves is ``sha256(0x02)``.

:func:`verify_proof` uses only ``hashlib`` and ``json``: copy this file to check a proof anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Protocol

LEFT, RIGHT = "L", "R"  # which side of the path the sibling is on
EMPTY_ROOT = hashlib.sha256(b"\x02").hexdigest()
ProofStep = tuple[str, str]  # (sibling hash hex, LEFT or RIGHT)


class _Amounts(Protocol):
    final: int
    provisional: int


def leaf_bytes(peer_id: str, final: int, provisional: int) -> bytes:
    """The bytes a peer's leaf commits to."""
    return json.dumps(
        [peer_id, int(final), int(provisional)], separators=(",", ":"), ensure_ascii=True
    ).encode()


def _leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree over ``leaves``, the leaf hashes first and the root's level last."""
    levels: list[list[bytes]] = [[_leaf_hash(leaf) for leaf in leaves]]
    while len(levels[-1]) > 1:
        level = levels[-1]
        parents = [_node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            parents.append(level[-1])  # odd node carried up unchanged
        levels.append(parents)
    return levels


def merkle_root(leaves: Sequence[bytes]) -> str:
    """The root (hex) of the tree over ``leaves`` in the given order, by the rules of this module: the same hashing
    as :class:`MerkleTree`, for leaves that are not balances (e.g. the inner steps a DiLoCo peer commits to)."""
    return _levels(leaves)[-1][0].hex() if leaves else EMPTY_ROOT


class MerkleTree:
    """The Merkle tree of a ``{peer_id: balance}`` mapping (balances with ``final`` and ``provisional``).

    :param balances: e.g. the result of :func:`swarm.ledger.balances.balances`
    """

    def __init__(self, balances: Mapping[str, _Amounts]):
        self.peers = sorted(balances)
        self.leaves = [leaf_bytes(p, balances[p].final, balances[p].provisional) for p in self.peers]
        self._index = {peer: i for i, peer in enumerate(self.peers)}
        self._levels = _levels(self.leaves)

    @property
    def root(self) -> str:
        """The root, hex."""
        return self._levels[-1][0].hex() if self.leaves else EMPTY_ROOT

    def leaf(self, peer_id: str) -> bytes:
        return self.leaves[self._index[peer_id]]

    def proof(self, peer_id: str) -> list[ProofStep]:
        """Sibling hashes from ``peer_id``'s leaf up to the root. Raises ``KeyError`` for an unknown peer."""
        index, steps = self._index[peer_id], []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):  # no sibling: the node was carried up, nothing to hash
                steps.append((level[sibling].hex(), LEFT if sibling < index else RIGHT))
            index //= 2
        return steps


def verify_proof(root: str, leaf: bytes, proof: list[ProofStep] | list[list[str]]) -> bool:
    """Whether ``leaf`` (see :func:`leaf_bytes`) is in the tree with this ``root``, by its ``proof``."""
    try:
        node = _leaf_hash(leaf)
        for sibling_hex, side in proof:
            sibling = bytes.fromhex(sibling_hex)
            if len(sibling) != 32 or side not in (LEFT, RIGHT):
                return False
            node = _node_hash(sibling, node) if side == LEFT else _node_hash(node, sibling)
    except (ValueError, TypeError):
        return False
    return node.hex() == root
