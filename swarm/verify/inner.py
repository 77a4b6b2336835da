"""The inner steps of a DiLoCo epoch, committed before the round and audited after it (docs/design.md §2.2).

A DiLoCo peer's epoch e is n inner steps (n ≤ ``diloco.inner_steps``). It starts from S_0 = (θ_e, a fresh inner
optimizer): the swarm's state. Step k computes the contribution C_k at θ_{e,k} — on the rows and sampling seed of
the key e·H + k, exactly as a sync epoch computes one — and applies its gradient: S_{k+1} = AdamW(S_k, clip(g_k)),
where S_k is θ_{e,k} with the inner optimizer's statistics (:class:`~swarm.node.state.TrainingState`). The peer sends
the pseudo-gradient P = θ_e − θ_{e,n}.

**What it commits**, before the round, in one :class:`~swarm.network.records.Commitment` (:func:`epoch_commitment`):
a :class:`Manifest` with one :class:`StepLeaf` per step (the hash of S_k and C_k's own commitment fields) and the
hash of θ_{e,n}; the Merkle root over them (``steps_root``, :func:`swarm.ledger.merkle.merkle_root`); n; totals over
the steps; and the hash of P. It serves the manifest, every C_k, every S_k with 0 < k < n and θ_{e,n}.

**An audit of step k** (the round's beacon picks k after the round, :func:`audited_steps`) checks, each against the
commitment: the manifest's root; that S_0 is the swarm's state (:func:`start_state_hash`); the served S_k;
the replay of C_k from S_k (the checks of a sync contribution); that S_{k+1} follows from S_k by the optimizer
step (:func:`inner_step_error`); and that P = θ_e − θ_{e,n} (:func:`pseudo_gradient`). So a peer that cheats in
one of its n steps is caught by an audit of that step, and one that sends anything but the outcome of its committed
steps by any audit.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm.ledger.merkle import merkle_root
from swarm.network.averager import MAX_SERVED_STEP
from swarm.network.records import Commitment
from swarm.node.state import TrainingState, tensors_hash

HEX64 = r"^[0-9a-f]{64}$"


class MalformedInnerPart(ValueError):
    """Bytes served as a manifest or an inner state that are not one."""


class StepLeaf(BaseModel):
    """One inner step as committed: the hash of the inner state it started from (S_k), and its contribution's own
    commitment fields (:func:`swarm.verify.commitment.make_commitment` at the key of the step)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    step: int = Field(ge=0, le=MAX_SERVED_STEP)
    inner_hash: str = Field(pattern=HEX64)
    state_hash: str = Field(max_length=128)
    data_seed: str = Field(max_length=128)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    rollouts_hash: str = Field(max_length=128)
    gradient_hash: str = Field(max_length=128)

    @classmethod
    def of(cls, step: int, inner_hash: str, committed: Commitment) -> StepLeaf:
        """The leaf of step ``step`` from the commitment its contribution would have as a sync contribution."""
        fields = committed.model_dump(
            include={"state_hash", "data_seed", "samples", "tokens", "rollouts_hash", "gradient_hash"}
        )
        return cls(step=step, inner_hash=inner_hash, **fields)

    def commitment(self, peer_id: str, key: int, precision: str) -> Commitment:
        """The sync commitment the step's contribution (computed at ``key``) must match."""
        return Commitment(
            peer_id=peer_id,
            epoch=key,
            state_hash=self.state_hash,
            data_seed=self.data_seed,
            samples=self.samples,
            tokens=self.tokens,
            rollouts_hash=self.rollouts_hash,
            gradient_hash=self.gradient_hash,
            precision=precision,
        )


class Manifest(BaseModel):
    """The leaves of a DiLoCo epoch: its steps in order, then the hash of the parameters it ended with (θ_{e,n})."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    epoch: int = Field(ge=0)
    steps: list[StepLeaf] = Field(min_length=1, max_length=MAX_SERVED_STEP)
    final_hash: str = Field(pattern=HEX64)

    def leaves(self) -> list[bytes]:
        """Canonical JSON of each leaf: ``["step", epoch, {leaf}]`` per step, then ``["final", epoch, n, hash]``."""
        encode = lambda value: json.dumps(value, sort_keys=True, separators=(",", ":")).encode()  # noqa: E731
        return [encode(["step", self.epoch, leaf.model_dump()]) for leaf in self.steps] + [
            encode(["final", self.epoch, len(self.steps), self.final_hash])
        ]

    def root(self) -> str:
        return merkle_root(self.leaves())

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes, epoch: int) -> Manifest:
        """Parse a served manifest of ``epoch``. :raises MalformedInnerPart: naming what is wrong"""
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as error:
            raise MalformedInnerPart(f"not a manifest ({error.error_count()} errors)") from None
        if manifest.epoch != epoch or [leaf.step for leaf in manifest.steps] != list(
            range(len(manifest.steps))
        ):
            raise MalformedInnerPart("the manifest is not of this epoch, or its steps are not 0..n-1")
        return manifest


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def epoch_commitment(
    peer_id: str, manifest: Manifest, pseudo_gradient_hash: str, precision: str
) -> Commitment:
    """The commitment of a DiLoCo epoch: its start state, totals over its steps, the pseudo-gradient's hash, the
    step count and the manifest's root. An auditor rebuilds it from the served manifest to check both agree."""
    steps = manifest.steps
    return Commitment(
        peer_id=peer_id,
        epoch=manifest.epoch,
        state_hash=steps[0].state_hash,
        data_seed=_digest([leaf.data_seed for leaf in steps]),
        samples=sum(leaf.samples for leaf in steps),
        tokens=sum(leaf.tokens for leaf in steps),
        rollouts_hash=_digest([leaf.rollouts_hash for leaf in steps]),
        gradient_hash=pseudo_gradient_hash,
        precision=precision,
        inner_steps=len(steps),
        steps_root=manifest.root(),
    )


