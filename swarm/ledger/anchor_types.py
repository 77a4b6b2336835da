"""What every anchor adapter shares (:mod:`swarm.ledger.anchor`, :mod:`swarm.ledger.evm`): the :class:`Anchor`
protocol, the :class:`AnchoredRoot` it lists, and the check of a root before it is posted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from swarm.ledger.entries import LedgerError

_ROOT = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AnchoredRoot:
    """A root as posted: the ledger ``period`` it covers, the ``root`` (hex), when it was posted (unix seconds)
    and ``ref``, where to find it (a file line, a transaction hash...)."""

    period: int
    root: str
    posted_at: int
    ref: str


@runtime_checkable
class Anchor(Protocol):
    """Posts Merkle roots somewhere durable and lists them back."""

    def post(self, root: str, period: int) -> str:
        """Post ``root`` for ``period``; returns a reference to the posting. Posting the same root for the same
        period again is a no-op; a different root for an anchored period raises :class:`LedgerError`."""
        ...

    def roots(self) -> list[AnchoredRoot]:
        """Every root posted so far, oldest first."""
        ...


def check_root(root: str, period: int) -> None:
    if not isinstance(root, str) or not _ROOT.match(root):
        raise LedgerError(f"anchor: root {root!r} is not a 64-digit lowercase hex hash")
    if type(period) is not int or period < 0:
        raise LedgerError(f"anchor: period must be a non-negative integer, got {period!r}")
