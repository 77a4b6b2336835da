"""``swarm ledger``: read and check a peer's copy of the ledger.

``balance [PEER]``, ``show``, ``verify`` (non-zero exit naming the first bad entry), ``export --format csv|json``
and ``proof PEER``; each takes ``--db PATH`` (default: ``WORKDIR/ledger.db`` of the effective config). Only this
module's :func:`add_ledger_parser` is imported when the ``swarm`` parser is built; the rest loads on use.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from swarm.errors import UserError

if TYPE_CHECKING:
    from swarm.ledger.entries import LedgerEntry
    from swarm.ledger.store import LedgerStore

LEDGER_FILE = "ledger.db"  # also swarm.ledger.config.LEDGER_FILE (that module is heavier to import)


def add_ledger_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ledger`` and its sub-commands on the ``swarm`` command's ``subparsers``."""
    ledger = subparsers.add_parser("ledger", help="read and verify the ledger of credited work")
    commands = ledger.add_subparsers(dest="ledger_command", required=True, metavar="LEDGER_COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help)
        parser.add_argument("--db", type=Path, help=f"ledger database (default: WORKDIR/{LEDGER_FILE})")
        return parser

    balance = command("balance", help="balances in credits (all peers, or one)")
    balance.add_argument("peer", nargs="?", help="peer id or peer name")
    balance.add_argument(
        "--epoch", type=int, help="current epoch for provisional credit (default: latest in ledger)"
    )
    balance.add_argument("--json", action="store_true", help="print JSON (micro-credits)")
    command("show", help="list every entry")
    command("verify", help="check every hash, signature and chain; exit 1 naming the first bad entry")
    export = command("export", help="dump every entry with its signature")
    export.add_argument("--format", choices=("csv", "json"), default="json")
    export.add_argument("--output", type=Path, help="write here instead of stdout")
    proof = command("proof", help="Merkle inclusion proof of a peer's balance (JSON)")
    proof.add_argument("peer", help="peer id or peer name")
    proof.add_argument(
        "--epoch", type=int, help="current epoch for provisional credit (default: latest in ledger)"
    )
    return ledger


def run_ledger(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the ``swarm ledger`` sub-command in ``args``; returns the exit code.

    :raises UserError: bad arguments, a missing database, or (from ``verify``) the first bad entry
    """
    from swarm.ledger.entries import LedgerError
    from swarm.ledger.store import LedgerStore

    out = out or sys.stdout
    path = args.db if args.db is not None else _default_db()
    if not path.is_file():
        raise UserError(f"{path}: no ledger database here (pass --db PATH)")
    handler = {"balance": _balance, "show": _show, "verify": _verify, "export": _export, "proof": _proof}
    try:
        with LedgerStore(path) as store:
            return handler[args.ledger_command](store, args, out)
    except LedgerError as error:
        raise UserError(str(error)) from None


def _default_db() -> Path:
    from swarm.config import load_config

    return Path(load_config().workdir) / LEDGER_FILE


def credits(micro: int) -> str:
    """Micro-credits as a decimal string of credits, without floats: ``-1500000`` → ``-1.500000``."""
    whole, fraction = divmod(abs(micro), 1_000_000)
    return f"{'-' if micro < 0 else ''}{whole}.{fraction:06d}"


def _current(store_entries: list[LedgerEntry], epoch: int | None) -> int:
    """``epoch``, or the ledger's own clock (:func:`~swarm.ledger.balances.ledger_epoch`): every copy holding the
    same entries then shows the same final and provisional balances."""
    from swarm.ledger.balances import ledger_epoch

    return epoch if epoch is not None else ledger_epoch(store_entries)


def _resolve(peer: str, known: list[str]) -> str:
    from swarm.identity import peer_name

    if peer in known:
        return peer
    named = [p for p in known if peer_name(p) == peer]
    if len(named) == 1:
        return named[0]
    raise UserError(
        f"peer {peer!r} has no balance in this ledger" if not named else f"name {peer!r} is ambiguous"
    )


def _balances(store: LedgerStore, epoch: int | None):
    """Balances under the rules the ledger was written with (stored by the recorder; defaults otherwise)."""
    from swarm.ledger.balances import balances

    entries = store.entries()
    return balances(entries, store.rules(), _current(entries, epoch))


def _balance(store: LedgerStore, args: argparse.Namespace, out: TextIO) -> int:
    from swarm.identity import peer_name

    table = _balances(store, args.epoch)
    if args.peer:
        peer = _resolve(args.peer, list(table))
        table = {peer: table[peer]}
    if args.json:
        rows = {
            p: {
                "final": b.final,
                "provisional": b.provisional,
                "banned": b.banned,
                "work": b.work,
                "audits": b.audits,
                "penalties": b.penalties,
            }
            for p, b in table.items()
        }
        print(json.dumps(rows, indent=2, sort_keys=True), file=out)
        return 0
    print(f"{'peer':<54} {'name':<26} {'final':>16} {'provisional':>16}", file=out)
    for peer, balance in table.items():
        flag = "  BANNED" if balance.banned else ""
        print(
            f"{peer:<54} {peer_name(peer):<26} {credits(balance.final):>16} "
            f"{credits(balance.provisional):>16}{flag}",
            file=out,
        )
    return 0


def _show(store: LedgerStore, args: argparse.Namespace, out: TextIO) -> int:
    from swarm.identity import peer_name

    for e in store.entries():
        ref = e.refs[0][:12] if e.refs else "-"
        print(
            f"{e.hash[:12]} {peer_name(e.author):<26} #{e.seq:<4} {e.kind:<12} subject={peer_name(e.subject)} "
            f"epoch={e.epoch} samples={e.samples} tokens={e.tokens} ref={ref}",
            file=out,
        )
    return 0


def _anchored(store: LedgerStore) -> dict[int, str]:
    """Period -> root as the ledger's anchor holds it (the anchor the recorder posted to, if any)."""
    from swarm.ledger.anchor import anchored_roots

    stored = store.get_meta("anchor")
    return anchored_roots(json.loads(stored)) if stored else {}


def _verify(store: LedgerStore, args: argparse.Namespace, out: TextIO) -> int:
    count = store.verify(_anchored(store))  # raises LedgerCorrupted naming the first bad entry or root
    authors = len({e.author for e in store.entries()})
    roots = len(store.roots())
    print(f"ok: {count} entries from {authors} authors verified, {roots} roots ({store.path})", file=out)
    return 0


_COLUMNS = (
    "hash",
    "kind",
    "author",
    "seq",
    "prev_hash",
    "subject",
    "epoch",
    "samples",
    "tokens",
    "credit",
    "refs",
    "created_at",
    "author_public_key",
    "signature",
)


def _row(entry: LedgerEntry) -> dict[str, object]:
    row = {name: getattr(entry, name) for name in _COLUMNS}
    row.update(
        refs=" ".join(entry.refs),
        author_public_key=entry.author_public_key.decode("ascii"),
        signature=entry.signature.decode("ascii", errors="replace"),
    )
    return row


def _export(store: LedgerStore, args: argparse.Namespace, out: TextIO) -> int:
    rows = [_row(entry) for entry in store.entries()]
    target = open(args.output, "w", newline="") if args.output else out
    try:
        if args.format == "json":
            json.dump(rows, target, indent=2)
            target.write("\n")
        else:
            writer = csv.DictWriter(target, fieldnames=_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    finally:
        if args.output:
            target.close()
    return 0


def _proof(store: LedgerStore, args: argparse.Namespace, out: TextIO) -> int:
    from swarm.ledger.merkle import MerkleTree

    table = _balances(store, args.epoch)
    peer = _resolve(args.peer, list(table))
    tree = MerkleTree(table)
    document = {
        "peer": peer,
        "final": table[peer].final,
        "provisional": table[peer].provisional,
        "epoch": _current(store.entries(), args.epoch),
        "root": tree.root,
        "leaf": tree.leaf(peer).decode(),
        "proof": [list(step) for step in tree.proof(peer)],
    }
    print(json.dumps(document, indent=2), file=out)
    return 0
