"""SwarmAverager: banned peers are kept out of groups, and saved contributions are served to other peers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import averaging_pb2
from hivemind.utils.serializer import MSGPackSerializer

from swarm.network.averager import SwarmAverager

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def started_averagers(
    dhts: Sequence[hivemind.DHT],
    inputs: Sequence[Sequence[torch.Tensor]],
    per_peer: Sequence[dict[str, Any]] | None = None,
    averager_type: type[SwarmAverager] = SwarmAverager,
    **kwargs: Any,
) -> Iterator[list[SwarmAverager]]:
    """One SwarmAverager per DHT (each needs its own peer id), all in one fresh prefix; always shut down.

    ``kwargs`` go to every averager, ``per_peer[i]`` to the i-th one only.
    """
    options = dict(
        prefix=f"test_{uuid.uuid4().hex[:8]}",
        start=True,
        target_group_size=len(inputs),
        min_group_size=2,
        min_matchmaking_time=4.0,
        request_timeout=3.0,
        allreduce_timeout=30.0,  # as swarm.node.peer bounds a round: a stalled part fails, never hangs
        next_chunk_timeout=10.0,
        part_size_bytes=2**14,
    )
    options.update(kwargs)
    averagers: list[SwarmAverager] = []
    try:
        for index, (dht, tensors) in enumerate(zip(dhts, inputs)):
            own = dict(options, **(per_peer[index] if per_peer else {}))
            averagers.append(
                averager_type(
                    [tensor.clone() for tensor in tensors], dht, state_provider=lambda: ({}, []), **own
                )
            )
        yield averagers
    finally:
        for averager in averagers:
            averager.shutdown()


def step_all(
    averagers: Sequence[SwarmAverager],
    weights: Sequence[float],
    timeouts: Sequence[float],
    durations: list[float] | None = None,
) -> list:
    """Run one step on every averager at once; each entry is the step's result or the exception it raised.

    ``durations``, if given, receives each step's duration in seconds.
    """
    results: list = [None] * len(averagers)
    if durations is not None:
        durations[:] = [math.nan] * len(averagers)

    def run(index: int) -> None:
        started = time.monotonic()
        try:
            results[index] = averagers[index].step(
                gather=dict(epoch=1, state_hash="h", samples=weights[index]),
                weight=weights[index],
                timeout=timeouts[index],
            )
        except Exception as error:
            results[index] = error
        if durations is not None:
            durations[index] = time.monotonic() - started

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(averagers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(timeouts) + 30)
    return results


def tensors_of(averager: SwarmAverager) -> list[torch.Tensor]:
    with averager.get_tensors() as tensors:
        return [tensor.clone() for tensor in tensors]


def random_inputs(seed: int, peers: int = 3, shapes: Sequence[tuple[int, ...]] = ((5000,), (16, 9))):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.rand(shape, generator=generator) * 2 - 1 for shape in shapes] for _ in range(peers)]


@pytest.mark.timeout(180)
def test_two_peers_that_ban_a_third_average_without_it(dhts) -> None:
    inputs = random_inputs(7)
    with started_averagers(dhts, inputs) as (first, second, banned):
        for averager in (first, second):
            averager.set_banned([str(banned.peer_id)])
        durations: list[float] = []
        results = step_all(
            [first, second, banned], [1.0, 1.0, 1.0], timeouts=[30.0, 30.0, 6.0], durations=durations
        )
        print(
            "bans round: honest steps {:.1f}s, {:.1f}s; banned peer gave up after {:.1f}s".format(*durations)
        )

        honest = {first.peer_id, second.peer_id}
        for result in results[:2]:
            assert isinstance(result, dict), result
            assert set(result) == honest, "the banned peer got into the honest peers' group"
        assert not isinstance(results[2], dict), results[2]  # it found nobody to average with

        outputs = [tensors_of(averager) for averager in (first, second, banned)]
        for index in range(len(inputs[0])):
            expected = (inputs[0][index] + inputs[1][index]) / 2
            assert torch.equal(outputs[0][index], outputs[1][index]), "members hold different averages"
            assert torch.allclose(outputs[0][index], expected, atol=1e-6), (
                "the banned peer's tensor leaked in"
            )
            assert torch.equal(outputs[2][index], inputs[2][index]), "the banned peer averaged with someone"


@pytest.mark.timeout(180)
def test_a_peer_nobody_expected_cannot_take_an_expected_peers_place_in_a_group(dhts) -> None:
    """A round's group has a target size (the peers the barrier expected); a third peer that joins although its
    status said another epoch would fill it and leave an expected peer out of the round."""
    inputs = random_inputs(11)
    with started_averagers(dhts, inputs, target_group_size=2) as (first, second, stranger):
        first.set_admitted([str(second.peer_id)])
        second.set_admitted([str(first.peer_id)])
        results = step_all([first, second, stranger], [1.0, 1.0, 1.0], timeouts=[30.0, 30.0, 8.0])
        expected = {first.peer_id, second.peer_id}
        for result in results[:2]:
            assert isinstance(result, dict) and set(result) == expected, result
        assert not isinstance(results[2], dict), results[2]  # nobody let it in
        for averager in (first, second, stranger):  # admission lifted: anyone not banned may join again
            averager.set_admitted(None)
            averager.set_target_group_size(3)
        again = step_all([first, second, stranger], [1.0, 1.0, 1.0], timeouts=[30.0, 30.0, 30.0])
        assert all(isinstance(result, dict) and len(result) == 3 for result in again), again


class _AdmitsBannedAverager(SwarmAverager):
    """Matchmaking refuses nobody, as when a third peer that bans nobody leads a group with a banned member."""

    _rpc_handlers = None  # handler names carry the class name: collect this class's own
    _stub_type = None

    def _refuses_in_matchmaking(self, peer_id) -> bool:
        return False


@pytest.mark.timeout(180)
def test_a_banned_peer_that_got_into_the_group_counts_as_zero_where_its_banners_reduce(dhts) -> None:
    inputs = random_inputs(11, shapes=((6000,),))
    inputs[2][0] = inputs[2][0] + 1000  # the banned peer's input stands out everywhere
    # ~24 parts of 256 values, ~8 each
    options = dict(averager_type=_AdmitsBannedAverager, part_size_bytes=2**10)
    with started_averagers(dhts, inputs, **options) as (first, second, banned):
        for averager in (first, second):
            averager.set_banned([str(banned.peer_id)])
        results = step_all([first, second, banned], [1.0, 1.0, 1.0], timeouts=[30.0] * 3)
        assert all(isinstance(result, dict) and len(result) == 3 for result in results), results
        outputs = [tensors_of(averager)[0] for averager in (first, second, banned)]
    assert all(torch.equal(output, outputs[0]) for output in outputs), "members hold different averages"
    without = (inputs[0][0] + inputs[1][0]) / 2
    with_banned = (inputs[0][0] + inputs[1][0] + inputs[2][0]) / 3
    dropped = (outputs[0] - without).abs() < 1e-4
    kept = (outputs[0] - with_banned).abs() < 1e-4
    assert bool((dropped | kept).all())
    # the two banning peers reduce about two thirds of the vector, the banned peer the last third (with its input)
    assert 0.55 < dropped.float().mean().item() < 0.8, dropped.float().mean().item()


@pytest.mark.timeout(120)
def test_saved_contributions_are_served_whole_and_only_when_asked_properly(dhts, tmp_path: Path) -> None:
    contribution = os.urandom(3 * 2**20 + 12345)  # spans four chunks
    (tmp_path / "epoch-3.pt").write_bytes(contribution)
    inputs = random_inputs(8, peers=2)
    with started_averagers(dhts[:2], inputs, per_peer=[dict(contributions_dir=tmp_path), {}]) as (
        server,
        client,
    ):
        server_id = str(server.peer_id)

        started = time.monotonic()
        assert client.download_contribution(server_id, 3, timeout=30, max_bytes=2**23) == contribution
        print(f"downloaded {len(contribution) / 2**20:.1f} MiB in {time.monotonic() - started:.2f}s")
        assert client.download_contribution(server_id, 4, timeout=30, max_bytes=2**23) is None
        assert client.download_contribution(server_id, 3, timeout=30, max_bytes=len(contribution) - 1) is None
        assert (
            client.download_contribution(server_id, 3, timeout=30, max_bytes=len(contribution))
            == contribution
        )
        with pytest.raises(ValueError):
            client.download_contribution(server_id, -1, timeout=30, max_bytes=2**23)

        # a peer without contributions_dir serves nothing
        assert server.download_contribution(str(client.peer_id), 3, timeout=30, max_bytes=2**23) is None

        # malformed requests straight from the network get an empty stream, and the server keeps serving
        malformed = [b"\xc1garbage", MSGPackSerializer.dumps([3])]
        malformed += [MSGPackSerializer.dumps(dict(epoch=epoch)) for epoch in (-1, "3", True, 3.0, 2**63)]
        valid = MSGPackSerializer.dumps(dict(epoch=3))
        answers = asyncio.run(_raw_requests(dhts[0], server, [*malformed, valid]))
        assert answers[:-1] == [b""] * len(malformed)
        assert answers[-1] == contribution
        assert client.download_contribution(server_id, 3, timeout=30, max_bytes=2**23) == contribution


async def _raw_requests(
    server_dht: hivemind.DHT, server: SwarmAverager, requests: list[bytes]
) -> list[bytes]:
    """Send each request's metadata as is from a bare p2p node; the concatenated answer of each."""
    p2p = await P2P.create(initial_peers=server_dht.get_visible_maddrs())  # the server's own daemon
    try:
        stub = SwarmAverager.get_stub(p2p, server.peer_id, namespace=server.prefix)
        answers = []
        for metadata in requests:
            stream = await stub.rpc_download_contribution(averaging_pb2.DownloadData(metadata=metadata))
            answers.append(b"".join([message.metadata async for message in stream]))
        return answers
    finally:
        await p2p.shutdown()
