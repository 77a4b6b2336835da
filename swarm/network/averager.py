"""Gradient averaging over hivemind with one guarantee hivemind itself does not give: every member of a group ends
the all-reduce with bit-identical averages.

hivemind's ``AllReduceRunner`` returns *deltas* (``average - my_part``) that each peer adds to its own tensor, so
peers end up one rounding error (or, with compression, one quantization error of their own part) apart, and their
parameters drift. :class:`ExactAllReduceRunner` instead sends each reduced part itself, passed through the same
compression for every receiver (the reducer included), so all members hold the same bytes. A failed part makes
the whole round fail instead of silently keeping the local values.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor
from hivemind.utils.streaming import combine_from_streaming

logger = logging.getLogger(__name__)

RoundKey = tuple[int, str]  # (epoch, state hash) a contribution was computed at


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose outputs are the averaged parts themselves (not deltas), identical on every peer."""

    def __init__(self, *args: Any, bytes_sent: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._bytes_sent = bytes_sent  # a shared counter of payload bytes this peer sends (for benchmarks)
        container = self.tensor_part_container
        container.return_deltas = False
        my_index = self.ordered_peer_ids.index(self.peer_id)
        self._own_part_compression = [
            container.compression.compress(part, info).compression
            for part, info in list(container._input_parts_by_peer[my_index])[:1]
        ]

    def _count_sent(self, count: int) -> None:
        if self._bytes_sent is not None:
            with self._bytes_sent.get_lock():
                self._bytes_sent.value += count

    async def _generate_input_for_peer(self, peer_index: int):
        async for message in super()._generate_input_for_peer(peer_index):
            self._count_sent(len(message.tensor_part.buffer))
            yield message

    def _as_received(self, averaged_part: torch.Tensor) -> torch.Tensor:
        """The value every other peer decodes for a part this peer reduced (the reducer must use it too)."""
        if not self._own_part_compression:
            return averaged_part
        return deserialize_torch_tensor(serialize_torch_tensor(averaged_part, self._own_part_compression[0]))

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            averaged_part = await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, tensor_part, weight=self.weight
            )
            self.tensor_part_container.register_processed_part(
                peer_index, part_index, self._as_received(averaged_part)
            )

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        # same as hivemind 1.1.12 except that the averaged part (not its difference from the input) is sent back
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    break
                serialized = await loop.run_in_executor(
                    None, serialize_torch_tensor, averaged_part, part_compression
                )
                self._count_sent(len(serialized.buffer))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


def round_consensus(keys: Sequence[RoundKey]) -> RoundKey:
    """The (epoch, state hash) shared by most of ``keys``; ties go to the later epoch, then the smaller hash.

    Every peer that sees the same keys picks the same answer, whatever order they arrived in.
    """
    counts = Counter(keys)
    return max(counts, key=lambda key: (counts[key], key[0], _invert(key[1])))


def _invert(text: str) -> tuple[int, ...]:
    return tuple(-ord(char) for char in text)


class SwarmAverager(DecentralizedAverager):
    """Averages this peer's gradient buffers with a group of peers and serves its training state to others.

    Guarantees of :meth:`step` (``gather`` must carry ``epoch`` and ``state_hash``):

    * on success every group member holds the same averaged buffers, weighted by each member's weight;
    * members whose (epoch, state hash) is not the group's :func:`round_consensus` contribute with weight 0,
      so a peer on a stale or diverged state never pollutes the average (it resyncs instead);
    * if any part cannot be reduced, the step raises and the buffers keep their previous values.

    :param gradient_buffers: tensors to average in place (shared memory, same shapes on every peer)
    :param state_provider: returns ``(metadata, tensors)`` of this peer's training state, for peers that download it
    :param kwargs: passed to :class:`hivemind.averaging.DecentralizedAverager`
    """

    def __init__(
        self,
        gradient_buffers: Sequence[torch.Tensor],
        dht,
        *,
        state_provider: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]],
        **kwargs: Any,
    ):
        self._state_provider = state_provider
        self.bytes_sent = mp.Value(ctypes.c_int64, 0)  # payload bytes sent in all-reduce, shared with the host
        super().__init__(gradient_buffers, dht, **kwargs)

    def get_current_state(self):
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        gathered = [self.serializer.loads(self.serializer.loads(blob)[2]) for blob in group_info.gathered]
        keys = [round_key_of(item) for item in gathered]
        mine = keys[group_info.peer_ids.index(self.peer_id)]
        valid = [key for key in keys if key is not None]
        if mine is None or mine != round_consensus(valid):
            kwargs["weight"] = 0.0
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            bytes_sent=self.bytes_sent,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        averaged = [tensor async for tensor in runner]
        failed = runner.tensor_part_container.failed_size
        if failed or len(averaged) != len(tensors):
            raise AllreduceException(f"{failed} of {runner.tensor_part_container.total_size} values were not reduced")
        for tensor, value in zip(tensors, averaged):
            tensor.copy_(value)
        self.last_updated = time.time()

    def set_target_group_size(self, size: int) -> None:
        """Assemble the next group as soon as ``size`` peers joined (instead of waiting the whole matchmaking time)."""
        future = MPFuture()
        self._outer_pipe.send(("_set_target_group_size", [], dict(size=size, future=future)))
        future.result(timeout=30)

    async def _set_target_group_size(self, size: int, future: MPFuture) -> None:
        matchmaking = self._matchmaking
        matchmaking.target_group_size = size
        matchmaking.potential_leaders.target_group_size = size
        matchmaking.group_key_manager.target_group_size = size
        future.set_result(None)

    def download_state(self, peer_id: PeerID, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        """Download the training state of one given peer; None if it does not answer in ``timeout`` seconds."""
        future = MPFuture()
        request = dict(peer_bytes=peer_id.to_bytes(), timeout=timeout, future=future)
        self._outer_pipe.send(("_download_state", [], request))
        try:
            return future.result(timeout=timeout + 5)
        except Exception as error:
            logger.warning(f"Could not download state from {peer_id}: {error!r}")
            return None

    async def _download_state(self, peer_bytes: bytes, timeout: float, future: MPFuture) -> None:
        peer_id = PeerID(peer_bytes)
        try:
            stub = self.get_stub(self._p2p, peer_id, namespace=self.prefix)
            stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()), timeout)
            metadata, tensors, parts = None, [], []
            async for message in aiter_with_timeout(stream, timeout=timeout):
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            future.set_result((metadata, tensors) if isinstance(metadata, dict) else None)
        except Exception as error:
            logger.debug(f"Downloading state from {peer_id} failed: {error!r}")
            if not future.done():
                future.set_result(None)


def round_key_of(gathered: Any) -> RoundKey | None:
    """(epoch, state hash) from a group member's gathered metadata; None if it is malformed."""
    if not isinstance(gathered, dict):
        return None
    epoch, state_hash = gathered.get("epoch"), gathered.get("state_hash")
    if isinstance(epoch, int) and isinstance(state_hash, str):
        return epoch, state_hash
    return None
