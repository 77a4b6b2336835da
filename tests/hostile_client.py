"""A hostile client written against plain hivemind (no swarm code): it stores raw bytes under any key, on its own
node and on the honest nodes it names, and opens raw streams with garbage to any P2P handler.

Used by tests/test_hostile_*.py and bench/hostile.py. Everything here is what a modified hivemind client can do.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

REGULAR = DHTProtocol.IS_REGULAR_VALUE  # the subkey tag of a value without a subkey
JUNK = b"\xc1\xc1 not msgpack \xc1"  # 0xc1 is never used by msgpack


def dumps(value) -> bytes:
    return MSGPackSerializer.dumps(value)


@dataclass(frozen=True)
class RawRecord:
    """One record as it travels: key (the string), subkey tag (serialized subkey, or REGULAR), value bytes."""

    key: str
    tag: bytes
    # an int n: msgpack of n bytes, made on the client's node (hivemind 1.1.12's DHT process
    # cannot read a command of some hundred KiB from its pipe, so big values are never sent through it)
    value: bytes | int
    expiration: float
    family: str = ""

    @property
    def size(self) -> int:
        return self.value if isinstance(self.value, int) else len(self.value)


async def _send(dht: hivemind.DHT, node, records: list[RawRecord], peers: list[bytes], own: bool, sign: bool):
    validator = node.protocol.record_validator
    keys, tags, values, expirations = [], [], [], []
    for record in records:
        key_id = DHTID.generate(source=record.key)
        value = dumps(b"x" * record.value) if isinstance(record.value, int) else record.value
        if sign and validator is not None:
            value = validator.sign_value(DHTRecord(key_id.to_bytes(), record.tag, value, record.expiration))
        keys.append(key_id.to_bytes())
        tags.append(record.tag)
        values.append(value)
        expirations.append(record.expiration)
        if own:  # the client's own storage answers other nodes' reads
            storage = node.protocol.storage
            try:
                if record.tag == REGULAR:
                    storage.store(key_id, value, record.expiration)
                else:
                    storage.store_subkey(
                        key_id, MSGPackSerializer.loads(record.tag), value, record.expiration
                    )
            except Exception:
                pass
    request = dht_pb2.StoreRequest(
        keys=keys,
        subkeys=tags,
        values=values,
        expiration_time=expirations,
        in_cache=[False] * len(keys),
        peer=node.protocol.node_info,
    )
    answers = {}
    for peer in peers:
        try:
            response = await node.protocol.get_stub(PeerID(peer)).rpc_store(request, timeout=10)
            answers[peer] = list(response.store_ok)
        except Exception as error:
            answers[peer] = repr(error)
    return answers


def join_with_retries(make, attempts: int = 6, backoff: float = 1.0) -> hivemind.DHT:
    """``make(start=True)``, tried ``attempts`` times with a doubling pause: on 2 loaded cores p2pd's handshake with
    the bootstrap peer can time out ("failed to connect to bootstrap peers"), and a real attacker simply retries —
    as the swarm's own nodes do (``network.bootstrap_attempts``). Six tries pause up to 31 s: four (7 s) failed once in CI."""
    for attempt in range(attempts):
        try:
            return make(start=True)
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


