"""The attack suite: cheating peers, for the offline benchmark (bench/verification.py), the tests and live demos.

An :class:`Attack` changes a peer's GRPO step at four seams, used the same way offline
(:func:`cheating_contribution`) and live, where :class:`swarm.training.pipeline.CheatingPipeline` wraps them around
the honest contribution pipeline (compute → commit → send, and announce):

1. :meth:`Attack.compute_rows` — the rows it really computes on (default: the assigned ones);
2. :meth:`Attack.reward_funcs` — the reward functions it scores with (default: the honest ones);
3. :meth:`Attack.autocast_dtype` — a lower precision it computes in (default: none, the declared precision);
4. :meth:`Attack.sampler` — what samples its completions (default: the seeded sampler of swarm/sampling.py);
   TRL scores whatever it returns and backpropagates on it, so rewards, advantages and gradient are consistent
   with the completions and only the sampling check can tell;
5. :meth:`Attack.tamper` — what it commits, serves to auditors *and* sends into averaging; it always claims the
   assigned rows (``context.rows``). A cheater that commits one thing and sends another is caught by the separate
   binding check of the commitment, not by the replay, so every attack here is self-consistent on that point.

Two more seams exist only live (:data:`LIVE_ATTACKS`): :meth:`Attack.sent`, what goes into the all-reduce, and
:meth:`Attack.deceive`, what the peer announces in its status and serves to peers that download its state.

Every attack in :data:`ATTACKS` is caught by a replay of the contribution against the assigned rows
(:func:`swarm.verify.replay.replay_gradient` with the tolerance of the declared precision class) with the verdict
in its ``expected`` attribute, under these conditions, which the suite relies on and states per attack:

* the honest gradient is not zero (GRPO gives a zero gradient when every group's rewards are all equal; then the
  multiplicative attacks — ``free_rider``, ``tiny``, ``scaled_*``, ``sign_flip``, ``alie`` — send what an honest
  peer would and cannot be told apart, nor do they do harm);
* ``partial_batch`` needs at least two assigned rows; ``wrong_data`` needs unassigned rows whose prompts differ
  from the assigned ones (a regenerated row can collide by chance on small datasets);
* ``lower_precision`` is caught only where the honest computation really runs in the declared fp32: TRL's
  ``GRPOConfig`` defaults to ``bf16=True`` (mixed precision, also on CPU), which ``replay.grpo_config`` turns off
  for a declared "fp32" (``GRPOSettings.precision``).

Guarantees of :meth:`Attack.tamper` for every attack here: the result claims ``context.rows`` and the state hash
of the contribution it was given, and its gradient has the shapes and parameter names of that contribution.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from swarm.node.state import param_checksum, tensors_hash
from swarm.recipe import Recipe
from swarm.sampling import Sampler, SampleRequest, generate_request
from swarm.verify.replay import (
    Contribution,
    GradientRecorder,
    GRPOSettings,
    Verdict,
    contribution_from_record,
    keeps_forward,
    make_recording_trainer,
)

__all__ = [
    "ATTACKS",
    "LIVE_ATTACKS",
    "Attack",
    "AttackContext",
    "cheating_contribution",
    "make_attack",
]


@dataclass
class AttackContext:
    """What a cheating peer knows when it makes its contribution of one epoch."""

    rows: list[dict[str, Any]]  # the rows assigned to this peer for this epoch
    # rows NOT assigned to it (e.g. another seed), same count
    unassigned_rows: Callable[[], list[dict[str, Any]]]
    previous: Contribution | None  # this peer's own contribution of the previous epoch
    other: Callable[[], Contribution | None]  # another peer's contribution of this epoch (may return None)
    generator: torch.Generator  # randomness for the attack
    tokenizer: Any = None  # the peer's tokenizer (sampling attacks encode the completions they choose)
    recipe: Recipe | None = None  # the run's recipe (its reference answers)


class Attack:
    """An honest peer: every seam is the identity. Subclasses change one or more of them.

    :cvar name: the registry name (:data:`ATTACKS`)
    :cvar declared_precision: the precision class the peer declares (the auditor's tolerance follows it)
    :cvar expected: the verdict a replay against the assigned rows gives (``Verdict.PASS`` for the honest base)
    """

    name: ClassVar[str] = "honest"
    declared_precision: ClassVar[str] = "fp32"
    expected: ClassVar[Verdict] = Verdict.PASS

    def compute_rows(self, context: AttackContext) -> list[dict[str, Any]]:
        """The rows the cheater actually computes on."""
        return context.rows

    def reward_funcs(self, honest: list[Any]) -> list[Any]:
        """The reward functions the cheater scores with, given the honest ones (same order, same names)."""
        return honest

    def autocast_dtype(self) -> torch.dtype | None:
        """A lower precision the cheater computes in (under ``torch.autocast``); None: the declared one."""
        return None

    def sampler(self, honest: Sampler, context: AttackContext) -> Sampler:
        """What samples the cheater's completions, given the honest seeded sampler."""
        return honest

    def tamper(self, contribution: Contribution, context: AttackContext) -> Contribution:
        """What the cheater commits, serves and sends into averaging, given what it computed."""
        return contribution

    def deceive(self, peer: Any) -> None:
        """Change what the peer (a :class:`~swarm.node.peer.SwarmPeer`, before it starts) announces in its
        status and serves to peers that download its state. Default: nothing."""

    def sent(self, gradient: list[torch.Tensor], context: AttackContext) -> list[torch.Tensor]:
        """What it really sends into averaging, given the gradient it committed to (default: that gradient)."""
        return gradient

    def audit_verdict(
        self, kind: str, error: float | None, evidence: dict[str, Any]
    ) -> tuple[str, float | None, dict[str, Any]]:
        """What it publishes as an auditor, given the verdict its honest replay reached (default: that verdict)."""
        return kind, error, evidence

    def pseudo_gradient(self, honest: list[torch.Tensor]) -> list[torch.Tensor]:
        """What a DiLoCo cheater commits to and sends as its pseudo-gradient, given θ_e − θ_{e,n} of its inner
        steps (default: that)."""
        return honest

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _claiming(contribution: Contribution, context: AttackContext, **changes: Any) -> Contribution:
    """``contribution`` with ``changes``, claiming the assigned rows."""
    return contribution.with_changes(rows=[dict(row) for row in context.rows], **changes)


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


class _GradientAttack(Attack):
    """Computes honestly, then sends ``change(gradient)``: caught as ``gradient_mismatch``."""

    expected: ClassVar[Verdict] = Verdict.GRADIENT_MISMATCH

    def change(self, gradient: list[torch.Tensor], context: AttackContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def tamper(self, contribution: Contribution, context: AttackContext) -> Contribution:
        return _claiming(contribution, context, gradient=self.change(list(contribution.gradient), context))


class FreeRider(_GradientAttack):
    """Sends a zero gradient (relative error 1)."""

    name = "free_rider"

    def change(self, gradient, context):
        return [torch.zeros_like(g) for g in gradient]


class _Scaled(_GradientAttack):
    factor: ClassVar[float] = 1.0

    def change(self, gradient, context):
        return [g * self.factor for g in gradient]


class Tiny(_Scaled):
    """Sends the gradient x 1e-3 (relative error ~1): barely moves the average, still earns credit if unaudited."""

    name = "tiny"
    factor = 1e-3


class ScaledUp(_Scaled):
    """Sends the gradient x 2 (relative error 1): outweighs the honest peers."""

    name = "scaled_up"
    factor = 2.0


class ScaledDown(_Scaled):
    """Sends the gradient x 0.5 (relative error 0.5)."""

    name = "scaled_down"
    factor = 0.5


class SignFlip(_Scaled):
    """Sends minus the gradient (relative error 2): gradient ascent."""

    name = "sign_flip"
    factor = -1.0


class RandomDirection(_GradientAttack):
    """Sends a random Gaussian direction with the honest norm (relative error ~sqrt(2))."""

    name = "random"

    def change(self, gradient, context):
        noise = [
            torch.randn(g.shape, generator=context.generator, dtype=torch.float32).to(g) for g in gradient
        ]
        scale = _norm(gradient) / max(_norm(noise), 1e-30)
        return [n * scale for n in noise]


class Stale(_GradientAttack):
    """Sends its previous epoch's gradient (computed at the previous state) with this epoch's rollouts; zeros when
    it has no previous contribution. Saves nothing here (it computes to get rollouts), but models a peer whose
    gradient lags one step (relative error measured ~1 on the tiny model)."""

    name = "stale"

    def change(self, gradient, context):
        previous = context.previous
        if previous is None or [g.shape for g in previous.gradient] != [g.shape for g in gradient]:
            return [torch.zeros_like(g) for g in gradient]
        return [p.detach().clone().to(g) for p, g in zip(previous.gradient, gradient)]


class PartialBatch(Attack):
    """Computes on the first half of the assigned rows and claims all of them (it keeps its half of the rollouts):
    caught as ``wrong_data`` (the rollouts' prompts are not the assigned rows). Needs >= 2 assigned rows."""

    name = "partial_batch"
    expected = Verdict.WRONG_DATA

    def compute_rows(self, context):
        return context.rows[: max(1, len(context.rows) // 2)]

    def tamper(self, contribution, context):
        return _claiming(contribution, context)


class Copy(Attack):
    """Sends another peer's contribution of this epoch (its rollouts, rewards, advantages, order and gradient) as
    its own, claiming its own rows and the current state; falls back to its own previous contribution when there is
    no other one, and to a zero gradient on its own rollouts when there is neither. Caught as ``wrong_data`` (the
    rollouts are not the assigned rows) — or ``gradient_mismatch`` in the last fallback."""

    name = "copy"
    expected = Verdict.WRONG_DATA

    def tamper(self, contribution, context):
        source = context.other() or context.previous
        if source is None:
            return _claiming(
                contribution, context, gradient=[torch.zeros_like(g) for g in contribution.gradient]
            )
        return replace(
            source,
            state_hash=contribution.state_hash,
            rows=[dict(row) for row in context.rows],
            param_names=list(contribution.param_names),
            gradient=[g.detach().clone() for g in source.gradient],
        )


class WrongData(Attack):
    """Computes on rows it was not assigned (e.g. chosen to steer the model) and claims the assigned ones: caught
    as ``wrong_data``."""

    name = "wrong_data"
    expected = Verdict.WRONG_DATA

    def compute_rows(self, context):
        return context.unassigned_rows()

    def tamper(self, contribution, context):
        return _claiming(contribution, context)


class _ForgedRewardFunc:
    """A reward function with the honest one's name that returns rewards the completions did not earn.

    ``opposite``: 1 - r (reverses the ranking, so GRPO's gradient pushes towards the worst completions), and r + 1
    where 1 - r == r (r = 0.5): every non-None reward differs from the earned one. ``random``: uniform in [0, 1)
    (differs with probability 1). None ("not applicable") stays None."""

    def __init__(self, honest: Callable[..., list[float | None]], mode: str, generator: torch.Generator):
        self.honest = honest
        self.mode = mode
        self.generator = generator
        self.__name__ = getattr(honest, "__name__", type(honest).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        earned = self.honest(*args, **kwargs)
        forged: list[float | None] = []
        for reward in earned:
            if reward is None:
                forged.append(None)
            elif self.mode == "random":
                forged.append(float(torch.rand((), generator=self.generator)))
            else:
                opposite = 1.0 - float(reward)
                forged.append(opposite if opposite != float(reward) else float(reward) + 1.0)
        return forged


class ForgedRewards(Attack):
    """Scores with reward functions that return rewards the completions did not earn (see
    :class:`_ForgedRewardFunc`), so its advantages and gradient follow the forged rewards: caught as
    ``forged_rewards``. Reward models (``torch.nn.Module``) and hub ids are left as they are; at least one reward
    function must be a plain function.

    :param mode: ``"opposite"`` (default) or ``"random"``
    """

    name = "forged_rewards"
    expected = Verdict.FORGED_REWARDS

    def __init__(self, mode: str = "opposite", seed: int = 0):
        if mode not in ("opposite", "random"):
            raise ValueError(f"forged_rewards mode must be 'opposite' or 'random', got {mode!r}")
        self.mode = mode
        self.generator = torch.Generator().manual_seed(seed)

    def reward_funcs(self, honest):
        forged = [
            _ForgedRewardFunc(func, self.mode, self.generator)
            if callable(func) and not isinstance(func, torch.nn.Module)
            else func
            for func in honest
        ]
        if not any(isinstance(func, _ForgedRewardFunc) for func in forged):
            raise ValueError("forged_rewards needs at least one reward function that is a plain function")
        return forged


class ForgedAdvantages(_GradientAttack):
    """Keeps the honest rewards but claims negated advantages, with the gradient that goes with them (GRPO's loss
    is linear in the advantages at the on-policy point with no KL term, so that gradient is minus the honest one):
    caught as ``forged_advantages``, a check ``forged_rewards`` never reaches. Added to the suite because a peer can
    steer through the advantages alone."""

    name = "forged_advantages"
    expected = Verdict.FORGED_ADVANTAGES

    def change(self, gradient, context):
        return [-g for g in gradient]

    def tamper(self, contribution, context):
        forged = super().tamper(contribution, context)
        return forged.with_changes(advantages=-contribution.advantages)


class LowerPrecision(Attack):
    """Computes under ``torch.autocast`` in bfloat16 while declaring fp32 (cheaper on hardware with fast bf16):
    caught as ``gradient_mismatch`` (~5e-3 relative error measured on the tiny model vs. ~0 for honest fp32).
    Only where the honest fp32 computation is really fp32 (see the module docstring)."""

    name = "lower_precision"
    expected = Verdict.GRADIENT_MISMATCH

    def autocast_dtype(self):
        return torch.bfloat16


class Alie(_GradientAttack):
    """ "A Little Is Enough" (Baruch et al., 2019): adds z * sigma to every coordinate, in one direction drawn once
    and kept for every epoch (so the bias accumulates across steps), sigma estimated per tensor from the gradient's
    own magnitude (its RMS). z is set so that the shift is ``fraction`` of the gradient's norm (default 7.5%):
    small enough to pass a robust aggregator, far above the fp32 tolerance, so caught as ``gradient_mismatch``
    (relative error = ``fraction``)."""

    name = "alie"

    def __init__(self, fraction: float = 0.075):
        if not 0 < fraction:
            raise ValueError(f"alie fraction must be positive, got {fraction}")
        self.fraction = fraction
        self.direction: list[torch.Tensor] | None = None
        self.last_z: float | None = None

    def change(self, gradient, context):
        shapes = [g.shape for g in gradient]
        if self.direction is None or [d.shape for d in self.direction] != shapes:
            self.direction = [
                torch.randint(0, 2, g.shape, generator=context.generator).float() * 2 - 1 for g in gradient
            ]
        sigma = [float(g.double().pow(2).mean().sqrt()) if g.numel() else 0.0 for g in gradient]
        unit = math.sqrt(sum(s * s * g.numel() for s, g in zip(sigma, gradient)))  # norm of sigma * direction
        z = self.fraction * _norm(gradient) / unit if unit > 0 else 0.0
        self.last_z = z
        return [g + (z * s) * d.to(g) for g, s, d in zip(gradient, sigma, self.direction)]


class TruncatedBackward(_GradientAttack):
    """Stops backpropagation half-way: sends zeros for the first half of the parameter tensors (embeddings and the
    first layers, which a lazy peer never reaches), saving part of the backward pass. docs/design.md §2.2 names "one block
    zeroed" among the mildest useful attacks; this is its compute-saving form. Caught as ``gradient_mismatch``."""

    name = "truncated_backward"

    def change(self, gradient, context):
        cut = max(1, len(gradient) // 2)
        return [torch.zeros_like(g) if index < cut else g for index, g in enumerate(gradient)]


class SendMismatch(Attack):
    """Commits to and serves its honest contribution, but sends the gradient sign-flipped into averaging: every
    replay passes, so only the binding check catches it — an auditor compares the slice of the gradient it reduced
    in the all-reduce with the same slice of the committed one (``sent_mismatch``). Live only: offline there is no
    all-reduce, so :func:`cheating_contribution` makes an honest contribution for it."""

    name = "send_mismatch"
    expected = Verdict.PASS  # what a replay says; the live verdict is sent_mismatch

    def sent(self, gradient, context):
        return [-g for g in gradient]


class ForgedPseudoGradient(Attack):
    """DiLoCo only: takes and commits its inner steps honestly, but commits to and sends a pseudo-gradient of its
    own — its honest one scaled by ``factor`` (default 3: a peer that wants its steps to weigh more). Every inner
    step replays fine; an audit of any step catches it (``pseudo_gradient_mismatch``: the commitment is not
    θ_e − θ_{e,n} of the committed steps). Live only."""

    name = "forged_pseudo_gradient"
    expected = Verdict.PASS  # its inner contributions replay fine

    def __init__(self, factor: float = 3.0):
        self.factor = factor

    def pseudo_gradient(self, honest):
        return [tensor * self.factor for tensor in honest]


class EpochInflation(Attack):
    """Not a contribution attack (what it commits, serves to auditors and sends is honest): it announces an epoch
    ``lead`` epochs ahead of its own and serves a state of its own making to anyone who downloads it — its
    parameters scrambled, with a hash that matches, so a hash check alone accepts it. Peers that followed the
    highest announced epoch would load it. Defeated by catching up only to the state most live peers announce
    (:meth:`SwarmPeer.swarm_target`) and loading only an announced state (:meth:`SwarmPeer.download_state`); with
    one other peer only, nothing tells the liar apart. Live only."""

    name = "epoch_inflation"
    expected = Verdict.PASS  # its contributions replay fine

    def __init__(self, lead: int = 1_000_000):
        self.lead = lead

    def deceive(self, peer: Any) -> None:
        lead = self.lead

        def served(metadata: dict[str, Any], tensors: list[torch.Tensor]):
            epoch = metadata["epoch"] + lead
            scrambled = [
                torch.full_like(tensor, 1e3) if tensor.is_floating_point() else tensor for tensor in tensors
            ]
            return dict(metadata, epoch=epoch, state_hash=tensors_hash(epoch, scrambled)), scrambled

        def announced(status):
            metadata, _ = peer.snapshot()  # the forged state: what it announces is what it serves
            return status.model_copy(update=dict(epoch=metadata["epoch"], state_hash=metadata["state_hash"]))

        peer.filter_announcements(status=announced, served=served)


class FalseAccuser(Attack):
    """Trains honestly and lies only as an auditor: it fails every contribution it audits or re-checks, with
    evidence of its own making (a replayed-gradient hash and a position that are not what a replay gives). Several
    of them in one swarm are colluders. Defeated by counting only the verdicts the protocol called for and weighing
    the re-check panel (:meth:`swarm.verify.auditor.Verifier._decide`); a refuted accuser is banned and slashed.
    Live only."""

    name = "false_accuser"
    expected = Verdict.PASS  # its own contributions replay fine

    def audit_verdict(
        self, kind: str, error: float | None, evidence: dict[str, Any]
    ) -> tuple[str, float | None, dict[str, Any]]:
        forged = hashlib.sha256(repr((kind, error)).encode()).hexdigest()
        return Verdict.GRADIENT_MISMATCH.value, 0.5, dict(replayed_hash=forged, worst_index=0)


class SmallNoise(_GradientAttack):
    """Adds Gaussian noise of ``fraction`` (default 1%) of the gradient's norm: about the size of the bf16 vs fp32
    difference, the smallest perturbation of the suite. Caught as ``gradient_mismatch`` when declaring fp32; it
    would pass a tolerance class looser than ``fraction`` — which is what declaring a lower precision buys."""

    name = "small_noise"

    def __init__(self, fraction: float = 1e-2):
        self.fraction = fraction

    def change(self, gradient, context):
        noise = [
            torch.randn(g.shape, generator=context.generator, dtype=torch.float32).to(g) for g in gradient
        ]
        scale = self.fraction * _norm(gradient) / max(_norm(noise), 1e-30)
        return [g + n * scale for g, n in zip(gradient, noise)]


# ---- sampling attacks: completions the seeded sampler did not draw from the committed state ------------------------
def _reference(context: AttackContext, row: dict[str, Any]) -> str:
    """The recipe's reference answer of ``row`` (what a fabricating peer claims it sampled), or "0"."""
    reference = context.recipe.warm_start_completion if context.recipe is not None else None
    try:
        answer = reference(dict(row)) if reference is not None else None
    except Exception:
        answer = None
    return answer if isinstance(answer, str) and answer else "0"


def _ending(ids: list[int], request: SampleRequest) -> list[int]:
    """``ids`` cut to the maximum length, ending with a stop token (what a sampler could return)."""
    return [*list(ids)[: request.max_new_tokens - 1], request.stop_ids[0]]


def _encode(context: AttackContext, text: str) -> list[int]:
    return list(context.tokenizer(text, add_special_tokens=False)["input_ids"])


class _SamplingAttack(Attack):
    """Chooses its completions instead of sampling them (or samples them otherwise than declared); TRL scores and
    backpropagates on them honestly, so only the sampling check catches it: ``forged_completions``."""

    expected: ClassVar[Verdict] = Verdict.FORGED_COMPLETIONS

    def sampler(self, honest, context):
        return lambda request: self.complete(request, honest, context)

    def complete(self, request: SampleRequest, honest: Sampler, context: AttackContext) -> list[list[int]]:
        raise NotImplementedError


class FabricatedCompletions(_SamplingAttack):
    """Skips generation and submits the reference answer of every prompt as each of its completions (the dominant
    cost of a GRPO step saved; full reward, zero advantages)."""

    name = "fabricated_completions"

    def complete(self, request, honest, context):
        return [
            _ending(_encode(context, _reference(context, context.rows[row])), request)
            for _, row, _ in request.element_keys
        ]


class PayloadCompletions(_SamplingAttack):
    """Poisoning: chooses completions that earn the reward *and* carry a pattern the swarm did not ask for (the
    payload, then the reference answer), so that the shared model learns to emit the payload."""

    name = "payload"
    payload: ClassVar[str] = "7+7="

    def complete(self, request, honest, context):
        return [
            _ending(_encode(context, self.payload + _reference(context, context.rows[row])), request)
            for _, row, _ in request.element_keys
        ]


def _borrowed(
    source: Contribution | None, request: SampleRequest, honest: Sampler, context: AttackContext
) -> list[list[int]]:
    """``source``'s completions in its order (cycled), or fabricated ones when there is no source."""
    if source is None or not source.completion_token_ids:
        return FabricatedCompletions().complete(request, honest, context)
    pool = source.completion_token_ids
    return [list(pool[index % len(pool)]) for index in range(len(request.prompts))]


class ReusedCompletions(_SamplingAttack):
    """Re-submits its completions of the previous epoch (no generation); fabricates them when it has none."""

    name = "reused_completions"

    def complete(self, request, honest, context):
        return _borrowed(context.previous, request, honest, context)


class CopiedCompletions(_SamplingAttack):
    """Submits another peer's completions of this epoch as its own (falls back to its previous ones, then to
    fabricated ones)."""

    name = "copied_completions"

    def complete(self, request, honest, context):
        return _borrowed(context.other() or context.previous, request, honest, context)


class OtherTemperature(_SamplingAttack):
    """Samples with the seeded sampler at a quarter of the declared temperature (greedier: more reward, less
    exploration) and claims the declared one."""

    name = "other_temperature"

    def complete(self, request, honest, context):
        params = replace(request.params, temperature=request.params.temperature / 4)
        return honest(replace(request, params=params))


class OtherModel(_SamplingAttack):
    """Samples from another model than the committed state — every weight moved by half its tensor's RMS (a stale,
    privately fine-tuned or cheaper model) — with the seeded sampler and the declared settings. Caught wherever the
    other model's completions differ from the committed state's: a model so close that every token is the same
    produced the honest completions (at 5 % of the RMS the tiny benchmark model's tokens did not change)."""

    name = "other_model"
    fraction: ClassVar[float] = 0.5

    def complete(self, request, honest, context):
        # the weights are moved in place for the generation and put back exactly afterwards (a copy of the model
        # would carry TRL's fused-LM-head forward, bound to the original)
        params = [param for param in request.model.parameters() if param.is_floating_point()]
        saved = [param.detach().clone() for param in params]
        try:
            with torch.no_grad():
                for param in params:
                    noise = torch.randn(param.shape, generator=context.generator, dtype=torch.float32).to(
                        param
                    )
                    param.add_(noise * (self.fraction * float(param.detach().double().pow(2).mean().sqrt())))
            return honest(request)
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value)


class Overlong(_SamplingAttack):
    """Samples honestly, then goes on after each completion's end: one more token after its stop token, or past
    the maximum length."""

    name = "overlong"

    def complete(self, request, honest, context):
        return [[*ids, ids[-1]] for ids in honest(request)]


class StopPadding(_SamplingAttack):
    """Samples only half of its rows and pads the other half with bare stop tokens (zero advantage, no
    generation), claiming the full weight."""

    name = "stop_padding"

    def complete(self, request, honest, context):
        rows = sorted({row for _, row, _ in request.element_keys})
        padded = set(rows[: max(1, len(rows) // 2)])
        keep = [index for index, (_, row, _) in enumerate(request.element_keys) if row not in padded]
        sampled: dict[int, list[int]] = {}
        if keep:
            subset = replace(
                request,
                prompts=[request.prompts[index] for index in keep],
                element_keys=[request.element_keys[index] for index in keep],
            )
            sampled = dict(zip(keep, honest(subset)))
        return [sampled.get(index, [request.stop_ids[0]]) for index in range(len(request.prompts))]


SAMPLING_ATTACKS: tuple[type[Attack], ...] = (
    FabricatedCompletions,
    PayloadCompletions,
    ReusedCompletions,
    CopiedCompletions,
    OtherTemperature,
    OtherModel,
    Overlong,
    StopPadding,
)


ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (
        FreeRider,
        Tiny,
        RandomDirection,
        SignFlip,
        ScaledUp,
        ScaledDown,
        Stale,
        PartialBatch,
        Copy,
        WrongData,
        ForgedRewards,
        LowerPrecision,
        Alie,
        ForgedAdvantages,
        TruncatedBackward,
        SmallNoise,
        *SAMPLING_ATTACKS,
    )
}


# attacks only a live swarm can show (they cheat in the all-reduce or in catch-up, which an offline replay does not see)
LIVE_ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (SendMismatch, EpochInflation, FalseAccuser, ForgedPseudoGradient)
}


def make_attack(name: str) -> Attack:
    """A fresh attack by registry name (:data:`ATTACKS` or :data:`LIVE_ATTACKS`; default options).
    :raises ValueError: naming the known attacks"""
    known = {**ATTACKS, **LIVE_ATTACKS}
    try:
        cls = known[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(known))}") from None
    return cls()


@contextlib.contextmanager
def _autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=dtype):
        yield


def cheating_contribution(
    attack: Attack,
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    context: AttackContext,
    settings: GRPOSettings,
    optimizer: torch.optim.Optimizer | None = None,
) -> Contribution:
    """Make ``attack``'s contribution the way the swarm trainer does live: a real TRL GRPO step on
    ``attack.compute_rows(context)``, scored by ``attack.reward_funcs(recipe.checked_reward_funcs())``, under
    ``attack.autocast_dtype()``, recorded, then ``attack.tamper``-ed. The model is left unchanged unless
    ``optimizer`` is given (it is stepped with the computed, untampered gradient)."""
    context = replace(context, tokenizer=context.tokenizer or tokenizer, recipe=context.recipe or recipe)
    rows = attack.compute_rows(context) or context.rows
    reward_funcs = attack.reward_funcs(recipe.checked_reward_funcs())
    state_hash = param_checksum(model)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    recorder = GradientRecorder(named, optimizer)
    with tempfile.TemporaryDirectory() as scratch, keeps_forward(model):
        trainer = make_recording_trainer(
            model,
            tokenizer,
            recipe,
            rows,
            settings,
            recorder,
            scratch,
            reward_funcs=reward_funcs,
            sampler=attack.sampler(generate_request, context),
        )
        with _autocast(model, attack.autocast_dtype()):
            trainer.train()
    contribution = contribution_from_record(trainer, recorder, state_hash, rows, settings)
    return attack.tamper(contribution, context)
