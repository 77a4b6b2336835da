"""The user-space link shaper (tests/link_shaper.py) that bench/wan.py puts in front of every peer: delay, rate,
loss as retransmission waits, partitions — and bytes that arrive unchanged."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.link_shaper import LinkProfile, ShapedRelay

pytestmark = pytest.mark.integration


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _round_trip(port: int, payload: bytes, timeout: float = 20.0) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - started


def test_a_relayed_round_trip_takes_the_delay_both_ways_and_bytes_arrive_unchanged(echo_port: int) -> None:
    relay = ShapedRelay(echo_port, LinkProfile("test", delay_ms=80, jitter_ms=10))
    try:
        payload = bytes(range(256)) * 64
        _, direct = _round_trip(echo_port, payload)
        received, relayed = _round_trip(relay.listen_port, payload)
        assert received == payload
        assert relayed >= 2 * 0.070, f"a round trip through an 80 ms ± 10 link took {relayed:.3f}s"
        assert relayed < 2 * 0.090 + 1.0
        assert direct < 0.1
    finally:
        relay.close()


def test_the_rate_limit_bounds_throughput_over_all_connections(echo_port: int) -> None:
    relay = ShapedRelay(echo_port, LinkProfile("test", rate_mbit=8))
    try:
        payload = b"x" * 500_000  # 4 Mbit each way at 8 Mbit/s: at least 0.5 s per direction
        received, seconds = _round_trip(relay.listen_port, payload)
        assert received == payload
        assert seconds >= 0.5, f"500 kB crossed an 8 Mbit/s link in {seconds:.2f}s"
        assert relay.bytes == {False: len(payload), True: len(payload)}
    finally:
        relay.close()


def test_loss_holds_chunks_for_a_retransmission_timeout(echo_port: int) -> None:
    relay = ShapedRelay(echo_port, LinkProfile("test", loss=1.0))
    try:
        received, seconds = _round_trip(relay.listen_port, b"ping")
        assert received == b"ping" and seconds >= 2 * 0.2
    finally:
        relay.close()


def test_a_partition_resets_connections_and_refuses_new_ones_until_it_heals(echo_port: int) -> None:
    relay = ShapedRelay(echo_port, LinkProfile("test"))
    try:
        with socket.create_connection(("127.0.0.1", relay.listen_port), timeout=5) as connection:
            connection.sendall(b"a")
            assert connection.recv(1) == b"a"
            relay.partition()
            time.sleep(0.2)
            with pytest.raises(OSError):
                connection.sendall(b"b")
                if not connection.recv(1):
                    raise ConnectionResetError("closed")
        with socket.create_connection(("127.0.0.1", relay.listen_port), timeout=2) as connection:
            try:
                connection.sendall(b"c")
                answer = connection.recv(1)
            except OSError:  # reset
                answer = b""
            assert answer == b"", "a partitioned link carried bytes"
        relay.heal()
        time.sleep(0.2)
        received, _ = _round_trip(relay.listen_port, b"healed")
        assert received == b"healed"
    finally:
        relay.close()
