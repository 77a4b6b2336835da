"""Fuzz benchmark: ≥ 10^4 hostile inputs against real honest nodes, counted per input family.

Two honest peers run a DHT node (``swarm.network.dht.start_dht`` with the run id, so every key has its validator)
and a ``SwarmAverager`` each, with valid records of their own under every key the swarm reads. A hostile client
written against plain hivemind (:mod:`tests.hostile_client`, a fresh RSA key of its own) then sends, family by
family:

* DHT records under every key (statuses, commitments, verdicts, ledger heads and chunks, rollouts, the averager's
  matchmaking and state-sharing keys): random bytes, truncated msgpack, wrong value types, mixed-type subkeys,
  NaN / infinite / negative / far-future expirations, oversized values, subkey-less "wipes", forged owners and
  whole "dictionaries" that are not one. It
  asks both honest nodes to store each one, and keeps each in its own storage, where honest reads meet it.
* Raw streams to every averager handler: random bytes, unknown frame markers, undecodable or wrongly typed
  protobuf, no request or two for a unary-input handler, oversized, truncated and error frames.

After each batch every board read runs on both honest nodes. Counted per family: inputs sent, refused at store
(by both honest nodes; for handlers: refusals the handlers logged, one per stream they refused — a truncated
frame is the caller hanging up and is not logged, and a wrongly typed protobuf may parse as the right type), reached
a reader (stored by an honest node, which then serves it: the target is 0), well-formed (stored, and rightly so: a
fuzzed value that is by chance what hivemind writes under its unsigned averager keys), tracebacks (in any log or on stderr), hangs (a read
over ``--deadline`` seconds, or a read whose honest records were not intact), and node crashes. At the end the
two averagers must still average.

Usage::

    python bench/hostile.py            # table on stdout, progress on stderr (about 2-3 minutes on 2 cores)
    python bench/hostile.py --json     # one JSON object on stdout
    python bench/hostile.py --quick    # about 1,300 inputs (< 1 minute)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hivemind.proto import averaging_pb2, dht_pb2  # noqa: E402
from hivemind.utils import MSGPackSerializer, get_dht_time  # noqa: E402

from swarm.config import NetworkConfig  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.network.averager import SwarmAverager  # noqa: E402
from swarm.network.dht import start_dht  # noqa: E402
from swarm.network.records import peer_id_from_public_key  # noqa: E402
from swarm.network.startup import start_retrying  # noqa: E402
from tests.hostile_client import END, REGULAR, ChildLogs, HostileClient, RawRecord, dumps, frame  # noqa: E402
from tests.test_hostile_records import (  # noqa: E402
    GRADS,
    RUN,
    Honest,
    _check_reads,
    _publish_honest,
    forged_records,
    valid_records,
)

RECORD_FAMILIES = [
    "random bytes",
    "truncated msgpack",
    "wrong types",
    "mixed-type subkeys",
    "bad expirations",
    "oversized",
    "wipe",
    "forged",
    "dictionary junk",
]
HANDLERS = ("rpc_join_group", "rpc_aggregate_part", "rpc_download_state", "rpc_download_contribution")
FRAME_FAMILIES = [
    "random bytes",
    "bad marker",
    "undecodable protobuf",
    "wrong protobuf type",
    "request count",
    "oversized frame",
    "truncated frame",
    "error frame",
    "random frames",
]


def log(message: str) -> None:
    print(f"[bench] {message}", file=_progress, flush=True)


_progress = sys.stderr


@dataclass
class Row:
    family: str
    target: str  # "records" or "handlers"
    sent: int = 0
    refused: int = 0  # records: refused by both honest nodes; handlers: refusals the handlers logged
    reached_reader: int = 0
    well_formed: int = 0  # fuzzed records that happen to be exactly what hivemind writes (accepted, rightly)
    tracebacks: int = 0
    hangs: int = 0
    crashes: int = 0
    reads: int = 0
    slowest_read_s: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---- fuzzed inputs ------------------------------------------------------------------------------------------------


def _random_object(rng: random.Random, depth: int = 0):
    choice = rng.randrange(8 if depth < 2 else 5)
    if choice == 0:
        return rng.randrange(-(2**63), 2**63)
    if choice == 1:
        return rng.choice([math.nan, math.inf, -1.5, 0.0, 1e308])
    if choice == 2:
        return "".join(rng.choice("abc\u00e9\u2603") for _ in range(rng.randrange(20)))
    if choice == 3:
        return os.urandom(rng.randrange(30))
    if choice == 4:
        return rng.choice([None, True, False])
    if choice == 5:
        return [_random_object(rng, depth + 1) for _ in range(rng.randrange(5))]
    if choice == 6:
        return {
            rng.choice(["peer_id", "epoch", "author", "seq", "data", "x", 1]): _random_object(rng, depth + 1)
            for _ in range(rng.randrange(6))
        }
    return tuple(_random_object(rng, depth + 1) for _ in range(rng.randrange(3)))


def _dumps_any(value) -> bytes:
    try:
        return dumps(value)
    except Exception:
        return dumps(repr(value))


def fuzz_records(
    family: str, count: int, rng: random.Random, own: str, marker: bytes, victim: str
) -> list[RawRecord]:
    valid = valid_records(own, marker, victim)
    forged = forged_records(own, marker, victim)
    records = []
    for index in range(count):
        key, tag, value = valid[index % len(valid)]
        ok = get_dht_time() + rng.uniform(5, 120)
        if family == "random bytes":
            records.append(RawRecord(key, tag, os.urandom(rng.randrange(1, 300)), ok, family))
        elif family == "truncated msgpack":
            cut = rng.randrange(1, len(value)) if len(value) > 1 else 0
            records.append(RawRecord(key, tag, value[:cut] if cut else b"\xdc\xff", ok, family))
        elif family == "wrong types":
            junk = _random_object(rng)
            records.append(RawRecord(key, tag, _dumps_any(junk), ok, family))
        elif family == "mixed-type subkeys":
            subkey = rng.choice([rng.randrange(1000), "text", 1.5, None, [1, 2], True])
            records.append(RawRecord(key, _dumps_any(subkey), value, ok, family))
        elif family == "bad expirations":
            expiration = rng.choice(
                [
                    math.nan,
                    math.inf,
                    -math.inf,
                    -5.0,
                    0.0,
                    get_dht_time() - 10,
                    get_dht_time() + 1e9,
                    get_dht_time() + rng.uniform(1e6, 3e8),
                    1e300,
                ]
            )
            records.append(RawRecord(key, tag, value, expiration, family))
        elif family == "oversized":
            size = (
                rng.randrange(3 << 20, (3 << 20) + (1 << 19))
                if rng.random() < 0.01
                else rng.randrange(8 << 10, 192 << 10)
            )
            records.append(RawRecord(key, tag, size, ok, family))
        elif family == "wipe":
            records.append(RawRecord(key, REGULAR, _dumps_any(_random_object(rng)), ok + 60, family))
        elif family == "forged":
            records.append(forged[index % len(forged)])
        elif family == "dictionary junk":  # a whole dictionary (subkey tag b"") that is not one
            junk = os.urandom(rng.randrange(1, 200)) if index % 2 else _dumps_any(_random_object(rng))
            records.append(RawRecord(key, b"", junk, ok, family))
        else:
            raise ValueError(family)
    return records


def fuzz_streams(family: str, count: int, rng: random.Random) -> list[bytes]:
    streams = []
    for _ in range(count):
        if family == "random bytes":
            data = os.urandom(rng.randrange(1, 2000))
        elif family == "bad marker":
            data = bytes([rng.randrange(2, 256)]) + os.urandom(rng.randrange(0, 100))
        elif family == "undecodable protobuf":
            data = frame(b"\xff\xff\xff\xff\x0f" + os.urandom(rng.randrange(0, 200))) + END
        elif family == "wrong protobuf type":
            other = rng.choice(
                [
                    dht_pb2.FindRequest(keys=[os.urandom(20)]),
                    dht_pb2.PingRequest(validate=True),
                    averaging_pb2.DownloadData(metadata=os.urandom(50)),
                    averaging_pb2.MessageFromLeader(code=rng.randrange(20), group_id=os.urandom(8)),
                ]
            )
            data = frame(other.SerializeToString() + os.urandom(rng.randrange(0, 3))) + END
        elif family == "request count":
            one = averaging_pb2.JoinRequest(schema_hash=os.urandom(4)).SerializeToString()
            data = END if rng.random() < 0.5 else frame(one) * rng.randrange(2, 6) + END
        elif family == "oversized frame":
            data = b"\x00" + rng.randrange(33 << 20, 1 << 62).to_bytes(8, "big") + os.urandom(100)
        elif family == "truncated frame":
            whole = frame(os.urandom(rng.randrange(10, 500)))
            data = whole[: rng.randrange(1, len(whole))]
        elif family == "error frame":
            data = frame(os.urandom(rng.randrange(0, 50)), b"\x01")
        elif family == "random frames":
            data = (
                b"".join(frame(os.urandom(rng.randrange(0, 300))) for _ in range(rng.randrange(1, 6))) + END
            )
        else:
            raise ValueError(family)
        streams.append(data)
    return streams


def well_formed_by_chance(record: RawRecord) -> bool:
    """Whether a fuzzed record is, by chance, what honest hivemind code writes under hivemind's own averager keys
    (random bytes that decode to a number under the state-sharing key, a bool under a matchmaking key, under a
    peer-id subkey): such a record carries no owner, so any node must take it."""
    if not record.key.startswith(f"{GRADS}.") or isinstance(record.value, int) or record.tag == REGULAR:
        return False
    try:
        subkey, value = MSGPackSerializer.loads(record.tag), MSGPackSerializer.loads(record.value)
    except Exception:
        return False
    if not isinstance(subkey, bytes) or not math.isfinite(record.expiration):
        return False
    if record.key.endswith(".all_averagers"):
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))
    return isinstance(value, bool)


# ---- the run ------------------------------------------------------------------------------------------------------


class Counter:
    """Tracebacks and refusals written so far to the children's log and to stderr."""

    def __init__(self, logs: ChildLogs, stderr_path: Path):
        self.logs, self.stderr_path = logs, stderr_path

    def tracebacks(self) -> int:
        text = self.logs.text() + self.stderr_path.read_text(errors="replace")
        return text.count("Traceback")

    def handler_refusals(self) -> int:
        return self.logs.text().count("swarm.network.handlers Refused")


