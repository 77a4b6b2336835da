"""Tests for swarm.network.compression: codec round-trips and real 3-peer hivemind averaging."""

from __future__ import annotations

import math
import threading
import time
import uuid

import hivemind
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.compression.quantization import Quantization

from swarm.network.compression import COMPRESSION_NAMES, make_compression, patch_hivemind_quantization
from tests.conftest import bare_dht

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")

# Uniform8BitQuantization: 256 buckets spanning +-3 sigma (RANGE_IN_SIGMAS=6) around the mean; every value is
# replaced by the mean of its bucket. A value inside +-3 sigma is therefore at most one bucket width away
# from what comes back: 6 * sigma / 256. (Measured: about half of that for uniform data.)
EIGHT_BIT_BUCKETS_PER_SIX_SIGMA = 256 / 6


def _uniform(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform in [-1, 1): no value lies outside +-3 sigma, so 8-bit quantization never clips."""
    return torch.rand(*shape, generator=generator) * 2 - 1


def _bucket_width(tensor: torch.Tensor) -> float:
    return tensor.float().std().item() / EIGHT_BIT_BUCKETS_PER_SIX_SIGMA


@pytest.mark.unit
def test_names_and_types() -> None:
    assert COMPRESSION_NAMES == ("none", "fp16", "8bit")
    assert isinstance(make_compression("none"), hivemind.compression.NoCompression)
    assert isinstance(make_compression("fp16"), hivemind.compression.Float16Compression)
    assert isinstance(make_compression("8bit"), hivemind.compression.Uniform8BitQuantization)


@pytest.mark.unit
def test_unknown_name_is_value_error_listing_allowed() -> None:
    with pytest.raises(ValueError) as info:
        make_compression("4bit")
    for name in COMPRESSION_NAMES:
        assert name in str(info.value)
    assert "4bit" in str(info.value)


@pytest.mark.unit
def test_patch_is_idempotent() -> None:
    before = Quantization.extract
    patch_hivemind_quantization()
    patch_hivemind_quantization()
    assert Quantization.extract is before
    assert getattr(Quantization.extract, "_swarm_numpy2_patched", False)


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(7,), (300, 500), (3, 4, 5)])
def test_round_trip(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1234)
    tensor = _uniform(*shape, generator=gen) * 3.0 + 0.5

    restored = deserialize_torch_tensor(
        serialize_torch_tensor(tensor, make_compression("none").compression_type)
    )
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    assert torch.equal(restored, tensor)

    restored = deserialize_torch_tensor(
        serialize_torch_tensor(tensor, make_compression("fp16").compression_type)
    )
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    # float16 has a 10-bit mantissa: relative rounding error <= 2**-11
    assert torch.allclose(restored, tensor, rtol=2**-11, atol=0)

    restored = deserialize_torch_tensor(
        serialize_torch_tensor(tensor, make_compression("8bit").compression_type)
    )
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    max_err = (restored - tensor).abs().max().item()
    assert max_err <= _bucket_width(tensor), (max_err, _bucket_width(tensor))
    if tensor.numel() > 1000:  # with many samples, ~range/255 is also honest for uniform data
        value_range = (tensor.max() - tensor.min()).item()
        assert max_err <= value_range / 255 * 1.05, (max_err, value_range / 255)


@pytest.mark.unit
def test_8bit_round_trip_bfloat16_and_requires_grad() -> None:
    gen = torch.Generator().manual_seed(7)
    tensor = _uniform(1000, generator=gen).to(torch.bfloat16).requires_grad_()
    restored = deserialize_torch_tensor(
        serialize_torch_tensor(tensor, make_compression("8bit").compression_type)
    )
    assert restored.dtype == torch.bfloat16 and restored.requires_grad
    # + bfloat16 rounding (8-bit mantissa) of the codebook entries, values <= 1
    assert (restored.float() - tensor.float()).abs().max().item() <= _bucket_width(tensor) + 2**-8


# ---------------------------------------------------------------------------------------------------------
# Real averaging between three DecentralizedAveragers over three DHTs on 127.0.0.1.

NUM_PEERS = 3
TENSOR_SHAPES = [(123_457,), (64, 33), (5,)]  # one big tensor -> several parts; sizes are deliberately odd
PART_SIZE_BYTES = 2**16  # small parts so that every tensor size/compression combination gets split


@pytest.fixture(scope="module")
def dhts():
    started: list[hivemind.DHT] = []
    try:
        first = bare_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        started.append(first)
        initial_peers = [str(maddr) for maddr in first.get_visible_maddrs()]
        for _ in range(NUM_PEERS - 1):
            started.append(bare_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers))
        yield started
    finally:
        for dht in reversed(started):
            dht.shutdown()


def _averaging_tolerance(name: str, originals: list[list[torch.Tensor]], index: int) -> float:
    if name == "none":
        return 1e-5  # only float32 summation order
    if name == "fp16":
        # inputs and the returned delta (both |x| <= ~2) are rounded to float16: 2 * 2 * 2**-11, with margin
        return 4e-3
    # 8bit: result = own + Q(mean_j Q(x_j) - Q(own)), so the error is at most
    #   |own - Q(own)| (<= 1 bucket) + |mean_j (Q(x_j) - x_j)| (<= 1 bucket)
    #   + the delta's own quantization error (<= 1 bucket of the delta, whose sigma is ~0.82x the inputs').
    # Measured: ~0.93 bucket widths (~0.0126 for U(-1,1)) on the big tensors.
    return 3 * max(_bucket_width(peer[index]) for peer in originals)


ROUND_DEADLINE_S = 45.0  # matchmaking (30 s) plus the all-reduce (15 s), as the swarm bounds a round
ROUND_ATTEMPTS = 2


def _average_once(
    dhts: list[hivemind.DHT], originals: list[list[torch.Tensor]], name: str
) -> tuple[list[list[torch.Tensor]] | None, str]:
    """One 3-peer round over fresh averagers; the averaged tensors, or None and why the round failed.

    The all-reduce is bounded the way ``swarm.node.peer`` bounds it (``allreduce_timeout`` and
    ``next_chunk_timeout``): without them hivemind waits forever on a part that a loaded machine never delivers,
    which is a transport stall and not what this test is about.
    """
    prefix = f"test_avg_{name}_{uuid.uuid4().hex[:8]}"
    averagers: list[hivemind.DecentralizedAverager] = []
    try:
        for dht, tensors in zip(dhts, originals, strict=True):
            averagers.append(
                hivemind.DecentralizedAverager(
                    [t.clone() for t in tensors],
                    dht,
                    start=True,
                    prefix=prefix,
                    target_group_size=NUM_PEERS,
                    min_group_size=NUM_PEERS,
                    min_matchmaking_time=3.0,
                    request_timeout=2.0,
                    allreduce_timeout=15.0,
                    next_chunk_timeout=5.0,
                    part_size_bytes=PART_SIZE_BYTES,
                    compression=make_compression(name),
                )
            )

        results: list[object] = [None] * NUM_PEERS
        errors: list[BaseException | None] = [None] * NUM_PEERS

        def run_step(i: int) -> None:
            try:
                results[i] = averagers[i].step(timeout=30)
            except BaseException as e:  # noqa: BLE001 - reported in the main thread
                errors[i] = e

        threads = [threading.Thread(target=run_step, args=(i,), daemon=True) for i in range(NUM_PEERS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + ROUND_DEADLINE_S + 10
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            return None, f"a step outlived its {ROUND_DEADLINE_S:.0f} s bound"
        if any(error is not None for error in errors):
            return None, f"errors {errors!r}"
        for i, result in enumerate(results):
            if result is None or len(result) != NUM_PEERS:
                return None, f"peer {i} averaged in a group of {0 if result is None else len(result)}"
        averaged: list[list[torch.Tensor]] = []
        for averager in averagers:
            with averager.get_tensors() as tensors:
                averaged.append([t.clone() for t in tensors])
        return averaged, ""
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", COMPRESSION_NAMES)
def test_real_averaging(dhts: list[hivemind.DHT], name: str) -> None:
    gen = torch.Generator().manual_seed(2024)
    originals = [[_uniform(*shape, generator=gen) for shape in TENSOR_SHAPES] for _ in range(NUM_PEERS)]
    expected = [torch.stack([peer[i] for peer in originals]).mean(0) for i in range(len(TENSOR_SHAPES))]

    # The swarm retries a failed round; so does this test, once, with fresh averagers. Every failure is named.
    failures: list[str] = []
    averaged = None
    for _ in range(ROUND_ATTEMPTS):
        averaged, why = _average_once(dhts, originals, name)
        if averaged is not None:
            break
        failures.append(why)
    assert averaged is not None, f"{name}: no 3-peer round in {ROUND_ATTEMPTS} attempts: {failures}"

    for peer_index, tensors in enumerate(averaged):
        for i, (tensor, target) in enumerate(zip(tensors, expected, strict=True)):
            original = originals[peer_index][i]
            tol = _averaging_tolerance(name, originals, i)
            err = (tensor - target).abs().max().item()
            assert math.isfinite(err) and err <= tol, (
                f"{name}: peer {peer_index} tensor {i} {tuple(tensor.shape)} is off the group mean by "
                f"{err:.3g} > {tol:.3g}"
            )
            # mean of 3 independent U(-1,1) minus one of them has E|.| ~0.38: a tensor that was really
            # averaged moved far more than the tolerance; one that was skipped did not move at all.
            moved = (tensor - original).abs().max().item()
            assert moved > max(3 * tol, 0.1), (
                f"{name}: peer {peer_index} tensor {i} {tuple(tensor.shape)} was not averaged "
                f"(max |change| {moved:.3g})"
            )
