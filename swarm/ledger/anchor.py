"""Anchors: where a period's Merkle root is posted so that anyone can later check balances against it.

The ledger does not depend on any chain: an :class:`Anchor` is anything with ``post`` and ``roots``. Adapters
here: :class:`NoneAnchor` (anchoring off) and :class:`FileAnchor` (a JSON-lines file). A chain adapter (e.g. an
EVM contract) implements the same two methods.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
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


def _check(root: str, period: int) -> None:
    if not isinstance(root, str) or not _ROOT.match(root):
        raise LedgerError(f"anchor: root {root!r} is not a 64-digit lowercase hex hash")
    if type(period) is not int or period < 0:
        raise LedgerError(f"anchor: period must be a non-negative integer, got {period!r}")


class NoneAnchor:
    """Anchoring switched off: roots are checked for form and forgotten."""

    def post(self, root: str, period: int) -> str:
        _check(root, period)
        return ""

    def roots(self) -> list[AnchoredRoot]:
        return []


class FileAnchor:
    """Appends one JSON line per root to ``path`` and fsyncs it before returning, so a posted root survives a
    crash. A line torn by a crash mid-write is ignored when reading (it was never reported as posted).

    :param path: the JSON-lines file (created with its directory if missing)
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def post(self, root: str, period: int) -> str:
        _check(root, period)
        for anchored in self.roots():
            if anchored.period == period:
                if anchored.root == root:
                    return anchored.ref
                raise LedgerError(f"{self.path}: period {period} is already anchored with root {anchored.root}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"period": period, "root": root, "posted_at": int(time.time())}, sort_keys=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if os.fstat(fd).st_size and not self._ends_with_newline():
                line = "\n" + line  # close a line torn by an earlier crash, so this one parses
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return f"file:{self.path}#period={period}"

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"

    def roots(self) -> list[AnchoredRoot]:
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                period, root, posted_at = record["period"], record["root"], record["posted_at"]
                _check(root, period)
            except (ValueError, KeyError, TypeError, LedgerError):
                continue
            found.append(AnchoredRoot(period, root, int(posted_at), f"file:{self.path}#period={period}"))
        return found


def make_anchor(kind: str, path: Path | str | None = None) -> Anchor:
    """The anchor adapter named ``kind`` (``none`` or ``file``; ``file`` needs ``path``)."""
    if kind == "none":
        return NoneAnchor()
    if kind == "file":
        if path is None:
            raise LedgerError("the file anchor needs a path")
        return FileAnchor(path)
    raise LedgerError(f"unknown anchor {kind!r}: choose none or file")

