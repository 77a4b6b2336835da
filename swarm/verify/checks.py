"""Verification as a list of checks: each looks at one claim of an audited contribution and either lets it pass
(None) or fails it with one :class:`Verdict`. The first failing check decides; a contribution that passes them
all is ``pass``. Adding a check is adding one class to :data:`AUDIT_CHECKS` (or :data:`REPLAY_CHECKS`).

Two lists, because two callers judge contributions:

* :data:`REPLAY_CHECKS` — what an offline replay can tell from the contribution and the model alone (the state it
  claims, its data, rewards, advantages and gradient): :func:`swarm.verify.replay.replay_gradient`, the
  :class:`~swarm.verify.replay.Replayer`, tests and ``bench/verification.py``;
* :data:`AUDIT_CHECKS` — what a live auditor checks first from the round (the contribution is the committed one,
  the weight it declared, what it sent, its settings, the shared rollouts it used), then the replay checks.

The audit *protocol* — who audits what, re-checks, takeovers, bans, false accusations — is
:class:`swarm.verify.auditor.Verifier`, which builds an :class:`AuditCase` and runs the list.

The replay itself (one TRL step on the committed rollouts from the committed state, through
:mod:`swarm.trl_adapter`) runs at most once per case, when the first check that needs it asks
(:meth:`ReplayCase.replayed`).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from swarm.network.records import Commitment
from swarm.node.state import param_checksum, tensors_hash
from swarm.sampling import SAMPLER, check_positions, completion_logits, pad, position_keys
from swarm.trl_adapter import GradientRecorder, GRPOSettings, RolloutMismatch, TrainerRecord
from swarm.verify.commitment import commitment_mismatch
from swarm.verify.contribution import Contribution


class Verdict(enum.StrEnum):
    """Every verdict an audit can reach (its value is what a published :class:`AuditVerdict` carries)."""

    PASS = "pass"
    # the auditor could not get what it needed (yet): see TRANSIENT_FAILURES
    UNAVAILABLE = "unavailable"  # the audited peer did not serve its contribution in time
    MISSING_COMMITMENT = "missing_commitment"  # no commitment of the audited peer with the round's digest
    # the contribution is at fault
    MALFORMED = "malformed"  # what was served cannot be read, or breaks the replay
    COMMITMENT_MISMATCH = "commitment_mismatch"  # what was served is not what was committed
    # it declared more samples to its group (its averaging weight) than it committed
    WRONG_WEIGHT = "wrong_weight"
    SENT_MISMATCH = "sent_mismatch"  # what it sent into averaging is not the gradient it committed to
    WRONG_SETTINGS = "wrong_settings"  # computed with other GRPO settings than the swarm's
    WRONG_STATE = "wrong_state"  # the auditor's model is not the state the contribution claims
    # the rollouts' prompts are not the assigned rows (or the rollouts are malformed)
    WRONG_DATA = "wrong_data"
    # a completion is not what the seeded sampler draws from the committed state (chosen, copied, re-used, sampled
    # with other settings or from another model, or longer than allowed / continued after its stop token)
    FORGED_COMPLETIONS = "forged_completions"
    FORGED_REWARDS = "forged_rewards"  # the claimed rewards are not what the recipe's reward functions give
    FORGED_ADVANTAGES = "forged_advantages"  # the claimed advantages do not follow from the rewards
    GRADIENT_MISMATCH = "gradient_mismatch"  # the claimed gradient is not the gradient of those rollouts
    # a DiLoCo epoch (swarm/verify/inner.py): the next inner state does not follow from the audited step's by the
    # optimizer step, or the pseudo-gradient sent is not θ_e − θ_{e,n} of the committed steps
    INNER_STEP_MISMATCH = "inner_step_mismatch"
    PSEUDO_GRADIENT_MISMATCH = "pseudo_gradient_mismatch"


# failures that say the auditor could not get what it needed (yet), not that the contribution is wrong: they
# neither decide this peer's own view nor make their auditor a false accuser
TRANSIENT_FAILURES = frozenset({Verdict.UNAVAILABLE, Verdict.MISSING_COMMITMENT})

REWARD_TOLERANCE = 1e-6  # absolute, per reward: reward functions are deterministic Python
# absolute, per completion: same rewards give the same advantages up to float rounding
ADVANTAGE_TOLERANCE = 1e-5
# relative L2 for a replay with the peer's micro-batch split and order; honest fp32 replays measure 0..1e-6
# per declared precision class. bench/verification.py measures (CPU, tiny model): replays in the same class are
# bitwise exact (error 0) whatever the thread count; across classes bf16 -> fp32 differs by <= 5.9e-3 and
# fp16 -> fp32 by <= 7.5e-4, which bounds what other hardware and kernels may add; the mildest attacks are >= 3.7e-3
# (lower_precision, caught only when fp32 is declared) and 1e-2 (small_noise, which a bf16 declaration lets pass)
GRADIENT_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-3}
OTHER_SPLIT_TOLERANCE = 1e-2  # fp32 replay with another micro-batch split: honest ones measure ~2e-3
# relative L2 over the auditor's slice; same codec on both sides: honest peers measure ~0
SENT_TOLERANCE = 1e-3
# the sampling check's tie margin per precision class, relative to the largest logit of the position (at least 1):
# how far the auditor's logits (teacher-forced) may be from those the peer sampled with (KV-cached, under its
# autocast); check_sampled applies the wider of the peer's declared class and the auditor's own. bench/verification.py
# measures the largest honest difference (CPU, tiny model, 2e5 tokens over 7 generation/check class pairs): fp32
# 5.5e-7, bf16 generation or check 6.0e-3..7.8e-3, fp16 6.8e-4..9.8e-4 — at most 0.2 of each margin. GPU kernels
# are unmeasured.
SAMPLING_MARGIN = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-3}


# ---- comparisons ----------------------------------------------------------------------------------------------------
def relative_error(claimed: Sequence[torch.Tensor], replayed: Sequence[torch.Tensor]) -> float:
    """||claimed - replayed|| / ||replayed|| over all tensors (float64); inf when shapes differ."""
    if len(claimed) != len(replayed) or any(a.shape != b.shape for a, b in zip(claimed, replayed)):
        return math.inf
    diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(claimed, replayed))
    norm = sum(float(b.double().pow(2).sum()) for b in replayed)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / norm)


def max_abs_diff(claimed: torch.Tensor, replayed: torch.Tensor) -> float:
    """Largest absolute difference; NaN (a reward of None) only matches NaN. inf when shapes differ."""
    if claimed.shape != replayed.shape:
        return math.inf
    claimed, replayed = claimed.double(), replayed.double()
    if not torch.equal(torch.isnan(claimed), torch.isnan(replayed)):
        return math.inf
    both = ~torch.isnan(replayed)
    return float((claimed[both] - replayed[both]).abs().max()) if both.any() else 0.0


def gradient_evidence(
    epoch: int, committed: list[torch.Tensor], replayed: list[torch.Tensor]
) -> dict[str, Any]:
    """What an auditor's verdict carries as evidence: the hash of the gradient it replayed, and the flat index
    where that gradient differs most from the committed one (0 when they are equal or their sizes differ)."""
    flat_replayed = torch.cat([t.reshape(-1).float() for t in replayed]) if replayed else torch.zeros(0)
    flat_committed = torch.cat([t.reshape(-1).float() for t in committed]) if committed else torch.zeros(0)
    worst = 0
    if flat_replayed.numel() and flat_replayed.numel() == flat_committed.numel():
        worst = int((flat_replayed - flat_committed).abs().nan_to_num(nan=float("inf")).argmax())
    return dict(replayed_hash=tensors_hash(epoch, replayed), worst_index=worst)


# ---- what checks look at ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """A failed check: its verdict, the relative error where one was measured, and evidence another peer can
    check (the replayed gradient's hash and where it differs most)."""

    verdict: Verdict
    error: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replayed:
    """One replay of a contribution: what TRL built and computed (or why it stopped: ``mismatch``)."""

    record: TrainerRecord | None
    gradient: list[torch.Tensor] | None
    reward_names: list[str]
    mismatch: str | None = None  # the rollouts did not fit the rows (RolloutMismatch)
    stop_ids: tuple[int, ...] = ()  # the replaying trainer's stop tokens (TRL's)


TrainerFor = Callable[..., tuple[Any, GradientRecorder]]  # (rows, settings, **replay) -> (trainer, recorder)


@dataclass
class ReplayCase:
    """A contribution to judge by replay on ``model`` (which must be at the contribution's state).

    :param rows: the rows the peer was assigned (regenerated by the auditor)
    :param micro_batch_size: the auditor's own micro-batch split (None: the peer's, which replays bitwise)
    :param tolerance: relative L2 error allowed for the gradient
    :param trainer_for: ``(rows, settings, **replay) -> (trainer, recorder)``: a recording trainer set to replay
    """

    contribution: Contribution
    model: torch.nn.Module
    rows: list[dict[str, Any]]
    tolerance: float
    trainer_for: TrainerFor
    micro_batch_size: int | None = None
    epoch: int = 0  # for the evidence's gradient hash
    # what the checks measured (tests and benchmarks read it)
    details: dict[str, Any] = field(default_factory=dict)
    _replayed: Replayed | None = field(default=None, repr=False)

    def replayed(self) -> Replayed:
        """Run TRL's step on the committed rollouts from the model, once."""
        if self._replayed is not None:
            return self._replayed
        contribution, settings = self.contribution, self.contribution.settings
        if self.micro_batch_size is not None:
            settings = replace(settings, micro_batch_size=self.micro_batch_size)
        state_hash = param_checksum(self.model)
        trainer, recorder = self.trainer_for(
            self.rows,
            settings,
            replay_prompts=contribution.prompt_token_ids,
            replay_completions=contribution.completion_token_ids,
            replay_order=contribution.order,
        )
        try:
            trainer.train()
        except RolloutMismatch as error:
            self._replayed = Replayed(None, None, [], mismatch=str(error))
            return self._replayed
        if (
            param_checksum(self.model) != state_hash
        ):  # the recorder never steps; this guards the auditor's state
            raise RuntimeError("replaying a contribution changed the auditor's model")
        record = trainer.record
        if recorder.gradient is None or record.inputs is None or record.rewards is None:
            raise RuntimeError(
                "the replayed GRPO step finished without an optimizer step or without rollouts"
            )
        self._replayed = Replayed(
            record,
            recorder.gradient,
            list(trainer.reward_func_names),
            stop_ids=tuple(int(token) for token in trainer.eos_token_ids),
        )
        return self._replayed


@dataclass
class AuditCase(ReplayCase):
    """A live audit: the replay case, plus what the round says about the audited peer."""

    audited: str = ""
    commitment: Commitment | None = None
    declared_samples: float = 0.0  # the weight it declared to its group
    # what it sent vs what it committed (None: not seen)
    sent_error: Callable[[], float | None] = lambda: None
    swarm_settings: GRPOSettings | None = None  # this auditor's own settings: the swarm's
    expected_seed: int | None = (
        None  # the sampling seed of the audited peer's epoch (swarm.sampling.round_seed)
    )
    # why the shared rollouts it trained on are not acceptable, if they are not
    shared_error: str | None = None


class Check(Protocol):
    """One claim of a contribution: None when it holds, else the failure."""

    def __call__(self, case: Any) -> CheckResult | None: ...


# ---- the checks of a live audit, before the replay ------------------------------------------------------------------
class BindingCheck:
    """What was served is what was committed (state, rows, counts, rollouts and gradient hashes)."""

    def __call__(self, case: AuditCase) -> CheckResult | None:
        field_name = commitment_mismatch(case.contribution, case.commitment)
        if field_name is None:
            return None
        case.details.update(reason=f"the contribution does not match its committed {field_name}")
        return CheckResult(Verdict.COMMITMENT_MISMATCH)


class WeightCheck:
    """The weight it declared to its group is at most the sample count it committed."""

    def __call__(self, case: AuditCase) -> CheckResult | None:
        if case.declared_samples > case.commitment.samples:
            return CheckResult(Verdict.WRONG_WEIGHT)
        return None


class SentCheck:
    """What it sent into averaging (the slice this auditor reduced) is the committed gradient."""

    def __call__(self, case: AuditCase) -> CheckResult | None:
        error = case.sent_error()
        if error is not None and error > SENT_TOLERANCE:
            return CheckResult(Verdict.SENT_MISMATCH, error)
        return None


_SWARM_WIDE = (
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "stop_token_ids",
    "sampler",
)


class SettingsCheck:
    """It computed with the swarm's GRPO and sampling settings, under its epoch's sampling seed, and in the
    precision class it committed to."""

    def __call__(self, case: AuditCase) -> CheckResult | None:
        mine, theirs = case.swarm_settings, case.contribution.settings
        differ = [name for name in _SWARM_WIDE if getattr(mine, name) != getattr(theirs, name)]
        if case.expected_seed is not None and theirs.seed != case.expected_seed:
            differ.append("seed")
        if (
            theirs.precision != case.commitment.precision
            or case.commitment.precision not in GRADIENT_TOLERANCE
        ):
            differ.append("precision")
        if differ:
            case.details.update(reason=f"settings {', '.join(differ)} are not the swarm's")
            return CheckResult(Verdict.WRONG_SETTINGS)
        return None


class SharedRolloutsCheck:
    """The other peers' groups it trained on (rollout sharing) are signed, fresh and unaltered."""

    def __call__(self, case: AuditCase) -> CheckResult | None:
        if case.shared_error is None:
            return None
        case.details.update(reason=case.shared_error)
        return CheckResult(Verdict.WRONG_DATA)


# ---- the checks of a replay ---------------------------------------------------------------------------------------
class StateCheck:
    """The model it claims to have computed at is the one this auditor replays from (the group's θ_e)."""

    def __call__(self, case: ReplayCase) -> CheckResult | None:
        actual = param_checksum(case.model)
        if actual == case.contribution.state_hash:
            return None
        case.details.update(claimed=case.contribution.state_hash, actual=actual)
        return CheckResult(Verdict.WRONG_STATE)


class DataCheck:
    """Its rollouts are completions of its assigned rows, laid out as TRL lays them out."""

    def __call__(self, case: ReplayCase) -> CheckResult | None:
        if [
            name for name, param in case.model.named_parameters() if param.requires_grad
        ] != case.contribution.param_names:
            case.details.update(reason="the gradient's parameter names are not the model's")
            return CheckResult(Verdict.GRADIENT_MISMATCH)
        replayed = case.replayed()
        if replayed.mismatch is not None:
            case.details.update(reason=replayed.mismatch)
            return CheckResult(Verdict.WRONG_DATA)
        for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            claimed, built = getattr(case.contribution, key), replayed.record.inputs[key]
            if claimed.shape != built.shape or not torch.equal(claimed.cpu(), built):
                case.details.update(reason=f"{key} is not what TRL builds from the rollouts")
                return CheckResult(Verdict.WRONG_DATA)
        return None


def completion_problem(ids: Sequence[int], max_length: int, stops: set[int]) -> str | None:
    """What makes ``ids`` a completion the sampler could not have returned, or None: empty, longer than the
    maximum, going on after a stop token, or ending early without one."""
    if not ids:
        return "is empty"
    if len(ids) > max_length:
        return f"has {len(ids)} tokens, more than the maximum {max_length}"
    if any(token in stops for token in ids[:-1]):
        return "goes on after its stop token"
    if ids[-1] not in stops and len(ids) < max_length:
        return f"ends after {len(ids)} tokens without a stop token"
    return None


@dataclass(frozen=True)
class SampledPositions:
    """The outcome of checking every position of some completions: how many, how many fell inside the tie
    margin, and the first that is not the sampler's choice (row, generation, position, token, the sampler's)."""

    checked: int
    ties: int
    first_forged: tuple[int, int, int, int, int] | None


def computing_class(model: torch.nn.Module) -> str:
    """The precision class this process computes ``model``'s logits in right now: the active autocast's dtype, else
    the parameters' (an auditor computing in bf16 cannot hold an fp32 peer to the fp32 margin)."""
    param = next(model.parameters())
    device = param.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param.dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


# elements of logits (positions x vocabulary) one step of the check holds at once: the forward pass's float32 logits
# and check_positions' few float64 copies stay within a few hundred MiB at a 150k vocabulary
CHECK_BUDGET = 1 << 23


def check_sampled(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: Sequence[Sequence[int]],
    keys: Sequence[tuple[int, int]],
    settings: GRPOSettings,
    margin: float,
    pad_id: int = 0,
    budget: int = CHECK_BUDGET,
) -> SampledPositions:
    """Whether every completion token is the seeded sampler's choice from ``model``: teacher-forced forward passes
    over the left-padded prompts (TRL's tensors) and the completions, right-padded, every token attended (TRL's
    completion mask may hide truncated completions; the sampler saw all of it), then
    :func:`swarm.sampling.check_positions` at each position under ``settings`` (its seed and knobs).
    ``keys[i]`` is completion i's (row, generation).

    The margin is the wider of ``margin`` (the peer's declared class) and that of the class this auditor computes in
    (:func:`computing_class`). Completions go through in chunks of at most ``budget`` logits (at least one
    completion per forward pass), checked in order; checking stops at the first chunk with a forged position, so
    ``checked`` and ``ties`` count the positions checked until then."""
    margin = max(margin, SAMPLING_MARGIN[computing_class(model)])
    params = settings.sampling_params()
    lengths = [len(ids) for ids in completions]
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0) or 1
    checked = ties = 0
    start = 0
    while start < len(completions):
        end, widest = start, 0
        while end < len(completions) and (
            end == start or max(widest, lengths[end]) * (end + 1 - start) * vocab <= budget
        ):
            widest = max(widest, lengths[end])
            end += 1
        chunk = range(start, end)
        start = end
        if widest == 0:
            continue
        completion_ids, completion_mask = pad(completions[chunk.start : chunk.stop], pad_id, side="right")
        prompts, masks = prompt_ids[chunk.start : chunk.stop], prompt_mask[chunk.start : chunk.stop]
        attended = masks.any(dim=0).nonzero()
        first_column = (
            int(attended[0, 0]) if len(attended) else 0
        )  # columns only the padding of other chunks uses
        logits = completion_logits(
            model, prompts[:, first_column:], masks[:, first_column:], completion_ids, completion_mask
        )
        slots = [slot for slot, index in enumerate(chunk) for _ in range(lengths[index])]
        positions = [position for index in chunk for position in range(lengths[index])]
        rows = [keys[chunk[slot]][0] for slot in slots]
        generations = [keys[chunk[slot]][1] for slot in slots]
        step = max(1, budget // logits.shape[-1])
        for at in range(0, len(slots), step):
            block = slice(at, at + step)
            slot_index, position_index = torch.tensor(slots[block]), torch.tensor(positions[block])
            tokens = completion_ids[slot_index, position_index]
            result = check_positions(
                logits[slot_index.to(logits.device), position_index.to(logits.device)],
                position_keys(settings.seed, rows[block], generations[block], positions[block]),
                tokens,
                params,
                margin,
            )
            checked += len(tokens)
            ties += int(result.tie.sum())
            if not bool(result.ok.all()):
                bad = int((~result.ok).nonzero()[0, 0]) + at
                first = (
                    rows[bad],
                    generations[bad],
                    positions[bad],
                    int(tokens[bad - at]),
                    int(result.chosen[bad - at]),
                )
                return SampledPositions(checked, ties, first)
    return SampledPositions(checked, ties, None)


def shared_group_problem(
    model: torch.nn.Module,
    prompt: Sequence[int],
    completions: Sequence[Sequence[int]],
    row: int,
    settings: GRPOSettings,
    stop_ids: Sequence[int],
    pad_id: int,
    margin: float,
) -> str | None:
    """Why a shared group (one prompt, one completion per generation, row ``row`` of its sender, whose seed is
    ``settings.seed``) is not what the sender's seeded sampler draws from ``model`` (the sender's committed state),
    or None when it is."""
    stops = set(stop_ids)
    for generation, ids in enumerate(completions):
        problem = completion_problem(ids, settings.max_completion_length, stops)
        if problem is not None:
            return f"generation {generation}: the completion {problem}"
    prompt_ids = torch.tensor([list(prompt)] * len(completions), dtype=torch.long)
    result = check_sampled(
        model,
        prompt_ids,
        torch.ones_like(prompt_ids),
        completions,
        [(row, generation) for generation in range(len(completions))],
        settings,
        margin,
        pad_id,
    )
    if result.first_forged is None:
        return None
    _, generation, position, token, chosen = result.first_forged
    return f"generation {generation} position {position}: token {token} is not the sampler's choice {chosen}"


class SamplingCheck:
    """Every completion of its own rows is what the seeded sampler (swarm/sampling.py) draws from the committed
    state under its settings and seed: at most the maximum length, nothing after its first stop token, a stop token
    at its end unless it has the maximum length, and at every position the token the sampler chooses from the
    auditor's logits — either of two candidates within :data:`SAMPLING_MARGIN` of each other. The shared rows
    (rollout sharing) were sampled by their senders; receivers check them before training on them
    (:func:`shared_group_problem`). The first failing row, generation and position are named in ``details``."""

    def __call__(self, case: ReplayCase) -> CheckResult | None:
        contribution, settings = case.contribution, case.contribution.settings
        if settings.sampler != SAMPLER or settings.precision not in SAMPLING_MARGIN:
            case.details.update(
                reason=f"sampler {settings.sampler!r} in class {settings.precision!r} is not checkable"
            )
            return CheckResult(Verdict.WRONG_SETTINGS)
        group = settings.num_generations
        local = (len(contribution.rows) - len(contribution.shared_groups)) * group
        stops = set(settings.stop_token_ids or case.replayed().stop_ids)
        for index, ids in enumerate(contribution.completion_token_ids[:local]):
            problem = completion_problem(ids, settings.max_completion_length, stops)
            if problem is not None:
                row, generation = divmod(index, group)
                case.details.update(
                    reason=f"row {row} generation {generation}: the completion {problem}",
                    forged_row=row,
                    forged_position=None,
                )
                return CheckResult(Verdict.FORGED_COMPLETIONS)
        started = time.perf_counter()
        result = check_sampled(
            case.model,
            contribution.prompt_ids[:local],
            contribution.prompt_mask[:local],
            contribution.completion_token_ids[:local],
            [divmod(index, group) for index in range(local)],
            settings,
            SAMPLING_MARGIN[settings.precision],
        )
        case.details.update(
            tokens_checked=result.checked,
            tie_positions=result.ties,
            sampling_check_s=time.perf_counter() - started,
        )
        if result.first_forged is None:
            return None
        row, generation, position, token, chosen = result.first_forged
        case.details.update(
            reason=(
                f"row {row} generation {generation} position {position}: token {token} is not the sampler's "
                f"choice {chosen}"
            ),
            forged_row=row,
            forged_position=position,
        )
        return CheckResult(Verdict.FORGED_COMPLETIONS)


class RewardsCheck:
    """Its rewards are what this auditor's reward functions give its completions."""

    def __call__(self, case: ReplayCase) -> CheckResult | None:
        replayed = case.replayed()
        error = max_abs_diff(case.contribution.rewards, replayed.record.rewards)
        case.details.update(
            reward_error=error, rewards=replayed.record.rewards, completions=replayed.record.completions
        )
        if list(case.contribution.reward_names) != replayed.reward_names or error > REWARD_TOLERANCE:
            return CheckResult(Verdict.FORGED_REWARDS)
        return None


class AdvantagesCheck:
    """Its advantages follow from those rewards."""

    def __call__(self, case: ReplayCase) -> CheckResult | None:
        advantages = case.replayed().record.inputs["advantages"]
        error = max_abs_diff(case.contribution.advantages, advantages)
        case.details.update(advantage_error=error, advantages=advantages)
        if error > ADVANTAGE_TOLERANCE:
            return CheckResult(Verdict.FORGED_ADVANTAGES)
        return None


class GradientCheck:
    """Its gradient is the replayed one, within the tolerance of its precision class. Passing or not, the result
    carries the relative error and the evidence."""

    def __call__(self, case: ReplayCase) -> CheckResult:
        gradient = case.replayed().gradient
        error = relative_error(case.contribution.gradient, gradient)
        case.details.update(replayed_gradient=gradient)
        evidence = gradient_evidence(case.epoch, case.contribution.gradient, gradient)
        return CheckResult(
            Verdict.PASS if error <= case.tolerance else Verdict.GRADIENT_MISMATCH, error, evidence
        )


REPLAY_CHECKS: tuple[Check, ...] = (
    StateCheck(),
    DataCheck(),
    SamplingCheck(),
    RewardsCheck(),
    AdvantagesCheck(),
    GradientCheck(),
)
AUDIT_CHECKS: tuple[Check, ...] = (
    BindingCheck(),
    WeightCheck(),
    SentCheck(),
    SettingsCheck(),
    SharedRolloutsCheck(),
    *REPLAY_CHECKS,
)


def run_checks(case: ReplayCase, checks: Sequence[Check]) -> CheckResult:
    """The first failing check's result, or ``pass`` (with the last check's error and evidence, if it measured
    any)."""
    last: CheckResult | None = None
    for check in checks:
        result = check(case)
        if result is not None and result.verdict is not Verdict.PASS:
            return result
        last = result or last
    return last if last is not None else CheckResult(Verdict.PASS)