def step_key(epoch: int, step: int, inner_steps: int) -> int:
    """The key of inner step ``step`` of ``epoch``: what its rows and sampling seed are drawn for (H = the
    configured ``inner_steps``, so keys of different epochs never collide)."""
    return epoch * inner_steps + step


def audited_steps(beacon: str, audited: str, count: int, picked: int | None) -> list[int]:
    """The inner steps of ``audited``'s contribution that its auditors replay: ``picked`` of its ``count`` steps
    (all of them when None or larger), drawn from the round's beacon — the same on every member, unknown to the
    peer until its contribution is committed and sent."""
    draw = lambda step: hashlib.sha256(f"{beacon}|step|{audited}|{step}".encode()).digest()  # noqa: E731
    order = sorted(range(count), key=draw)
    return sorted(order[: count if picked is None else min(picked, count)])


# ---- inner states -------------------------------------------------------------------------------------------------
def inner_state_bytes(metadata: dict[str, Any], tensors: list[torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"metadata": metadata, "tensors": [tensor.detach().cpu() for tensor in tensors]}, buffer)
    return buffer.getvalue()


def load_inner_state(data: bytes, step: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Parse a served inner state of ``step``: (metadata, tensors) for :meth:`TrainingState.load`, which checks
    values, shapes and the hash. :raises MalformedInnerPart: naming what is wrong"""
    try:
        with warnings.catch_warnings():  # untrusted bytes may claim any pickle protocol
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise MalformedInnerPart(f"not an inner state ({type(error).__name__})") from None
    if not (isinstance(payload, dict) and set(payload) == {"metadata", "tensors"}):
        raise MalformedInnerPart("not an inner state (no metadata and tensors)")
    metadata, tensors = payload["metadata"], payload["tensors"]
    if not (isinstance(metadata, dict) and isinstance(tensors, list)):
        raise MalformedInnerPart("the inner state's metadata or tensors are malformed")
    if not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        raise MalformedInnerPart("the inner state holds something other than tensors")
    if metadata.get("epoch") != step or not isinstance(metadata.get("state_hash"), str):
        raise MalformedInnerPart(f"the inner state is not that of step {step}")
    return metadata, tensors


def final_snapshot(params: list[torch.Tensor], steps: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """θ_{e,n} as a snapshot without optimizer statistics (what the final leaf hashes and the peer serves)."""
    tensors = [param.detach().to("cpu", copy=True) for param in params]
    return dict(epoch=steps, state_hash=tensors_hash(steps, tensors), layout=[]), tensors


def start_state_hash(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """The hash of S_0 = (``model``'s parameters, no optimizer statistics): what leaf 0 must hold."""
    optimizer.state.clear()
    return TrainingState(model, optimizer).state_hash(0)


def optimizer_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    gradient: list[torch.Tensor],
    max_grad_norm: float,
) -> None:
    """One inner step: ``gradient`` clipped to ``max_grad_norm`` (0: no clipping), applied by ``optimizer``. The
    peer's step and the auditor's check of it run this same code."""
    for param, grad in zip(params, gradient):
        param.grad = grad.to(param.device, param.dtype)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def inner_step_error(
    before: list[torch.Tensor], replayed: list[torch.Tensor], served: list[torch.Tensor], params: int
) -> float:
    """How far the served next state is from the replayed one: the relative L2 error of the parameters' update
    (served − before against replayed − before; the parameters themselves would hide a small change) and of each
    statistic, the larger. inf when the layouts differ."""
    if len(replayed) != len(served) or any(a.shape != b.shape for a, b in zip(replayed, served)):
        return math.inf

    def relative(claimed: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
        diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(claimed, expected))
        norm = sum(float(b.double().pow(2).sum()) for b in expected)
        if norm == 0.0:
            return 0.0 if diff == 0.0 else math.inf
        return math.sqrt(diff / norm)

    update = relative(
        [s.double() - b.double() for s, b in zip(served[:params], before)],
        [r.double() - b.double() for r, b in zip(replayed[:params], before)],
    )
    return max([update] + [relative([s], [r]) for s, r in zip(served[params:], replayed[params:])])


def pseudo_gradient(start: list[torch.Tensor], end: list[torch.Tensor]) -> list[torch.Tensor]:
    """θ_e − θ_{e,n} in fp32 on the CPU: what a DiLoCo peer sends, computed the same way by the peer and by its
    auditors (an exactly rounded subtraction, so bit-identical on every machine)."""
    return [
        outer.detach().to("cpu", torch.float32) - inner.detach().to("cpu", torch.float32)
        for outer, inner in zip(start, end)
    ]
