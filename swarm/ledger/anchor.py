"""Anchors: where a period's Merkle root is posted so that anyone can later check balances against it.

The ledger does not depend on any chain: an :class:`Anchor` is anything with ``post`` and ``roots``. Adapters
here: :class:`NoneAnchor` (anchoring off) and :class:`FileAnchor` (a JSON-lines file); ``evm`` is
:class:`swarm.ledger.evm.EvmAnchor` (an append-only registry contract through web3.py), imported only when asked
for, so swarm runs without the ``evm`` extra.

:func:`open_anchor` builds the configured adapter (``ledger.anchor*`` keys); :func:`anchor_meta` is the
secret-free description a ledger stores, and :func:`anchored_roots` reads the roots back from it for
``swarm ledger verify``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.errors import UserError
from swarm.ledger.anchor_types import Anchor, AnchoredRoot, check_root
from swarm.ledger.entries import LedgerError

if TYPE_CHECKING:
    from swarm.config import LedgerConfig

__all__ = [
    "EVM_EXTRA_HINT",
    "Anchor",
    "AnchoredRoot",
    "FileAnchor",
    "NoneAnchor",
    "anchor_key",
    "anchor_meta",
    "anchored_roots",
    "make_anchor",
    "open_anchor",
]

EVM_EXTRA_HINT = "the evm anchor needs web3: pip install '.[evm]' (or: pip install 'swarm[evm]')"


class NoneAnchor:
    """Anchoring switched off: roots are checked for form and forgotten."""

    def post(self, root: str, period: int) -> str:
        check_root(root, period)
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
        check_root(root, period)
        for anchored in self.roots():
            if anchored.period == period:
                if anchored.root == root:
                    return anchored.ref
                raise LedgerError(
                    f"{self.path}: period {period} is already anchored with root {anchored.root}"
                )
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
                check_root(root, period)
            except (ValueError, KeyError, TypeError, LedgerError):
                continue
            found.append(AnchoredRoot(period, root, int(posted_at), f"file:{self.path}#period={period}"))
        return found


def make_anchor(
    kind: str,
    path: Path | str | None = None,
    *,
    rpc_url: str | None = None,
    contract: str | None = None,
    private_key: str | None = None,
    from_block: int = 0,
    timeout: float = 120.0,
) -> Anchor:
    """The anchor adapter named ``kind``: ``none``; ``file`` (needs ``path``); ``evm`` (needs ``rpc_url`` and
    ``contract``; ``private_key`` hex, None for a read-only anchor; ``from_block``, ``timeout``: see
    :class:`~swarm.ledger.evm.EvmAnchor`).

    :raises LedgerError: an unknown kind or a missing setting, or (evm) a node that cannot be reached or an address
        that does not hold the registry
    :raises UserError: ``evm`` without web3 installed (one line naming the extra to install)
    """
    if kind == "none":
        return NoneAnchor()
    if kind == "file":
        if path is None:
            raise LedgerError("the file anchor needs a path")
        return FileAnchor(path)
    if kind == "evm":
        if not rpc_url or not contract:
            raise LedgerError("the evm anchor needs ledger.anchor_rpc_url and ledger.anchor_contract")
        try:
            from swarm.ledger.evm import EvmAnchor
        except ImportError as error:
            raise UserError(f"ledger.anchor: {EVM_EXTRA_HINT} ({error})") from None
        return EvmAnchor.connect(rpc_url, contract, private_key, from_block=from_block, timeout=timeout)
    raise LedgerError(f"unknown anchor {kind!r}: choose none, file or evm")


def anchor_key(settings: LedgerConfig, environ: dict[str, str] | None = None) -> str | None:
    """The evm anchor's private key: the contents of ``settings.anchor_key_file`` if set, else the environment
    variable ``settings.anchor_key_env``; None when neither is given (a read-only anchor).

    :raises LedgerError: a key file that cannot be read (the message never contains the key)
    """
    if settings.anchor_key_file is not None:
        try:
            return Path(settings.anchor_key_file).expanduser().read_text().strip()
        except OSError as error:
            raise LedgerError(
                f"ledger.anchor_key_file: cannot read {settings.anchor_key_file}: {error.strerror or error}"
            ) from None
    value = (os.environ if environ is None else environ).get(settings.anchor_key_env, "").strip()
    return value or None


def open_anchor(settings: LedgerConfig, workdir: Path | str, environ: dict[str, str] | None = None) -> Anchor:
    """The adapter ``settings`` (the ``ledger`` config section) configure for a peer working in ``workdir``; the
    evm anchor posts with :func:`anchor_key`. Raises as :func:`make_anchor`."""
    if settings.anchor != "evm":
        return make_anchor(settings.anchor, settings.anchor_file(Path(workdir)))
    return make_anchor(
        "evm",
        rpc_url=settings.anchor_rpc_url,
        contract=settings.anchor_contract,
        private_key=anchor_key(settings, environ),
        from_block=settings.anchor_from_block,
        timeout=settings.anchor_timeout,
    )


def anchor_meta(settings: LedgerConfig, workdir: Path | str) -> dict[str, Any]:
    """What a ledger stores about its anchor (meta ``anchor``) so that a reader finds the posted roots: the kind
    and, for ``file``, the path; for ``evm``, the RPC URL, contract and first block. Never a key."""
    meta: dict[str, Any] = {"kind": settings.anchor, "path": str(settings.anchor_file(Path(workdir)))}
    if settings.anchor == "evm":
        meta.update(
            rpc_url=settings.anchor_rpc_url,
            contract=settings.anchor_contract,
            from_block=settings.anchor_from_block,
        )
    return meta


def anchored_roots(meta: dict[str, Any]) -> dict[int, str]:
    """Period -> root as the anchor described by ``meta`` (:func:`anchor_meta`) holds it, read-only; empty for
    ``none`` or an unknown kind. This is what ``swarm ledger verify`` compares recorded roots with.

    :raises LedgerError: the anchor cannot be read (e.g. the node is unreachable)
    :raises UserError: an evm anchor without web3 installed
    """
    kind = meta.get("kind")
    if kind == "file" and meta.get("path"):
        anchor: Anchor = FileAnchor(meta["path"])
    elif kind == "evm":
        anchor = make_anchor(
            "evm",
            rpc_url=meta.get("rpc_url"),
            contract=meta.get("contract"),
            from_block=int(meta.get("from_block") or 0),
        )
    else:
        return {}
    return {anchored.period: anchored.root for anchored in anchor.roots()}
