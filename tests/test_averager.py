"""SwarmAverager: bit-identical averages on every member, and stale/diverged members kept out of the average."""

from __future__ import annotations

import asyncio
import threading
import uuid
from types import SimpleNamespace

import pytest
import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.p2p import PeerID

from swarm.network.averager import SwarmAverager, _tolerate_larger_groups, round_consensus
from swarm.network.compression import as_received, make_compression


@pytest.mark.unit
def test_round_consensus_is_the_majority_and_order_independent() -> None:
    keys = [(3, "b"), (3, "a"), (3, "b"), (2, "z")]
    assert round_consensus(keys) == (3, "b")
    assert round_consensus(list(reversed(keys))) == (3, "b")
    # ties: the later epoch wins, then the smaller hash, whatever the order
    assert round_consensus([(4, "x"), (5, "y")]) == (5, "y")
    assert round_consensus([(5, "b"), (5, "a")]) == round_consensus([(5, "a"), (5, "b")]) == (5, "a")


def _average(dhts, inputs, keys, weights, compression: str, inspect=None, declared=None):
    """Average ``inputs`` (one list of tensors per DHT) in one group; ``inspect(averagers)`` runs before shutdown.
    ``declared``: the sample counts members declare in their gathered metadata (default: their weights)."""
    declared = weights if declared is None else declared
    prefix = f"test_{uuid.uuid4().hex[:8]}"
    averagers = [
        SwarmAverager(
            [tensor.clone() for tensor in tensors],
            dht,
            state_provider=lambda: ({}, []),
            prefix=prefix,
            start=True,
            target_group_size=len(dhts),
            min_matchmaking_time=4.0,
            request_timeout=3.0,
            allreduce_timeout=30.0,  # as swarm.node.peer bounds a round: a stalled part fails, never hangs
            next_chunk_timeout=10.0,
            compression=make_compression(compression),
            part_size_bytes=2**14,
            keep_received_epochs=1,
        )
        for dht, tensors in zip(dhts, inputs)
    ]
    results: list = [None] * len(averagers)
    try:

        def run(index: int) -> None:
            epoch, state_hash = keys[index]
            results[index] = averagers[index].step(
                gather=dict(epoch=epoch, state_hash=state_hash, samples=declared[index]),
                weight=weights[index],
                timeout=40,
            )

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(averagers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert all(result is not None and len(result) == len(averagers) for result in results), results
        outputs = []
        for averager in averagers:
            with averager.get_tensors() as tensors:
                outputs.append([tensor.clone() for tensor in tensors])
        if inspect is not None:
            inspect(averagers)
        return outputs, [averager.bytes_sent.value for averager in averagers]
    finally:
        for averager in averagers:
            averager.shutdown()


def _inputs(seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(20000,), (64, 33), (7,)]
    return [[torch.rand(shape, generator=generator) * 2 - 1 for shape in shapes] for _ in range(3)]


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("compression,tolerance", [("none", 1e-6), ("8bit", 0.05)])
def test_every_member_gets_the_identical_weighted_mean(dhts, compression: str, tolerance: float) -> None:
    inputs = _inputs(0)
    weights = [1.0, 2.0, 3.0]
    outputs, bytes_sent = _average(dhts, inputs, [(1, "h")] * 3, weights, compression)
    for index in range(len(inputs[0])):
        expected = sum(w * peer[index] for w, peer in zip(weights, inputs)) / sum(weights)
        for output in outputs:
            assert torch.equal(output[index], outputs[0][index]), "members hold different averages"
            assert (output[index] - expected).abs().max().item() < tolerance
            assert not torch.allclose(output[index], inputs[0][index])
    assert all(count > 0 for count in bytes_sent)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_member_on_a_different_state_is_left_out_of_the_average(dhts) -> None:
    inputs = _inputs(1)
    keys = [(2, "agreed"), (2, "agreed"), (2, "diverged")]
    outputs, _ = _average(dhts, inputs, keys, [1.0, 1.0, 1.0], "none")
    for index in range(len(inputs[0])):
        expected = (inputs[0][index] + inputs[1][index]) / 2
        for output in outputs:
            assert torch.allclose(output[index], expected, atol=1e-6)


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("compression", ["none", "fp16", "8bit"])
def test_each_reducer_keeps_exactly_what_every_sender_sent(dhts, compression: str) -> None:
    """What an auditor checks a committed gradient against: the slices it reduced, as each sender sent them."""
    inputs = _inputs(2)
    flat = [torch.cat([tensor.reshape(-1) for tensor in tensors]) for tensors in inputs]
    codec = make_compression(compression)
    checked = []

    def inspect(averagers) -> None:
        for reducer in averagers:
            for index, sender in enumerate(averagers):
                if sender is reducer:
                    continue
                received = reducer.received_span(1, str(sender.peer_id))
                if received is None:
                    continue
                offset, parts = received
                for part in parts:
                    expected = as_received(flat[index][offset : offset + part.numel()].contiguous(), codec)
                    assert torch.equal(part, expected), f"{compression}: a kept part is not what was sent"
                    offset += part.numel()
                checked.append(offset)
        assert averagers[0].received_span(0, str(averagers[1].peer_id)) is None  # no round at epoch 0

    _average(dhts, inputs, [(1, "h")] * 3, [1.0, 1.0, 1.0], compression, inspect)
    assert len(checked) >= 4, "fewer than two reducers kept what they received"
    assert max(checked) == flat[0].numel()  # the last reducer's slice ends at the end of the gradient


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_member_cannot_weigh_more_than_it_declared(dhts) -> None:
    """The weight in each all-reduce message is self-reported: it is capped by the samples declared to the group."""
    inputs = _inputs(3)
    outputs, _ = _average(dhts, inputs, [(1, "h")] * 3, [1.0, 1.0, 1000.0], "none", declared=[1.0, 1.0, 1.0])
    for index in range(len(inputs[0])):
        expected = sum(peer[index] for peer in inputs) / 3
        for output in outputs:
            assert torch.allclose(output[index], expected, atol=1e-5)


@pytest.mark.unit
def test_a_group_larger_than_this_peers_target_does_not_fail_its_round() -> None:
    """Peers that count different peers as expected set different targets; hivemind's group-key update raised
    'Sample larger than population' when a leader assembled more members than a follower's target."""
    peers = tuple(PeerID(bytes([18, 32, index] + [0] * 31)) for index in range(3))
    manager = GroupKeyManager(SimpleNamespace(peer_id=peers[0]), "test", "0000", target_group_size=2)
    group = GroupInfo(b"group", peers, (b"", b"", b""))
    with pytest.raises(ValueError, match="Sample larger than population"):
        asyncio.run(manager.update_key_on_group_assembled(group))
    _tolerate_larger_groups(manager)
    asyncio.run(manager.update_key_on_group_assembled(group))  # no error: the swarm sets the bits itself
    assert manager.group_bits == "0000"
