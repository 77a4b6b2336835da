"""Garbage on every P2P handler of an honest SwarmAverager: refused with at most one log line per (kind, source
peer), no traceback, and the averager still averages afterwards.

The attacker is :mod:`tests.hostile_client` (plain hivemind): it opens raw streams to the handlers by name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest
import torch
from hivemind.proto import averaging_pb2, dht_pb2

from swarm.network.averager import SwarmAverager
from swarm.network.startup import start_retrying
from tests.hostile_client import END, ChildLogs, HostileClient, frame

pytestmark = pytest.mark.integration

HANDLERS = ("rpc_join_group", "rpc_aggregate_part", "rpc_download_state", "rpc_download_contribution")


def garbage_streams() -> dict[str, bytes]:
    """Kinds of junk a stream may carry, by name."""
    random = os.urandom(300)
    return {
        "random bytes": random,
        "unknown frame marker": b"\x07" + frame(b"abc")[1:],
        "undecodable protobuf": frame(b"\xff\xff\xff\xff\x0f" + os.urandom(40)) + END,
        "wrong protobuf type": frame(dht_pb2.FindRequest(keys=[b"k" * 20]).SerializeToString() + b"\x0a")
        + END,
        "no request": END,
        "two requests": frame(averaging_pb2.JoinRequest().SerializeToString()) * 2 + END,
        "oversized frame": b"\x00" + (1 << 40).to_bytes(8, "big") + b"x" * 100,
        "truncated frame": frame(b"x" * 100)[:50],
        "error frame": frame(b"\xff\xff", b"\x01"),
        "unknown group": frame(
            averaging_pb2.AveragingData(
                group_id=b"nope", code=averaging_pb2.PART_FOR_AVERAGING
            ).SerializeToString()
        )
        + END,
    }


def _averagers(dhts, prefix: str, count: int = 2) -> list[SwarmAverager]:
    def make(dht, value: float):
        return lambda: SwarmAverager(
            [torch.full((1000,), value)],
            dht,
            state_provider=lambda: ({"epoch": 0}, [torch.zeros(3)]),
            prefix=prefix,
            start=False,
            target_group_size=count,
            min_matchmaking_time=4.0,
            request_timeout=3.0,
            allreduce_timeout=30.0,  # as swarm.node.peer bounds a round: a stalled part fails, never hangs
            next_chunk_timeout=10.0,
        )

    return [
        start_retrying(make(dht, float(index + 1)), 60, what="averager")
        for index, dht in enumerate(dhts[:count])
    ]


def _average(averagers: list[SwarmAverager]) -> list:
    results: list = [None] * len(averagers)

    def run(index: int) -> None:
        results[index] = averagers[index].step(
            gather=dict(epoch=1, state_hash="h", samples=1), weight=1.0, timeout=40
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(averagers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.timeout(180)
def test_garbage_on_every_handler_is_refused_quietly_and_averaging_goes_on(dhts, tmp_path: Path) -> None:
    prefix = f"hostile_{uuid.uuid4().hex[:8]}"
    averagers, hostile = [], None
    with ChildLogs(tmp_path / "children.log") as logs:
        try:
            averagers = _averagers(dhts, prefix)
            hostile = HostileClient.start(
                [str(a) for a in dhts[0].get_visible_maddrs()],
                start=lambda make: start_retrying(make, 60, what="DHT"),
            )
            target = dhts[0].peer_id
            streams = garbage_streams()

            async def attack() -> dict[tuple[str, str], bytes]:
                replies = {}
                for _ in range(2):  # twice: the second round must not log again
                    for method in HANDLERS:
                        for kind, data in streams.items():
                            name = f"{prefix}::SwarmAverager.{method}"
                            replies[method, kind] = await hostile.send_frames(
                                target, name, data, read_timeout=1.0
                            )
                return replies

            replies = asyncio.run(attack())
            assert len(replies) == len(HANDLERS) * len(streams)
            assert all(averager.is_alive() for averager in averagers)

            # honest calls right after still work: a state download, and a round of averaging
            state = averagers[1].download_state(target, timeout=10)
            assert state is not None and state[0] == {"epoch": 0}
            results = _average(averagers)
            assert all(result is not None and len(result) == 2 for result in results), results
            for averager in averagers:
                with averager.get_tensors() as tensors:
                    assert torch.equal(tensors[0], torch.full((1000,), 1.5))
        finally:
            for averager in averagers:
                averager.shutdown()
            if hostile is not None:
                hostile.dht.shutdown()

    text = logs.text()
    assert "Traceback" not in text, text[-3000:]
    assert "Handler failed" not in text and "Exception while receiving" not in text
    refusals = [line for line in logs.lines() if "swarm.network.handlers Refused" in line]
    warnings = [line for line in logs.lines(logging.WARNING) if "swarm.network.handlers Refused" in line]
    assert len(warnings) >= 8, warnings  # several kinds of junk were told apart
    # at most one warning per (kind, source): one attacker, so each kind once, though every stream was sent twice
    kinds = [line.split(" from ")[0] for line in warnings]
    assert len(kinds) == len(set(kinds)), warnings
    assert len(refusals) > len(warnings)  # the repeats were logged at debug level only
