"""Gradient averaging over hivemind with one guarantee hivemind itself does not give: every member of a group ends
the all-reduce with bit-identical averages.

hivemind's ``AllReduceRunner`` returns *deltas* (``average - my_part``) that each peer adds to its own tensor, so
peers end up one rounding error (or, with compression, one quantization error of their own part) apart, and their
parameters drift. :class:`ExactAllReduceRunner` instead sends each reduced part itself, passed through the same
compression for every receiver (the reducer included), so all members hold the same bytes. A failed part makes
the whole round fail instead of silently keeping the local values.

On top of that, :class:`SwarmAverager` keeps banned peers out (matchmaking refuses them both ways, and their parts
count as zeros at weight 0 if they still get into a group), can reduce with CenteredClip instead of the mean
(:mod:`swarm.network.robust`), and serves this peer's saved contributions to auditors.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import multiprocessing as mp
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor
from hivemind.utils.streaming import combine_from_streaming

from swarm.network.handlers import add_quiet_handlers
from swarm.network.robust import SwarmPartReducer, check_aggregation
from swarm.network.startup import install_stack_dumps

logger = logging.getLogger(__name__)

RoundKey = tuple[int, str]  # (epoch, state hash) a contribution was computed at
CONTRIBUTION_CHUNK_BYTES = 2**20  # contribution files are streamed in chunks of at most this size
# what a peer serves to auditors (:func:`served_file_name`): an epoch's contribution, and for a strategy of several
# inner steps per epoch (DiLoCo) each step's contribution, the inner state before each step and the epoch's manifest
CONTRIBUTION, STEP, INNER_STATE, MANIFEST = "contribution", "step", "inner", "manifest"
MAX_SERVED_STEP = 1_000_000


def served_file_name(epoch: object, part: object = CONTRIBUTION, step: object = None) -> str:
    """The file name under the contributions folder that holds ``part`` of ``epoch`` (``step``: the inner step, for
    the ``step`` and ``inner`` parts only). The averager serves exactly these names, so a request can never name
    another file. :raises ValueError: for anything else"""
    if type(epoch) is not int or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    if part in (CONTRIBUTION, MANIFEST):
        if step is not None:
            raise ValueError(f"the {part} of an epoch has no step")
        return f"epoch-{epoch}.pt" if part == CONTRIBUTION else f"epoch-{epoch}-manifest.json"
    if part not in (STEP, INNER_STATE):
        raise ValueError(f"no such part {part!r}")
    if type(step) is not int or not 0 <= step <= MAX_SERVED_STEP:
        raise ValueError(f"step must be an int in [0, {MAX_SERVED_STEP}], got {step!r}")
    return f"epoch-{epoch}-{part}-{step}.pt"


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose outputs are the averaged parts themselves (not deltas), identical on every peer.

    The parts this peer reduces go through a :class:`~swarm.network.robust.SwarmPartReducer`: ``aggregation``
    picks the rule, and senders in ``ignored_peer_ids`` count as zeros at weight 0.
    """

    def __init__(
        self,
        *args: Any,
        bytes_sent: Any = None,
        aggregation: str = "mean",
        clip_tau: float = 1.0,
        clip_iterations: int = 20,
        ignored_peer_ids: Iterable[PeerID] = (),
        weight_caps: dict[PeerID, float] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # the weight a sender states in each message is capped by what it declared to the group before data moved
        self._weight_caps = {
            index: (weight_caps or {}).get(peer, math.inf) for index, peer in enumerate(self.sender_peer_ids)
        }
        self._bytes_sent = bytes_sent  # a shared counter of payload bytes this peer sends (for benchmarks)
        ignored_peer_ids = set(ignored_peer_ids)
        self.tensor_part_reducer.finished.set()  # unused; keeps its __del__ from warning about missing parts
        self.tensor_part_reducer = SwarmPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            aggregation=aggregation,
            clip_tau=clip_tau,
            clip_iterations=clip_iterations,
            ignored_senders=[i for i, peer in enumerate(self.sender_peer_ids) if peer in ignored_peer_ids],
        )
        container = self.tensor_part_container
        container.return_deltas = False
        my_index = self.ordered_peer_ids.index(self.peer_id)
        # where the parts this peer reduces start in the flattened gradient (parts are consecutive runs of it)
        self.span_offset = sum(
            len(part) for index in range(my_index) for part, _ in container._input_parts_by_peer[index]
        )
        self.received: dict[
            int, list[torch.Tensor]
        ] = {}  # sender index -> the parts it sent, as decoded here
        self._own_part_compression = [
            container.compression.compress(part, info).compression
            for part, info in list(container._input_parts_by_peer[my_index])[:1]
        ]

    def received_spans(self) -> dict[PeerID, list[torch.Tensor]]:
        """What each other sender sent for the parts this peer reduced, part by part as decoded here (consecutive
        slices of its flattened gradient starting at :attr:`span_offset`); only senders whose every part arrived."""
        parts = len(self.parts_for_local_averaging)
        return {
            self.sender_peer_ids[index]: [part.reshape(-1) for part in received]
            for index, received in self.received.items()
            if len(received) == parts and parts > 0
        }

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
                sender_index,
                part_index,
                tensor_part,
                weight=min(self.weight, self._weight_caps[sender_index]),
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
                lambda msg: (
                    deserialize_torch_tensor(msg.tensor_part),
                    min(msg.weight, self._weight_caps[sender_index]),
                    msg.tensor_part.compression,
                ),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                self.received.setdefault(sender_index, []).append(tensor_part)
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


