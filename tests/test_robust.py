"""Robust aggregation: CenteredClip bounds what an outlier can do, and untrusted senders have no influence."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest
import torch
from hivemind.averaging.partition import TensorPartReducer

from swarm.network.robust import SwarmPartReducer, centered_clip
from tests.test_averager_bans import started_averagers, step_all, tensors_of


def _honest_and_outlier(seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    honest = torch.randn(3, size, generator=generator)
    outlier = honest[0] * 1000
    return honest, outlier


@pytest.mark.unit
def test_centered_clip_with_an_infinite_radius_is_the_weighted_mean() -> None:
    parts = torch.randn(4, 10, 7, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = (weights[:, None, None] * parts).sum(0) / weights.sum()
    result = centered_clip(parts, weights, tau=math.inf, iterations=10)
    assert result.shape == (10, 7)
    assert torch.allclose(result, expected, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.5]])
def test_one_huge_outlier_moves_centered_clip_by_at_most_tau_times_its_weight_share(weights) -> None:
    honest, outlier = _honest_and_outlier(1)
    parts = torch.cat([honest, outlier[None]])
    weights = torch.tensor(weights)
    honest_mean = (weights[:3, None] * honest).sum(0) / weights[:3].sum()
    tau = 20.0
    result = centered_clip(parts, weights, tau=tau, iterations=500)
    # at the fixed point the honest parts are within tau (not clipped), so sum_h w_h (x_h - v) = -w_o * tau * u:
    # ||v - honest mean|| <= tau * w_outlier / w_honest
    bound = tau * weights[3].item() / weights[:3].sum().item()
    assert (result - honest_mean).norm().item() <= bound * 1.01
    mean = (weights[:, None] * parts).sum(0) / weights.sum()
    assert (mean - honest_mean).norm().item() > 100 * bound  # what the plain mean lets the outlier do


@pytest.mark.unit
def test_a_sender_with_weight_zero_has_no_influence_on_centered_clip() -> None:
    honest, outlier = _honest_and_outlier(2)
    with_outlier = centered_clip(
        torch.cat([honest, outlier[None]]), torch.tensor([1.0, 2.0, 1.0, 0.0]), 5.0, 50
    )
    without = centered_clip(honest, torch.tensor([1.0, 2.0, 1.0]), 5.0, 50)
    assert torch.allclose(with_outlier, without, atol=1e-6)
    assert torch.equal(centered_clip(honest, torch.zeros(3), 5.0, 50), torch.zeros(64))


def _reduce(
    make_reducer: Callable[[], TensorPartReducer], inputs: list[list[torch.Tensor]], weights: list[float]
):
    """Every sender sends all its parts in order (as hivemind's runner does); the results each sender got."""
    return asyncio.run(_send_all(make_reducer, inputs, weights))


async def _send_all(make_reducer, inputs, weights):
    reducer = make_reducer()  # its futures belong to this event loop

    async def sender(index: int) -> list[torch.Tensor]:
        return [
            await reducer.accumulate_part(index, part_index, part, weight=weights[index])
            for part_index, part in enumerate(inputs[index])
        ]

    return await asyncio.gather(*(sender(index) for index in range(len(inputs))))


def _parts(seed: int, senders: int, shapes=((50,), (3, 4))) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(senders)]


@pytest.mark.unit
def test_mean_reducer_matches_hivemind_and_every_sender_gets_the_same_result() -> None:
    inputs, weights = _parts(3, 3), [1.0, 2.0, 0.0]
    shapes = [part.shape for part in inputs[0]]
    ours = _reduce(lambda: SwarmPartReducer(shapes, 3), inputs, weights)
    theirs = _reduce(lambda: TensorPartReducer(shapes, 3), inputs, weights)
    for part_index in range(len(shapes)):
        for sender_results in ours:
            assert sender_results[part_index] is ours[0][part_index]  # computed once, the same bytes for all
        assert torch.equal(ours[0][part_index], theirs[0][part_index])


@pytest.mark.unit
@pytest.mark.parametrize("aggregation", ["mean", "centered_clip"])
def test_banned_or_malformed_senders_count_as_zeros_at_weight_zero(aggregation: str) -> None:
    inputs = _parts(4, 6)
    weights = [1.0, 2.0, 1.0, -5.0, 1.0, 1.0]
    inputs[1][0] = inputs[1][0] * 1e6  # banned (index 1)
    inputs[2][1] = torch.full_like(inputs[2][1], math.nan)  # non-finite in part 1 only
    inputs[4][0] = torch.zeros(7)  # wrong shape in part 0 only
    # sender 3 reports a negative weight
    shapes = [part.shape for part in inputs[0]]
    options = dict(aggregation=aggregation, clip_tau=1e9, clip_iterations=3)
    results = _reduce(lambda: SwarmPartReducer(shapes, 6, ignored_senders=[1], **options), inputs, weights)
    trusted = {0: [0, 2, 5], 1: [0, 4, 5]}  # part index -> senders that count
    for part_index, senders in trusted.items():
        expected = sum(weights[i] * inputs[i][part_index] for i in senders) / sum(weights[i] for i in senders)
        assert torch.allclose(results[0][part_index], expected, atol=1e-5)
        assert all(torch.equal(result[part_index], results[0][part_index]) for result in results)

    nobody = _reduce(lambda: SwarmPartReducer(shapes, 2, **options), _parts(5, 2), [0.0, 0.0])
    assert all(not part.any() for part in nobody[0])  # zeros, not NaN, when no weight is left


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("aggregation", ["centered_clip", "mean"])
def test_a_member_with_a_huge_tensor_is_clipped_in_a_real_group(dhts, aggregation: str) -> None:  # noqa: F811
    size, tau = 3000, 50.0
    generator = torch.Generator().manual_seed(9)
    inputs = [[torch.rand(size, generator=generator) * 2 - 1] for _ in range(3)]
    inputs[2][0] = inputs[2][0] * 100  # the outlier
    honest_mean = (inputs[0][0] + inputs[1][0]) / 2
    # min_group_size=3: under CPU load two members could otherwise start a round of 2 before the outlier joins
    options = dict(
        aggregation=aggregation, clip_tau=tau, clip_iterations=100, part_size_bytes=2**12, min_group_size=3
    )
    with started_averagers(dhts, inputs, **options) as averagers:
        results = step_all(averagers, [1.0, 1.0, 1.0], timeouts=[40.0] * 3)
        assert all(isinstance(result, dict) and len(result) == 3 for result in results), results
        outputs = [tensors_of(averager)[0] for averager in averagers]
    assert all(torch.equal(output, outputs[0]) for output in outputs), "members hold different averages"
    # hivemind cuts the vector into parts of <= 1024 values (3 here; 6 allows for cuts at peer boundaries), and
    # each disjoint part is moved by at most tau * w_outlier / w_honest
    bound = tau * 1 / 2 * math.sqrt(6)
    deviation = (outputs[0] - honest_mean).norm().item()
    print(f"{aggregation}: deviation from the honest mean {deviation:.1f} (clip bound {bound:.1f})")
    if aggregation == "centered_clip":
        assert deviation <= bound
    else:
        assert deviation > 10 * bound