class HostileClient:
    """A plain ``hivemind.DHT`` node with a fresh RSA key of its own (its signatures are valid, for its own key)."""

    def __init__(self, dht: hivemind.DHT, private_key: RSAPrivateKey):
        self.dht, self.private_key = dht, private_key
        self.marker = RSASignatureValidator(private_key).local_public_key
        self._p2p: P2P | None = None

    @classmethod
    def start(cls, initial_peers, start=None) -> HostileClient:
        """A new node (``start(make)`` starts it, e.g. with a bound on the wait; default: hivemind's own start)."""
        key = RSAPrivateKey()

        def make(**kwargs) -> hivemind.DHT:
            return hivemind.DHT(
                initial_peers=initial_peers, record_validators=[RSASignatureValidator(key)], **kwargs
            )

        dht = start(lambda: make(start=False)) if start is not None else join_with_retries(make)
        return cls(dht, key)

    def store_raw(
        self,
        records: list[RawRecord],
        peers: list[PeerID],
        own: bool = True,
        sign: bool = True,
        timeout: float = 60,
    ) -> dict[str, list[bool] | str]:
        """Send ``records`` in one store request to each of ``peers`` (and keep them in its own storage); what each
        peer answered per record (``store_ok``), or the error."""
        answers: dict[bytes, list | str] = {peer.to_bytes(): [] for peer in peers}
        batch, size = [], 0
        for index, record in enumerate(records):
            batch.append(record)
            # big values go alone (p2pd's 4 MiB)
            size += 200 + len(record.key) + len(record.tag) + record.size
            if size < 16 << 10 and index < len(records) - 1:
                continue
            future = self.dht.run_coroutine(
                functools.partial(_send, records=batch, peers=list(answers), own=own, sign=sign),
                return_future=True,
            )
            for peer, answer in future.result(timeout=timeout).items():
                if isinstance(answers[peer], list) and isinstance(answer, list):
                    answers[peer] += answer
                else:
                    answers[peer] = answer if isinstance(answer, str) else answers[peer]
            batch, size = [], 0
        return {str(PeerID(peer)): answer for peer, answer in answers.items()}

    # ---- handlers ----------------------------------------------------------------------------------------------
    async def _p2p_client(self) -> P2P:
        if self._p2p is None:
            self._p2p = await self.dht.replicate_p2p()
        return self._p2p

    async def send_frames(
        self, peer: PeerID, handle_name: str, data: bytes, read_timeout: float = 3.0
    ) -> bytes:
        """Open a stream to ``handle_name`` at ``peer``, write ``data`` raw, close the writing side, and return what
        came back within ``read_timeout`` seconds."""
        p2p = await self._p2p_client()
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, handle_name), 10)
        try:
            writer.write(data)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            chunks = []
            try:
                while True:
                    chunk = await asyncio.wait_for(reader.read(1 << 16), read_timeout)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except TimeoutError:
                pass
            return b"".join(chunks)
        finally:
            writer.close()


def frame(payload: bytes, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    """One frame of hivemind's protobuf stream protocol."""
    return marker + len(payload).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + payload


END = frame(b"", P2P.ERROR_MARKER)  # hivemind's end-of-stream frame (an empty RPCError)


def far_future() -> float:
    return get_dht_time() + 10 * 365 * 24 * 3600


NAN, INF = math.nan, math.inf


def poisoned(key: str, tag: bytes, value: bytes, lifetime: float = 60.0) -> list[RawRecord]:
    """Every poisoned variant of one valid record ``(key, tag, value)`` of the client's own: each family changes
    one thing (what a honest node must refuse), and ``valid`` is the record itself (a node may take it)."""
    now = get_dht_time()
    ok = now + lifetime
    truncated = [RawRecord(key, tag, value[: len(value) // 2], ok, "truncated")] if len(value) > 2 else []
    return truncated + [
        RawRecord(key, tag, value, ok, "valid"),
        RawRecord(key, tag, JUNK, ok, "undecodable"),
        RawRecord(key, dumps(7), value, ok, "mixed-type subkey"),
        RawRecord(key, dumps("text"), value, ok, "mixed-type subkey"),
        RawRecord(key, tag, value, far_future(), "far-future expiration"),
        RawRecord(key, tag, value, NAN, "nan expiration"),
        RawRecord(key, tag, value, INF, "inf expiration"),
        RawRecord(key, tag, 1 << 20, ok, "oversized"),
        RawRecord(key, REGULAR, dumps("wiped"), ok + 30, "wipe"),
        RawRecord(key, tag, dumps({"unexpected": [1, 2]}), ok, "wrong type"),
        RawRecord(key, tag, dumps([b"a", 2]), ok, "wrong type"),
    ]


class ChildLogs:
    """Copies what the ``hivemind`` and ``swarm`` loggers write, in this process and in every process forked while
    it is open (DHT nodes, averagers), to a file: pytest's own capture does not come back from forked children.
    Lines are ``<level number> <pid> <logger> <message>``, with the traceback when there is one."""

    LOGGERS = ("hivemind", "swarm")

    def __init__(self, path):
        self.path = path
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(levelno)d %(process)d %(name)s %(message)s"))
        self._levels: dict[str, int] = {}

    def __enter__(self) -> ChildLogs:
        for name in self.LOGGERS:
            found = logging.getLogger(name)
            self._levels[name] = found.level
            found.addHandler(self.handler)
            found.setLevel(
                logging.DEBUG if name == "swarm" else min(found.level or logging.INFO, logging.INFO)
            )
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
            logging.getLogger(name).setLevel(self._levels[name])
        self.handler.close()

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def lines(self, min_level: int = logging.DEBUG) -> list[str]:
        return [
            line
            for line in self.text().splitlines()
            if line.split(" ", 1)[0].isdigit() and int(line.split(" ", 1)[0]) >= min_level
        ]