def weighted_consensus(
    keys: Mapping[str, RoundKey | None], weight: Callable[[str], float]
) -> RoundKey | None:
    """The (epoch, state hash) that members of the most total ``weight`` announce (peer id -> key); ties as
    :func:`round_consensus`. None when no member with weight announced a key. Members of weight 0 — identities
    nobody vouches for — cannot move it, however many they are."""
    totals: dict[RoundKey, float] = {}
    for peer_id, key in keys.items():
        if key is not None and (member_weight := weight(peer_id)) > 0:
            totals[key] = totals.get(key, 0.0) + member_weight
    if not totals:
        return None
    return max(totals, key=lambda key: (totals[key], key[0], _invert(key[1])))


def _invert(text: str) -> tuple[int, ...]:
    return tuple(-ord(char) for char in text)


class BanAwareMatchmaking(Matchmaking):
    """hivemind's matchmaking that never asks a banned peer to lead its group.

    hivemind builds its ``Matchmaking`` inside the averager process; :class:`SwarmAverager` turns that instance into
    this class as it is assigned (the class only adds behaviour, no state). ``is_banned`` is set at the same time.
    """

    is_banned: Callable[[PeerID], bool] = staticmethod(lambda peer_id: False)

    async def _request_join_group(self, leader: PeerID):
        # also covers leaders suggested by a disbanding leader: hivemind calls this method again for them
        if self.is_banned(leader):
            logger.debug(f"Not asking banned peer {leader} to lead our group")
            return None
        return await super()._request_join_group(leader)


def _tolerate_larger_groups(manager: Any) -> None:
    """hivemind 1.1.12's ``GroupKeyManager.update_key_on_group_assembled`` draws ``target_group_size`` buckets for the
    group's members and raises ``ValueError: Sample larger than population`` (failing a round that succeeded, with
    a traceback) when a leader assembled more members than this peer's target — which happens whenever peers count
    different peers as expected (newcomers without weight). The swarm sets the group bits itself every round, so
    the update is skipped for such a group."""
    update = manager.update_key_on_group_assembled

    async def update_key_on_group_assembled(group_info: GroupInfo) -> None:
        if manager.target_group_size is not None and group_info.group_size > manager.target_group_size:
            return
        await update(group_info)

    manager.update_key_on_group_assembled = update_key_on_group_assembled