def timed_reads(alice: Honest, bob: Honest, hostile: str, deadline: float, row: Row) -> None:
    try:  # refreshed as honest peers do (the averager's entries live 30 s)
        _publish_honest(alice, bob)
    except AssertionError:  # an entry the running averagers already hold with a later expiration
        pass
    started = time.monotonic()
    try:
        _check_reads(alice, bob, hostile=hostile)
    except AssertionError as error:
        row.hangs += 1
        row.notes.append(f"reads: {str(error).splitlines()[0][:160]}")
    elapsed = time.monotonic() - started
    row.reads += 1
    row.slowest_read_s = max(row.slowest_read_s, elapsed)
    if elapsed > deadline:
        row.hangs += 1
        row.notes.append(f"a round of reads took {elapsed:.1f}s")


def run(
    records_per_family: int, streams_per_family: int, deadline: float, seed: int, work: Path
) -> list[Row]:
    rng = random.Random(seed)
    stderr_path = work / "stderr.log"
    global _progress
    _progress = os.fdopen(os.dup(2), "w")
    saved = os.dup(2)
    sink = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(sink, 2)  # everything the honest processes print, tracebacks included, is counted
    nodes, averagers, hostile, rows = [], [], None, []
    logs = ChildLogs(work / "children.log").__enter__()
    counter = Counter(logs, stderr_path)
    try:
        identities = {name: Identity.load_or_create(work / f"{name}.key") for name in ("alice", "bob")}
        alice_dht = start_dht(
            NetworkConfig(client_mode=False), identities["alice"], work / "alice", run_id=RUN
        )
        nodes.append(alice_dht)
        peers = [str(addr) for addr in alice_dht.get_visible_maddrs()]
        bob_dht = start_dht(
            NetworkConfig(client_mode=False, initial_peers=peers), identities["bob"], work / "bob", run_id=RUN
        )
        nodes.append(bob_dht)
        for index, dht in enumerate(nodes):
            averagers.append(start_retrying(_averager(dht, float(index + 1)), 60, what="averager"))
        hostile = HostileClient.start(peers, start=lambda make: start_retrying(make, 60, what="DHT"))
        alice, bob = Honest(identities["alice"], alice_dht), Honest(identities["bob"], bob_dht)
        _publish_honest(alice, bob)
        own = str(peer_id_from_public_key(hostile.private_key.get_public_key()))
        log(f"honest nodes up; {records_per_family} records and {streams_per_family} streams per family")

        for family in RECORD_FAMILIES:
            row, before, started = Row(family, "records"), counter.tracebacks(), time.monotonic()
            records = fuzz_records(family, records_per_family, rng, own, hostile.marker, alice.id)
            for offset in range(0, len(records), 500):
                batch = records[offset : offset + 500]
                answers = hostile.store_raw(batch, [alice_dht.peer_id, bob_dht.peer_id], timeout=120)
                for position, record in enumerate(batch):
                    stored = [
                        a[position] if isinstance(a, list) and position < len(a) else None
                        for a in answers.values()
                    ]
                    row.sent += 1
                    if any(stored) and well_formed_by_chance(record):
                        row.well_formed += 1
                    elif any(stored):
                        row.reached_reader += 1
                    else:  # said no, or failed the whole request (a dictionary that does not decode)
                        row.refused += 1
                timed_reads(alice, bob, own, deadline, row)
            row.tracebacks = counter.tracebacks() - before
            row.crashes = sum(not process.is_alive() for process in [*nodes, *averagers])
            row.seconds = time.monotonic() - started
            rows.append(row)
            log(
                f"records / {family}: {row.sent} sent, {row.refused} refused, {row.reached_reader} reached a reader,"
                f" {row.tracebacks} tracebacks, {row.hangs} hangs ({row.seconds:.0f}s)"
            )

        target = alice_dht.peer_id
        for family in FRAME_FAMILIES:
            row, before, refused_before = (
                Row(family, "handlers"),
                counter.tracebacks(),
                counter.handler_refusals(),
            )
            started = time.monotonic()
            streams = fuzz_streams(family, streams_per_family, rng)
            asyncio.run(_send_streams(hostile, target, streams, row))
            time.sleep(0.3)  # the last refusals reach the log
            timed_reads(alice, bob, own, deadline, row)
            row.refused = counter.handler_refusals() - refused_before
            row.tracebacks = counter.tracebacks() - before
            row.crashes = sum(not process.is_alive() for process in [*nodes, *averagers])
            row.seconds = time.monotonic() - started
            rows.append(row)
            log(
                f"handlers / {family}: {row.sent} sent, {row.refused} refusals logged, {row.tracebacks} tracebacks"
                f" ({row.seconds:.0f}s)"
            )

        final = Row("honest round after", "averaging")
        started = time.monotonic()
        results = _average(averagers)
        final.sent = 1
        if not all(result is not None for result in results):
            final.hangs = 1
            final.notes.append(f"averaging failed: {results}")
        final.crashes = sum(not process.is_alive() for process in [*nodes, *averagers])
        final.seconds = time.monotonic() - started
        rows.append(final)
    finally:
        for averager in averagers:
            averager.shutdown()
        if hostile is not None:
            hostile.dht.shutdown()
        for dht in nodes:
            dht.shutdown()
        logs.__exit__()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)
    return rows


