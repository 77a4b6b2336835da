"""A shaped link in user space: one TCP relay per peer, which that peer's announced address points to.

This machine's kernel has no ``sch_netem``, so ``tc qdisc … netem`` cannot shape a link. Instead a peer listens
on a private port and announces the relay's; every connection another peer opens to it passes the relay, which
delays each chunk in each direction by ``delay ± jitter``, serialises it at ``rate`` and, with probability
``loss``, holds it for one TCP retransmission timeout more (what a lost segment costs a TCP stream: the relay
sits above TCP, so it cannot drop bytes without breaking the stream). ``partition()`` cuts the peer off: open
connections are reset and new ones refused until ``heal()``.

Used by bench/wan.py and its tests. Needs no root and creates nothing outside this process.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from dataclasses import dataclass

CHUNK = 64 * 1024
RETRANSMISSION_TIMEOUT_S = 0.2  # Linux's minimum RTO: what one lost segment delays the stream by


@dataclass(frozen=True)
class LinkProfile:
    """One direction's shaping; both directions of a peer's link get the same."""

    name: str
    delay_ms: float = 0.0  # one-way
    jitter_ms: float = 0.0  # uniform in ±jitter, never reordering a stream
    rate_mbit: float | None = None  # None: unlimited
    loss: float = 0.0  # probability that a chunk waits one retransmission timeout more

    def hold_s(self, size: int, rng: random.Random) -> float:
        """How long a chunk of ``size`` bytes spends on the link (delay, jitter, loss), serialisation aside."""
        held = self.delay_ms / 1000 + (
            rng.uniform(-self.jitter_ms, self.jitter_ms) / 1000 if self.jitter_ms else 0
        )
        if self.loss and rng.random() < self.loss:
            held += RETRANSMISSION_TIMEOUT_S
        return max(0.0, held)

    def serialise_s(self, size: int) -> float:
        return 0.0 if self.rate_mbit is None else size * 8 / (self.rate_mbit * 1e6)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Direction:
    """One direction of one relayed connection: chunks leave in order, each no earlier than its arrival plus its
    hold, and no faster than the link's rate (shared by every connection in this direction of the link)."""

    def __init__(self, link: ShapedRelay, outbound: bool):
        self.link, self.outbound = link, outbound
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self.last_departure = 0.0

    async def read(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.queue.put_nowait(
                    (time.monotonic() + self.link.profile.hold_s(len(data), self.link.rng), data)
                )
        except (ConnectionError, OSError):
            pass
        finally:
            self.queue.put_nowait(None)

    async def write(self, writer: asyncio.StreamWriter) -> None:
        try:
            while (item := await self.queue.get()) is not None:
                due, data = item
                # FIFO: a chunk never overtakes the one before it (TCP does not reorder a stream)
                due = max(due, self.last_departure)
                start = max(due, self.link.busy_until[self.outbound])
                self.link.busy_until[self.outbound] = start + self.link.profile.serialise_s(len(data))
                self.last_departure = self.link.busy_until[self.outbound]
                wait = self.last_departure - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                # counted before it is written: whoever has received a byte finds it counted
                self.link.bytes[self.outbound] += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


class ShapedRelay:
    """Relay ``listen_port`` → ``target_port`` on 127.0.0.1 through a :class:`LinkProfile`, in its own thread.

    Guarantees: bytes arrive unchanged and in order; each direction is delayed and rate-limited per the profile;
    while partitioned, nothing passes and connections are refused; :meth:`close` stops everything it started."""

    def __init__(self, target_port: int, profile: LinkProfile, listen_port: int | None = None, seed: int = 0):
        self.target_port, self.profile = target_port, profile
        self.listen_port = free_port() if listen_port is None else listen_port
        self.rng = random.Random(seed)
        self.busy_until = {True: 0.0, False: 0.0}  # per direction: when the link is free again
        self.bytes = {True: 0, False: 0}  # True: from the peer to others
        self.partitioned = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"relay-{self.listen_port}", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError(f"relay on port {self.listen_port} did not start")

    @property
    def address(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.listen_port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.listen_port, reuse_address=True)
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            # every relayed connection's tasks end here, in the loop's own thread, before the loop is closed
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.partitioned:
            client_writer.transport.abort()
            return
        try:
            peer_reader, peer_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, peer_writer))
        inbound, outbound = _Direction(self, outbound=False), _Direction(self, outbound=True)
        try:
            await asyncio.gather(
                inbound.read(client_reader),
                inbound.write(peer_writer),
                outbound.read(peer_reader),
                outbound.write(client_writer),
            )
        finally:
            self._writers.difference_update((client_writer, peer_writer))

    def partition(self) -> None:
        """Cut the peer off: reset every relayed connection and refuse new ones until :meth:`heal`."""

        def cut() -> None:
            self.partitioned = True
            for writer in list(self._writers):
                writer.transport.abort()

        self._loop.call_soon_threadsafe(cut)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "partitioned", False)

    def close(self) -> None:
        def stop() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            self._loop.stop()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(stop)
        self._thread.join(10)
