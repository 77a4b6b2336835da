"""Who is audited and by whom (docs/design.md §2, step 7), decided by a beacon nobody can steer.

The beacon of a round hashes the commitment digests every group member exchanged before any gradient moved, and
the averaged gradient the all-reduce produced (bit-identical on every member). A peer therefore cannot know
whether it will be audited before its contribution is committed *and* sent: to grind the beacon it would have to
re-run the all-reduce with everyone. Every member derives the same selection and the same auditors from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def round_beacon(epoch: int, digests: Mapping[str, str], averaged_digest: str) -> str:
    """sha256 over the epoch, every member's (peer id, commitment digest) in sorted order and the averaged gradient."""
    hasher = hashlib.sha256(f"beacon|{epoch}|{averaged_digest}".encode())
    for peer_id in sorted(digests):
        hasher.update(f"|{peer_id}={digests[peer_id]}".encode())
    return hasher.hexdigest()


def _draw(beacon: str, *parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join((beacon, *parts)).encode()).digest(), "big")


def is_selected(beacon: str, peer_id: str, probability: float) -> bool:
    """Whether ``peer_id``'s contribution is audited: true with probability ``probability`` over beacons."""
    return _draw(beacon, "audit", peer_id) < probability * 2**256


def auditors_for(beacon: str, audited: str, members: Iterable[str], count: int) -> list[str]:
    """``count`` auditors drawn from ``members`` (never ``audited`` itself), in the order they are asked: the first
    audits, the rest re-check a failure."""
    others = sorted(set(members) - {audited})
    return sorted(others, key=lambda auditor: _draw(beacon, "auditor", audited, auditor))[:count]


@dataclass(frozen=True)
class AuditAssignment:
    """One selected contribution of one round and the auditors that judge it."""

    epoch: int
    audited: str
    commitment: str  # the digest the audited peer exchanged with the group
    auditors: tuple[str, ...]  # auditors[0] audits; the others re-check if it fails
    # the round's other members, in beacon order: they replay a *disputed* failure (one auditor failed it and
    # another passed it), so a failure the assigned auditors disagree on is put to the whole round
    escalation: tuple[str, ...] = ()
    beacon: str = ""  # the round's beacon: it also picks which inner steps of a DiLoCo epoch are replayed

    @property
    def majority(self) -> int:
        return len(self.auditors) // 2 + 1

    @property
    def panel(self) -> tuple[str, ...]:
        """Everyone who may judge this contribution: the auditors, then the escalation."""
        return self.auditors + self.escalation


def assign_audits(
    epoch: int, digests: Mapping[str, str], averaged_digest: str, probability: float, rechecks: int
) -> list[AuditAssignment]:
    """The audits of one round: every member (by commitment digest) selected by the beacon, with its auditors."""
    beacon = round_beacon(epoch, digests, averaged_digest)
    assignments = []
    for audited in sorted(digests):
        if is_selected(beacon, audited, probability) and len(digests) > 1:
            everyone = auditors_for(beacon, audited, digests, len(digests))
            assignments.append(
                AuditAssignment(
                    epoch,
                    audited,
                    digests[audited],
                    tuple(everyone[: 1 + rechecks]),
                    tuple(everyone[1 + rechecks :]),
                    beacon,
                )
            )
    return assignments
