"""How one averaged part is reduced from the senders' parts: the weighted mean or CenteredClip.

:class:`SwarmPartReducer` replaces hivemind's ``TensorPartReducer`` inside
:class:`swarm.network.averager.ExactAllReduceRunner`. Each peer reduces its own slice of the vector once, and
every group member receives the same result, so the choice of rule never breaks bit-identical averages.

Whatever the rule, a sender whose input cannot be trusted counts as a zero part at weight 0 (no influence at
all): a sender this peer bans, a part with a wrong shape or non-finite values, a weight that is negative or not
finite. The reducer never raises on such input (raising inside hivemind's reducer deadlocks the round).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Sequence

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

AGGREGATIONS = ("mean", "centered_clip")


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, tau: float, iterations: int) -> torch.Tensor:
    """CenteredClip (Karimireddy, He and Jaggi, 2021) of ``parts`` (one row per sender), weighted by ``weights``.

    Starting from the weighted mean ``v``, repeats ``iterations`` times::

        v <- v + sum_i w_i * (x_i - v) * min(1, tau / ||x_i - v||) / sum_i w_i

    A sender whose part lies farther than ``tau`` (L2 norm) from the centre moves it by at most
    ``tau * w_i / sum(w)`` per iteration, so at the fixed point ``k`` outliers out of ``n`` can shift the result
    from the mean of the others by at most about ``tau * w_outliers / w_others``. With ``tau = inf`` this is the
    weighted mean. Senders with weight 0 have no influence at all.

    :param parts: tensor of shape ``[num_senders, *part_shape]``, all finite
    :param weights: non-negative weights of shape ``[num_senders]``
    :param tau: clipping radius (L2 norm of one whole part), > 0
    :param iterations: number of clipping iterations (0 returns the weighted mean)
    :returns: a tensor of shape ``part_shape``; zeros if the total weight is 0
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    weights = weights.to(parts.dtype)
    total = weights.sum()
    if total.item() <= 0:
        return torch.zeros(parts.shape[1:], dtype=parts.dtype)
    flat = parts.reshape(len(parts), -1)
    norm_weights = weights / total
    center = norm_weights @ flat
    for _ in range(iterations):
        diffs = flat - center
        distances = diffs.norm(dim=1)
        # a distance of 0 needs no clipping
        scales = torch.clamp(tau / distances, max=1.0).nan_to_num(nan=1.0)
        step = (norm_weights * scales) @ diffs
        if not step.any():
            break
        center = center + step
    return center.reshape(parts.shape[1:])


class SwarmPartReducer(TensorPartReducer):
    """hivemind's ``TensorPartReducer`` with a pluggable rule and untrusted senders counted as zeros at weight 0.

    Guarantees, for every part index:

    * the result is computed once, after every sender that has not failed delivered its part, and the same tensor
      is returned to every awaiting sender (so every group member receives the same bytes);
    * ``"mean"`` gives the same result as hivemind's reducer on trusted input; ``"centered_clip"`` gives
      :func:`centered_clip` of the parts (it keeps all parts of the current index in memory until they arrived);
    * a sender in ``ignored_senders``, or whose part or weight is malformed, has no influence on the result;
    * if the total weight of a part is 0 the result is zeros (hivemind's reducer would return NaN).

    :param part_shapes: shapes of the parts this peer reduces, in order
    :param num_senders: number of peers that send parts (non-auxiliary members of the group)
    :param aggregation: ``"mean"`` or ``"centered_clip"``
    :param clip_tau: CenteredClip radius (L2 norm of one part)
    :param clip_iterations: CenteredClip iterations
    :param ignored_senders: sender indices whose parts count as zeros at weight 0 (e.g. banned peers)
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        *,
        aggregation: str = "mean",
        clip_tau: float = 1.0,
        clip_iterations: int = 20,
        ignored_senders: Collection[int] = (),
    ):
        check_aggregation(aggregation, clip_tau, clip_iterations)
        self.aggregation, self.clip_tau, self.clip_iterations = aggregation, clip_tau, clip_iterations
        self.ignored_senders = frozenset(ignored_senders)
        self._received: list[
            tuple[torch.Tensor, float]
        ] = []  # parts of the current index (centered_clip only)
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._received = []
        super().reset_accumulators()

    def _admit(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float):
        """The (part, weight) that enters the reduction: zeros at weight 0 for anything untrusted."""
        shape = self.part_shapes[part_index]
        trusted = (
            sender_index not in self.ignored_senders
            and isinstance(weight, int | float)
            and math.isfinite(weight)
            and weight >= 0
            and tuple(tensor_part.shape) == tuple(shape)
            and bool(torch.isfinite(tensor_part).all())
        )
        if not trusted:
            return torch.zeros(shape), 0.0
        return tensor_part, float(weight)

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Add one sender's part, wait until every live sender's part of this index arrived, return the result.

        Same protocol as hivemind 1.1.12's ``TensorPartReducer.accumulate_part`` (order of parts, failed senders,
        :class:`BannedException`); only what is added differs.
        """
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1

        while part_index > self.current_part_index:
            await _wait_first(self.current_part_future, self.finished)
            if self.finished.is_set():
                raise AllreduceException(
                    f"attempted to aggregate part in a finalized {self.__class__.__name__}"
                )

        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index

        current_part_future = self.current_part_future
        tensor_part, weight = self._admit(sender_index, part_index, tensor_part, weight)
        if self.aggregation == "centered_clip":
            self._received.append((tensor_part, weight))
        else:
            self.accumulator.add_(tensor_part, alpha=weight)
        self.current_part_accumulated_from += 1
        self.denominator += weight
        self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result(self._reduce_current_part())
            self.reset_accumulators()

    def _reduce_current_part(self) -> torch.Tensor:
        shape = self.part_shapes[self.current_part_index]
        if self.denominator <= 0:
            return torch.zeros(shape)
        if self.aggregation == "mean":
            return self.accumulator.div_(self.denominator)
        parts = torch.stack([part.to(torch.float32) for part, _ in self._received])
        weights = torch.tensor([weight for _, weight in self._received], dtype=torch.float32)
        return centered_clip(parts, weights, self.clip_tau, self.clip_iterations)


def check_aggregation(aggregation: str, clip_tau: float, clip_iterations: int) -> None:
    """:raises ValueError: if the aggregation rule or its knobs are invalid"""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not clip_tau > 0:
        raise ValueError(f"clip_tau must be positive, got {clip_tau}")
    if clip_iterations < 0:
        raise ValueError(f"clip_iterations must be >= 0, got {clip_iterations}")


async def _wait_first(future: asyncio.Future, event: asyncio.Event) -> None:
    """Wait until ``future`` is done or ``event`` is set (and, unlike hivemind, do not leave the waiter task behind)."""
    waiter = asyncio.create_task(event.wait())
    try:
        await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