class SwarmAverager(DecentralizedAverager):
    """Averages this peer's gradient buffers with a group of peers and serves its training state to others.

    Guarantees of :meth:`step` (``gather`` must carry ``epoch`` and ``state_hash``):

    * on success every group member holds the same averaged buffers, weighted by each member's weight;
    * members whose (epoch, state hash) is not the group's consensus contribute with weight 0, so a peer on a
      stale or diverged state never pollutes the average (it resyncs instead); the consensus is the key the most
      member weight announces (:func:`weighted_consensus`, :meth:`set_member_weights`; one each by default);
    * if any part cannot be reduced, the step raises and the buffers keep their previous values;
    * banned peers (:meth:`set_banned`) are refused as followers and never asked to lead; if one is nevertheless
      in the group (a third peer that does not ban it led the group), the parts this peer reduces count its input
      as zeros at weight 0. The round still runs, so members stay bit-identical; the slices that other members
      reduce follow *their* ban lists, and the slice the banned peer reduces is whatever it sends (as for any
      reducer);
    * with ``aggregation="centered_clip"`` each part is reduced with :func:`swarm.network.robust.centered_clip`
      instead of the weighted mean (every member still receives the same bytes).

    :param gradient_buffers: tensors to average in place (shared memory, same shapes on every peer)
    :param state_provider: returns ``(metadata, tensors)`` of this peer's training state, for peers that download it
    :param aggregation: ``"mean"`` (weighted mean) or ``"centered_clip"`` (robust to a minority of outliers)
    :param clip_tau: CenteredClip radius, in L2 norm of one averaged part (``part_size_bytes`` decides part sizes)
    :param clip_iterations: CenteredClip iterations per part
    :param max_weight: the largest weight any member's input counts with; a member's weight is also capped by the
      ``samples`` it declared in its gathered metadata (0 when it declared none)
    :param keep_received_epochs: keep, for this many epochs, what every other member sent for the parts this peer
      reduced (:meth:`received_span`), so that an auditor can check a sent gradient against a committed one
    :param contributions_dir: folder of ``epoch-{N}.pt`` files served by :meth:`rpc_download_contribution`
      (written atomically by the host process; None serves nothing)
    :param kwargs: passed to :class:`hivemind.averaging.DecentralizedAverager`
    """

    # hivemind caches RPC handlers per class but inherits the cache: keep ours separate from the parent's
    _rpc_handlers = None
    _stub_type = None

    def __init__(
        self,
        gradient_buffers: Sequence[torch.Tensor],
        dht,
        *,
        state_provider: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]],
        aggregation: str = "mean",
        clip_tau: float = 1.0,
        clip_iterations: int = 20,
        contributions_dir: str | Path | None = None,
        keep_received_epochs: int = 0,
        max_weight: float = math.inf,
        **kwargs: Any,
    ):
        check_aggregation(aggregation, clip_tau, clip_iterations)
        self._state_provider = state_provider
        self.aggregation, self.clip_tau, self.clip_iterations = aggregation, clip_tau, clip_iterations
        self.contributions_dir = None if contributions_dir is None else Path(contributions_dir)
        # base58 peer ids; the averager process holds the live set
        self._banned_peers: frozenset[str] = frozenset()
        # the only peers matchmaking groups with (base58 ids); None: anyone not banned
        self._admitted: frozenset[str] | None = None
        self._member_weights: dict[str, float] | None = None  # None: members count as identities
        self.keep_received_epochs = keep_received_epochs
        self.max_weight = max_weight
        self._weight_caps: dict[PeerID, float] = {}
        self._received: dict[
            int, tuple[int, dict[str, list[torch.Tensor]]]
        ] = {}  # epoch -> (offset, sender -> parts)
        self._round_epoch: int | None = None
        # payload bytes sent in all-reduce, shared with the host
        self.bytes_sent = mp.Value(ctypes.c_int64, 0)
        super().__init__(gradient_buffers, dht, **kwargs)

    def run(self) -> None:
        install_stack_dumps()  # printed if this start stalls (swarm.network.startup.await_ready)
        super().run()

    async def add_p2p_handlers(self, p2p, wrapper=None, *, namespace=None, balanced: bool = False) -> None:
        """hivemind's registration, with handlers that refuse junk streams in one log line per (kind, source peer)
        and no traceback (:mod:`swarm.network.handlers`); honest calls are served exactly as by hivemind."""
        self.network_input_log = await add_quiet_handlers(
            self,
            p2p,
            wrapper,
            namespace=namespace,
            balanced=balanced,
            log=getattr(self, "network_input_log", None),
        )

    # ---- bans -------------------------------------------------------------------------------------------------
    @property
    def _matchmaking(self) -> BanAwareMatchmaking:
        try:
            return self.__dict__["_swarm_matchmaking"]
        except KeyError:
            raise AttributeError("_matchmaking exists only in the running averager process") from None

    @_matchmaking.setter
    def _matchmaking(self, matchmaking: Matchmaking) -> None:
        # hivemind assigns its Matchmaking in the averager process (in _run_internal); this is the seam to extend it
        if type(matchmaking) is Matchmaking:
            matchmaking.__class__ = BanAwareMatchmaking
        matchmaking.is_banned = self._refuses_in_matchmaking
        _tolerate_larger_groups(matchmaking.group_key_manager)
        self.__dict__["_swarm_matchmaking"] = matchmaking

    def _is_banned(self, peer_id: PeerID) -> bool:
        return str(peer_id) in self._banned_peers

    def _refuses_in_matchmaking(self, peer_id: PeerID) -> bool:
        """Whether matchmaking keeps ``peer_id`` out (both ways): banned peers, and peers not admitted to the next
        round (:meth:`set_admitted`)."""
        return self._is_banned(peer_id) or (self._admitted is not None and str(peer_id) not in self._admitted)

    def _member_weight(self, peer_id: str) -> float:
        """A group member's say in the group's consensus: 1 each until :meth:`set_member_weights`; then the weight
        given, this peer itself at least 1, others not given 0."""
        if self._member_weights is None:
            return 1.0
        weight = self._member_weights.get(peer_id, 0.0)
        return max(1.0, weight) if peer_id == str(self.peer_id) else weight

    def set_member_weights(self, weights: Mapping[str, float]) -> None:
        """The weight of each peer (base58 id) in the next groups' consensus (see :func:`weighted_consensus`);
        the training process computes the same consensus from the same weights after the round."""
        clean = {
            str(peer): float(weight)
            for peer, weight in weights.items()
            if math.isfinite(weight) and weight > 0
        }
        future = MPFuture()
        self._outer_pipe.send(("_set_member_weights", [], dict(weights=clean, future=future)))
        future.result(timeout=30)

    async def _set_member_weights(self, weights: dict[str, float], future: MPFuture) -> None:
        self._member_weights = weights
        future.set_result(None)

    def set_banned(self, peer_ids: Iterable[str]) -> None:
        """Replace the set of banned peers (base58 peer ids); takes effect for the next join request or group."""
        banned = frozenset(str(peer_id) for peer_id in peer_ids)
        future = MPFuture()
        self._outer_pipe.send(("_set_banned", [], dict(banned=banned, future=future)))
        future.result(timeout=30)
        self._banned_peers = banned  # a host-side copy, for inspection only

    async def _set_banned(self, banned: frozenset[str], future: MPFuture) -> None:
        self._banned_peers = banned
        future.set_result(None)

    def set_admitted(self, peer_ids: Iterable[str] | None) -> None:
        """The only peers (base58 ids) the next groups may hold besides this one, as leader and as follower; None:
        anyone not banned. A round's group has a target size: a peer nobody expected in it (its status says another
        epoch) must not take the place of one that was expected and leave it out of the round."""
        admitted = None if peer_ids is None else frozenset(str(peer_id) for peer_id in peer_ids)
        future = MPFuture()
        self._outer_pipe.send(("_set_admitted", [], dict(admitted=admitted, future=future)))
        future.result(timeout=30)

    async def _set_admitted(self, admitted: frozenset[str] | None, future: MPFuture) -> None:
        self._admitted = admitted
        future.set_result(None)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:
        """Refuse a banned peer (hivemind's follower treats any code but ACCEPTED as a rejection), else hivemind's."""
        if self._refuses_in_matchmaking(context.remote_id):
            logger.debug(f"Refused a join request from banned or unexpected peer {context.remote_id}")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    # ---- averaging --------------------------------------------------------------------------------------------
    def get_current_state(self):
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        gathered = [self.serializer.loads(self.serializer.loads(blob)[2]) for blob in group_info.gathered]
        keys = {str(peer): round_key_of(item) for peer, item in zip(group_info.peer_ids, gathered)}
        mine = keys[str(self.peer_id)]
        self._round_epoch = None if mine is None else mine[0]
        self._weight_caps = {
            peer: _declared_weight(item, self.max_weight) for peer, item in zip(group_info.peer_ids, gathered)
        }
        if mine is None or mine != weighted_consensus(keys, self._member_weight):
            kwargs["weight"] = 0.0
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        banned = [peer_id for peer_id in group_info.peer_ids if self._is_banned(peer_id)]
        if banned:
            logger.warning(
                f"Banned peers {[str(peer) for peer in banned]} are in our group: their input is dropped"
            )
        runner = ExactAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            bytes_sent=self.bytes_sent,
            aggregation=self.aggregation,
            clip_tau=self.clip_tau,
            clip_iterations=self.clip_iterations,
            ignored_peer_ids=banned,
            weight_caps=self._weight_caps,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        averaged = [tensor async for tensor in runner]
        failed = runner.tensor_part_container.failed_size
        if failed or len(averaged) != len(tensors):
            raise AllreduceException(
                f"{failed} of {runner.tensor_part_container.total_size} values were not reduced"
            )
        for tensor, value in zip(tensors, averaged):
            tensor.copy_(value)
        self.last_updated = time.time()
        if self.keep_received_epochs > 0 and self._round_epoch is not None:
            epoch = self._round_epoch
            spans = {str(peer): span for peer, span in runner.received_spans().items()}
            self._received[epoch] = (runner.span_offset, spans)
            for old in [e for e in self._received if e <= epoch - self.keep_received_epochs]:
                del self._received[old]

    async def _shutdown(self, timeout: float | None) -> None:
        """Cancel the rounds in flight and stop serving. hivemind 1.1.12's own version calls ``finalize`` on the
        futures of those rounds instead of on their runners (and gathers its None result), so a shutdown mid-round
        crashed the averager thread with an AttributeError and left the round to the hard-terminate path."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for future in self._running_groups.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            else:
                future.cancel()

    def received_span(self, epoch: int, peer_id: str) -> tuple[int, list[torch.Tensor]] | None:
        """(offset, parts): what ``peer_id`` sent this peer in the all-reduce of ``epoch`` for the parts this peer
        reduced — consecutive slices of its flattened gradient from ``offset``, as decoded after compression. None
        if this peer kept nothing for it (it reduced no part, the round failed, or it is older than
        ``keep_received_epochs``)."""
        future = MPFuture()
        self._outer_pipe.send(("_received_span", [], dict(epoch=epoch, peer_id=peer_id, future=future)))
        return future.result(timeout=30)

    async def _received_span(self, epoch: int, peer_id: str, future: MPFuture) -> None:
        offset, spans = self._received.get(epoch, (0, {}))
        span = spans.get(peer_id)
        future.set_result(None if span is None else (offset, [part.clone() for part in span]))

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

    # ---- state ------------------------------------------------------------------------------------------------
    def download_state(
        self, peer_id: PeerID, timeout: float
    ) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
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

        async def download() -> tuple[dict[str, Any], list[torch.Tensor]] | None:
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
            return (metadata, tensors) if isinstance(metadata, dict) else None

        try:
            # the caller stops waiting after timeout + 5 s: so does the download (a holder trickling one message
            # per timeout would otherwise keep it running, and growing, for ever)
            result = await asyncio.wait_for(download(), timeout + 5)
            if not future.done():
                future.set_result(result)
        except Exception as error:
            logger.debug(f"Downloading state from {peer_id} failed: {error!r}")
            if not future.done():
                future.set_result(None)

    # ---- contributions ----------------------------------------------------------------------------------------
    # hivemind has no generic message for this, so both directions reuse ``averaging_pb2.DownloadData``: the request's
    # ``metadata`` is the averager serializer's (msgpack) encoding of ``{"epoch": int}`` (a DiLoCo epoch's parts:
    # plus ``"part"`` and ``"step"``, see :func:`served_file_name`), and each response carries one chunk of the file
    # (at most CONTRIBUTION_CHUNK_BYTES) in ``metadata``. An empty stream means "not found".

    def _contribution_path(self, serialized_request: bytes) -> Path | None:
        """The file a request asks for, or None if the request is malformed or nothing is served for it."""
        if self.contributions_dir is None:
            return None
        try:
            request = self.serializer.loads(serialized_request)
        except Exception:
            return None
        if not isinstance(request, dict):
            return None
        try:
            name = served_file_name(
                request.get("epoch"), request.get("part", CONTRIBUTION), request.get("step")
            )
        except ValueError:
            return None
        return self.contributions_dir / name

    async def rpc_download_contribution(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.DownloadData]:
        """Stream the requested file of ``contributions_dir`` (:func:`served_file_name`) in chunks of at most 1 MiB;
        nothing if it does not exist.

        The file is read from one open handle, so a file the host replaces atomically meanwhile is served whole
        (the old version). Malformed requests get an empty stream and never raise.
        """
        path = self._contribution_path(request.metadata)
        if path is None:
            logger.debug(f"Malformed or unserved contribution request from {context.remote_id}")
            return
        loop = asyncio.get_running_loop()
        try:
            file = await loop.run_in_executor(None, open, path, "rb")
        except OSError:
            logger.debug(f"{context.remote_id} asked for missing contribution {path.name}")
            return
        try:
            while chunk := await loop.run_in_executor(None, file.read, CONTRIBUTION_CHUNK_BYTES):
                yield averaging_pb2.DownloadData(metadata=chunk)
        finally:
            file.close()

    def download_contribution(
        self,
        peer_id: str,
        epoch: int,
        timeout: float,
        max_bytes: int,
        part: str = CONTRIBUTION,
        step: int | None = None,
    ) -> bytes | None:
        """The bytes of another peer's saved contribution for ``epoch`` (or another ``part`` of a DiLoCo epoch:
        :func:`served_file_name`).

        :param peer_id: the serving peer (base58)
        :param timeout: seconds for the whole download
        :param max_bytes: give up (and return None) as soon as more than this many bytes arrived
        :returns: the file's bytes; None if the peer does not answer in time, fails, has no such file, or the file
          is larger than ``max_bytes`` (at most ``max_bytes`` plus one chunk is ever held in memory)
        :raises ValueError: for an epoch, part or step no peer serves
        """
        served_file_name(epoch, part, step)
        future = MPFuture()
        query = (
            dict(epoch=epoch)
            if part == CONTRIBUTION and step is None
            else dict(epoch=epoch, part=part, step=step)
        )
        request = dict(
            peer_bytes=PeerID.from_base58(peer_id).to_bytes(),
            query=query,
            timeout=timeout,
            max_bytes=max_bytes,
            future=future,
        )
        self._outer_pipe.send(("_download_contribution", [], request))
        try:
            return future.result(timeout=timeout + 5)
        except Exception as error:
            logger.warning(f"Could not download the {part} of {peer_id} for epoch {epoch}: {error!r}")
            return None

    async def _download_contribution(
        self, peer_bytes: bytes, query: dict, timeout: float, max_bytes: int, future: MPFuture
    ) -> None:
        peer_id = PeerID(peer_bytes)
        try:
            result = await asyncio.wait_for(self._fetch_contribution(peer_id, query, max_bytes), timeout)
        except Exception as error:
            logger.debug(f"Downloading {query} from {peer_id} failed: {error!r}")
            result = None
        if not future.done():
            future.set_result(result)

    async def _fetch_contribution(self, peer_id: PeerID, query: dict, max_bytes: int) -> bytes | None:
        stub = self.get_stub(self._p2p, peer_id, namespace=self.prefix)
        request = averaging_pb2.DownloadData(metadata=self.serializer.dumps(query))
        stream = await stub.rpc_download_contribution(request)
        chunks, size = [], 0
        try:
            async for message in stream:
                size += len(message.metadata)
                if size > max_bytes:
                    logger.debug(f"{query} of {peer_id} exceeds {max_bytes} bytes")
                    return None
                chunks.append(message.metadata)
        finally:
            try:
                await stream.aclose()
            except (
                RuntimeError
            ) as error:  # as in hivemind's matchmaking: closing a finished stream may complain
                logger.debug(repr(error))
        return b"".join(chunks) if size else None


def quiet_interrupted_steps() -> None:
    """Stop hivemind from printing a traceback when a peer is interrupted in the middle of ``averager.step``.

    hivemind 1.1.12's ``step`` creates a ``StepControl`` and waits for the averager process to attach it; a Ctrl+C
    during that wait leaves it unattached, and its ``__del__`` then fails an assertion that Python prints as
    "Exception ignored in ...". Only that case is silenced; every other unraisable exception is reported as before.
    """
    default_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, AssertionError) and "attached trigger" in str(
            unraisable.exc_value
        ):
            logger.debug("an averaging step was interrupted before it started")
            return
        default_hook(unraisable)

    sys.unraisablehook = hook


def _declared_weight(gathered: Any, max_weight: float) -> float:
    """The weight a member declared to its group (``samples`` in its gathered metadata), capped; 0 if malformed."""
    samples = gathered.get("samples") if isinstance(gathered, dict) else None
    if (
        isinstance(samples, bool)
        or not isinstance(samples, int | float)
        or not math.isfinite(samples)
        or samples < 0
    ):
        return 0.0
    return float(min(samples, max_weight))


def round_key_of(gathered: Any) -> RoundKey | None:
    """(epoch, state hash) from a group member's gathered metadata; None if it is malformed."""
    if not isinstance(gathered, dict):
        return None
    epoch, state_hash = gathered.get("epoch"), gathered.get("state_hash")
    if isinstance(epoch, int) and isinstance(state_hash, str):
        return epoch, state_hash
    return None