def _averager(dht, value: float) -> Callable[[], SwarmAverager]:
    return lambda: SwarmAverager(
        [torch.full((1000,), value)],
        dht,
        state_provider=lambda: ({"epoch": 0}, [torch.zeros(3)]),
        prefix=GRADS,
        start=False,
        target_group_size=2,
        min_matchmaking_time=4.0,
        request_timeout=3.0,
        allreduce_timeout=30.0,  # as swarm.node.peer bounds a round: a stalled part fails, never hangs
        next_chunk_timeout=10.0,
    )


def _average(averagers: list[SwarmAverager]) -> list:
    results: list = [None] * len(averagers)

    def step(index: int) -> None:
        try:
            results[index] = averagers[index].step(
                gather=dict(epoch=1, state_hash="h", samples=1), weight=1.0, timeout=40
            )
        except Exception as error:
            results[index] = None
            log(f"averaging failed: {error!r}")

    threads = [threading.Thread(target=step, args=(index,)) for index in range(len(averagers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


async def _send_streams(hostile: HostileClient, target, streams: list[bytes], row: Row) -> None:
    gate = asyncio.Semaphore(16)

    async def one(index: int, data: bytes) -> None:
        name = f"{GRADS}::SwarmAverager.{HANDLERS[index % len(HANDLERS)]}"
        async with gate:
            try:
                await hostile.send_frames(target, name, data, read_timeout=0.3)
            except Exception as error:
                row.notes.append(f"could not send: {type(error).__name__}")
        row.sent += 1

    await asyncio.gather(*(one(index, data) for index, data in enumerate(streams)))


def table(rows: list[Row]) -> str:
    header = (
        f"{'target':<9} {'family':<22} {'sent':>6} {'refused':>8} {'reached':>8} {'w-formed':>8}"
        f" {'tracebk':>8} {'hangs':>6} {'crashes':>8} {'slowest read':>13} {'secs':>5}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        slowest = f"{row.slowest_read_s:.2f}s" if row.reads else "-"
        lines.append(
            f"{row.target:<9} {row.family:<22} {row.sent:>6} {row.refused:>8} {row.reached_reader:>8}"
            f" {row.well_formed:>8} {row.tracebacks:>8} {row.hangs:>6} {row.crashes:>8} {slowest:>13} {row.seconds:>5.0f}"
        )
    total = sum(row.sent for row in rows)
    lines.append(
        f"total inputs: {total}; tracebacks {sum(r.tracebacks for r in rows)}, hangs"
        f" {sum(r.hangs for r in rows)}, crashes {max(r.crashes for r in rows)},"
        f" reached a reader {sum(r.reached_reader for r in rows)}"
    )
    for row in rows:
        for note in row.notes[:3]:
            lines.append(f"  {row.target}/{row.family}: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1,300 inputs instead of about 11,000")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of a table")
    parser.add_argument("--records", type=int, default=None, help="records per record family (default 1100)")
    parser.add_argument("--streams", type=int, default=None, help="streams per handler family (default 250)")
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds a round of board reads may take")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = args.records or (120 if args.quick else 1100)
    streams = args.streams or (40 if args.quick else 250)
    with tempfile.TemporaryDirectory(prefix="swarm-hostile-") as work:
        started = time.monotonic()
        rows = run(records, streams, args.deadline, args.seed, Path(work))
        elapsed = time.monotonic() - started
    if args.json:
        print(
            json.dumps(
                dict(
                    seconds=round(elapsed, 1),
                    inputs=sum(r.sent for r in rows),
                    rows=[asdict(row) for row in rows],
                )
            )
        )
    else:
        print(table(rows))
        print(f"({elapsed:.0f}s)")
    bad = any(row.tracebacks or row.hangs or row.crashes or row.reached_reader for row in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
