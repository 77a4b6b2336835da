"""Verification by replay, first slice: record a contribution during a real TRL GRPO step, replay it offline.

A *contribution* is everything an auditor needs to recompute a peer's gradient for one epoch (DESIGN §3 step 7):
the hash of the model state it was computed at, the assigned rows, the rollouts as token ids (prompts and
completions, with TRL's padded tensors and masks), the rewards it claims per reward function, the advantages it
claims, and the gradient it claims (one tensor per trainable parameter, ``named_parameters`` order).

Both sides run TRL's own code: :class:`RecordingGRPOTrainer` is a ``GRPOTrainer`` that

* when capturing, samples completions as usual and records what TRL builds from them;
* when replaying, returns the recorded completion token ids instead of sampling (its only change to TRL's
  computation), so that TRL itself re-tokenizes the prompts from the rows, decodes the completions, re-scores them
  with the auditor's reward functions, recomputes the advantages, builds the loss and backpropagates — with the
  same ``GRPOConfig`` (loss type, reward scaling, micro-batching) as the peer.

The gradient is read from ``param.grad`` when TRL calls ``optimizer.step()`` (:class:`GradientRecorder`, the same
seam :class:`swarm.training.optimizer.SwarmOptimizer` uses). Nothing is trusted: a replay that finds other prompts
(``wrong_data``), other rewards (``forged_rewards``), other advantages (``forged_advantages``) or a gradient further
than the tolerance from the claimed one (``gradient_mismatch``) fails, and a replay is only attempted from the
model state the contribution claims (``wrong_state``).

TRL internals this depends on (checked against TRL 1.16; they may move on upgrade):

* ``GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
  -> (completion_ids, logprobs)`` — replaced when replaying;
* ``GRPOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list) -> rewards_per_func`` (N, F);
* ``GRPOTrainer._generate_and_score_completions(inputs) -> dict`` with keys ``prompt_ids``, ``prompt_mask``,
  ``completion_ids``, ``completion_mask``, ``advantages``;
* the training branch of ``GRPOTrainer._prepare_inputs`` (re-implemented here to pin the shuffle):
  ``self._step``, ``self._buffered_inputs``, ``self.num_iterations``, ``args.steps_per_generation`` and
  ``trl.trainer.utils.split_tensor_dict``;
* ``GRPOTrainer.reward_func_names``.

Measured on the tiny offline model (fp32, CPU, tests/test_replay.py): replaying with the same micro-batch split and
order is bitwise exact (error 0), whatever the thread count; another order within one micro-batch gives ~1e-7..1e-6;
another micro-batch split gives ~2e-3 (the attention backward is that sensitive to which sequences share a batch),
which is why the order is part of the contribution. Tampered gradients are >= 0.25 away.
"""

from __future__ import annotations

import contextlib
import enum
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from swarm.recipe import Recipe
from swarm.training.optimizer import WrappedOptimizer
from swarm.training.state import param_checksum

REWARD_TOLERANCE = 1e-6  # absolute, per reward: reward functions are deterministic Python
ADVANTAGE_TOLERANCE = 1e-5  # absolute, per completion: same rewards give the same advantages up to float rounding
# relative L2 for a replay with the peer's micro-batch split and order; honest fp32 replays measure 0..1e-6
# per declared precision class. bench/verification.py measures (CPU, tiny model): replays in the same class are
# bitwise exact (error 0) whatever the thread count; across classes bf16 -> fp32 differs by <= 5.9e-3 and
# fp16 -> fp32 by <= 7.5e-4, which bounds what other hardware and kernels may add; the mildest attacks are >= 3.7e-3
# (lower_precision, caught only when fp32 is declared) and 1e-2 (small_noise, which a bf16 declaration lets pass)
GRADIENT_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-3}
OTHER_SPLIT_TOLERANCE = 1e-2  # fp32 replay with another micro-batch split: honest ones measure ~2e-3


class Verdict(enum.StrEnum):
    PASS = "pass"
    WRONG_STATE = "wrong_state"  # the auditor's model is not the state the contribution claims
    WRONG_DATA = "wrong_data"  # the rollouts' prompts are not the assigned rows (or the rollouts are malformed)
    FORGED_REWARDS = "forged_rewards"  # the claimed rewards are not what the recipe's reward functions give
    FORGED_ADVANTAGES = "forged_advantages"  # the claimed advantages do not follow from the rewards
    GRADIENT_MISMATCH = "gradient_mismatch"  # the claimed gradient is not the gradient of those rollouts


@dataclass(frozen=True)
class GRPOSettings:
    """The knobs of a peer's GRPO step that change its gradient (everything else is TRL's default)."""

    num_generations: int = 4
    max_completion_length: int = 4
    temperature: float = 1.0
    seed: int = 0
    micro_batch_size: int | None = None  # None: one micro-batch of all completions
    learning_rate: float = 1e-2  # does not change the gradient; recorded so that capture can take the real step
    precision: str = "fp32"  # the declared precision class: "fp32" (no autocast), "bf16" or "fp16" (mixed precision)


@dataclass
class Contribution:
    """What a peer keeps for the audit window, and what an auditor replays."""

    state_hash: str  # param_checksum of the model the gradient was computed at
    rows: list[dict[str, Any]]  # the assigned rows (an auditor can regenerate them from the seed)
    settings: GRPOSettings
    prompt_token_ids: list[list[int]]  # one per completion, in TRL's order (each prompt repeated num_generations)
    completion_token_ids: list[list[int]]  # as sampled, unpadded
    prompt_ids: torch.Tensor  # TRL's left-padded prompt tensor, (N, P)
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # TRL's right-padded completion tensor, (N, C)
    completion_mask: torch.Tensor
    reward_names: list[str]
    rewards: torch.Tensor  # claimed rewards per reward function, (N, F); NaN where a function returned None
    advantages: torch.Tensor  # claimed advantages, (N,)
    order: list[int]  # the order TRL's shuffle put the completions in before cutting them into micro-batches
    param_names: list[str]  # trainable parameters, named_parameters order
    gradient: list[torch.Tensor]  # claimed gradient, one tensor per name in param_names
    # rollout sharing (swarm/sharing.py): the signed bundles of other peers this contribution trained on, as
    # [canonical bytes, signature], and for each of the last len(shared_groups) rows its [bundle, group] indices
    shared_bundles: list[list[bytes]] = field(default_factory=list)
    shared_groups: list[list[int]] = field(default_factory=list)

    @property
    def num_completions(self) -> int:
        return len(self.completion_token_ids)

    def with_changes(self, **changes: Any) -> Contribution:
        """A copy with some fields replaced (what a cheater would send)."""
        return replace(self, **changes)


@dataclass
class ReplayResult:
    verdict: Verdict
    error: float  # relative L2 error of the claimed gradient (inf when the replay did not get that far)
    tolerance: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS


class _DataMismatch(Exception):
    """Raised inside the replaying trainer when the rollouts do not fit the rows; aborts the replay."""


@dataclass
class _Record:
    prompt_token_ids: list[list[int]] | None = None
    completion_token_ids: list[list[int]] | None = None
    order: list[int] | None = None
    completions: list[Any] | None = None
    rewards: torch.Tensor | None = None
    inputs: dict[str, Any] | None = None


class GradientRecorder(WrappedOptimizer):
    """The optimizer handed to TRL: ``step()`` copies every trainable parameter's ``.grad`` and then steps ``inner``
    (e.g. the peer's AdamW or a :class:`~swarm.training.optimizer.SwarmOptimizer`), or nothing when ``inner`` is
    None (replay: the model must stay at the audited state)."""

    def __init__(self, named_parameters: Sequence[tuple[str, torch.nn.Parameter]], inner: torch.optim.Optimizer | None):
        self.names = [name for name, _ in named_parameters]
        self.params = [param for _, param in named_parameters]
        self.steps_inner = inner is not None
        super().__init__(inner if inner is not None else torch.optim.SGD(self.params, lr=0.0))  # never stepped
        self.gradient: list[torch.Tensor] | None = None

    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("GradientRecorder does not support closures")
        self.gradient = [
            torch.zeros_like(param) if param.grad is None else param.grad.detach().clone() for param in self.params
        ]
        if self.steps_inner:
            self.inner.step()


class RecordingGRPOTrainer(GRPOTrainer):
    """A GRPOTrainer that records its rollouts, rewards and advantages; given ``replay_completions`` it replays them
    instead of sampling (and checks that TRL's prompt token ids are ``replay_prompts``)."""

    def __init__(
        self,
        *args: Any,
        replay_prompts: list[list[int]] | None = None,
        replay_completions: list[list[int]] | None = None,
        replay_order: list[int] | None = None,
        forced_rows: dict[int, Sequence[Sequence[int]]] | None = None,
        **kwargs: Any,
    ):
        """:param forced_rows: when capturing, the completions of some rows (row index -> one token id list per
          generation) that are taken as given instead of sampled: the groups other peers shared (swarm/sharing.py)
        """
        self.record = _Record()
        self.replay_prompts = replay_prompts
        self.replay_completions = replay_completions
        self.replay_order = replay_order
        self.forced_rows = forced_rows or {}
        super().__init__(*args, **kwargs)

    def _prepare_inputs(self, generation_batch):
        """TRL's training branch of ``_prepare_inputs`` (text only), with the shuffle's permutation recorded when
        capturing and pinned when replaying: which completions share a micro-batch changes the fp32 gradient by
        ~1e-3 (attention backward), the order within one micro-batch by ~1e-6."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            if "pixel_values" in batch:
                raise NotImplementedError("replaying multimodal contributions is not supported yet")
            size = len(batch["completion_ids"])
            if self.replay_order is None:
                order = torch.randperm(size).tolist()  # what TRL's shuffle_sequence_dict draws
            elif sorted(self.replay_order) == list(range(size)):
                order = list(self.replay_order)
            else:
                raise _DataMismatch(f"the micro-batch order is not a permutation of the {size} completions")
            self.record.order = order
            batch = {key: _permute(value, order) for key, value in batch.items()}
            self._buffered_inputs = split_tensor_dict(batch, steps)
        return self._buffered_inputs[self._step % steps]

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        prompts = [[int(token) for token in ids] for ids in prompt_ids]
        self.record.prompt_token_ids = prompts
        if self.replay_completions is None and self.forced_rows:
            completion_ids, logprobs = self._generate_around_forced(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        elif self.replay_completions is None:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        else:
            if self.replay_prompts is not None and prompts != self.replay_prompts:
                raise _DataMismatch("the rollouts' prompt token ids are not the rows' prompts")
            if len(self.replay_completions) != len(prompts):
                raise _DataMismatch(f"{len(self.replay_completions)} completions for {len(prompts)} prompts")
            completion_ids, logprobs = [list(ids) for ids in self.replay_completions], None
        self.record.completion_token_ids = [[int(token) for token in ids] for ids in completion_ids]
        return completion_ids, logprobs

    def _generate_around_forced(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images):
        """Sample completions for the rows that are not forced and take the forced rows' completions as given.
        TRL lays the generation batch out row by row, each row repeated ``num_generations`` times in a row."""
        if self.use_vllm or images is not None:
            raise NotImplementedError("rollout sharing supports text-only generation with transformers")
        group = self.num_generations
        if len(prompt_ids) % group or max(self.forced_rows) >= len(prompt_ids) // group:
            raise ValueError(f"{len(prompt_ids)} prompts do not hold the forced rows {sorted(self.forced_rows)}")
        free = [index for index in range(len(prompt_ids)) if index // group not in self.forced_rows]
        sampled: list[Any] = []
        if free:
            sampled, _ = super()._generate_single_turn(
                [prompt_ids[index] for index in free], None, multimodal_fields, num_generations, has_tool_images
            )
        by_index = dict(zip(free, sampled))
        completion_ids = []
        for index in range(len(prompt_ids)):
            if index in by_index:
                completion_ids.append(list(by_index[index]))
            else:
                completion_ids.append([int(token) for token in self.forced_rows[index // group][index % group]])
        return completion_ids, None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.record.rewards = rewards.detach().cpu().clone()
        self.record.completions = list(completions)
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.record.inputs = {
            key: value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
            for key, value in output.items()
        }
        return output


def _permute(value: Any, order: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.ndim == 0 else value[torch.tensor(order, dtype=torch.long)]
    if isinstance(value, list):
        return [value[index] for index in order]
    return value


_MISSING = object()


@contextlib.contextmanager
def keeps_forward(model: torch.nn.Module) -> Iterator[None]:
    """Build and run GRPO trainers on ``model`` inside this: every ``GRPOTrainer`` wraps the model's ``forward`` in
    a fused LM head (TRL's ``add_fused_lm_head``, an instance attribute around the previous one) and never unwraps
    it, so a peer that builds a trainer per epoch and per audit would nest one wrapper per trainer, slow down and
    die of RecursionError after ~950 of them. On exit the forward is what it was on entry."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.__dict__.get("forward", _MISSING)
    try:
        yield
    finally:
        if saved is _MISSING:
            target.__dict__.pop("forward", None)
        else:
            target.__dict__["forward"] = saved


def grpo_config(settings: GRPOSettings, num_rows: int, output_dir: str | Path) -> GRPOConfig:
    """The GRPOConfig of one swarm epoch, for the peer that trains and the auditor that replays alike: one optimizer
    step (``max_steps=1``), constant learning rate, no clipping (the swarm clips the averaged gradient), no KL term
    (no reference model to keep in lock-step), the dataset in the assigned order."""
    total = num_rows * settings.num_generations
    micro = min(settings.micro_batch_size or total, total)
    if total % micro:
        micro = total
    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=total // micro,
        max_steps=1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        # TRL defaults to bf16 mixed precision, also on CPU: the declared precision class must decide it, or an fp32
        # peer silently computes in bf16 (and a replay could not tell a cheaper, lower-precision peer apart)
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16" and torch.cuda.is_available(),
        seed=settings.seed,
        log_level="error",
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=0.0,
        shuffle_dataset=False,
    )


def make_recording_trainer(
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    rows: list[dict[str, Any]],
    settings: GRPOSettings,
    optimizer: GradientRecorder,
    output_dir: str | Path,
    reward_funcs: list[Any] | None = None,
    **replay: Any,
) -> RecordingGRPOTrainer:
    """A :class:`RecordingGRPOTrainer` for one epoch on ``rows``, scoring with the recipe's reward functions (or
    ``reward_funcs``: only a cheating peer of the attack suite passes other ones)."""
    trainer = RecordingGRPOTrainer(
        model=model,
        reward_funcs=recipe.checked_reward_funcs() if reward_funcs is None else reward_funcs,
        args=grpo_config(settings, len(rows), output_dir),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        **replay,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def capture_contribution(
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    rows: list[dict[str, Any]],
    settings: GRPOSettings,
    optimizer: torch.optim.Optimizer | None = None,
    output_dir: str | Path | None = None,
) -> Contribution:
    """Run one real TRL GRPO step on ``rows`` and record the contribution it makes.

    :param optimizer: stepped with the recorded gradient after recording (e.g. the peer's AdamW, or the swarm's
      :class:`~swarm.training.optimizer.SwarmOptimizer`); None: the model is left unchanged
    """
    state_hash = param_checksum(model)
    named = _trainable(model)
    recorder = GradientRecorder(named, optimizer)
    with tempfile.TemporaryDirectory() as scratch, keeps_forward(model):
        trainer = make_recording_trainer(
            model, tokenizer, recipe, rows, settings, recorder, output_dir or scratch
        )
        trainer.train()
    return contribution_from_record(trainer, recorder, state_hash, rows, settings)


def contribution_from_record(
    trainer: RecordingGRPOTrainer,
    recorder: GradientRecorder,
    state_hash: str,
    rows: list[dict[str, Any]],
    settings: GRPOSettings,
) -> Contribution:
    """The contribution a recording trainer has made once TRL reached ``optimizer.step()`` (the recorder has the
    gradient, the record the rollouts). :raises RuntimeError: if it has not got that far"""
    record = trainer.record
    if recorder.gradient is None or record.inputs is None or record.rewards is None:
        raise RuntimeError("the GRPO step finished without an optimizer step or without rollouts")
    inputs = record.inputs
    return Contribution(
        state_hash=state_hash,
        rows=[dict(row) for row in rows],
        settings=settings,
        prompt_token_ids=record.prompt_token_ids,
        completion_token_ids=record.completion_token_ids,
        prompt_ids=inputs["prompt_ids"],
        prompt_mask=inputs["prompt_mask"],
        completion_ids=inputs["completion_ids"],
        completion_mask=inputs["completion_mask"],
        reward_names=list(trainer.reward_func_names),
        rewards=record.rewards,
        advantages=inputs["advantages"],
        order=record.order,
        param_names=list(recorder.names),
        gradient=recorder.gradient,
    )


def relative_error(claimed: Sequence[torch.Tensor], replayed: Sequence[torch.Tensor]) -> float:
    """||claimed - replayed|| / ||replayed|| over all tensors (float64); inf when shapes differ."""
    if len(claimed) != len(replayed) or any(a.shape != b.shape for a, b in zip(claimed, replayed)):
        return math.inf
    diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(claimed, replayed))
    norm = sum(float(b.double().pow(2).sum()) for b in replayed)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / norm)


def _max_abs_diff(claimed: torch.Tensor, replayed: torch.Tensor) -> float:
    """Largest absolute difference; NaN (a reward of None) only matches NaN. inf when shapes differ."""
    if claimed.shape != replayed.shape:
        return math.inf
    claimed, replayed = claimed.double(), replayed.double()
    if not torch.equal(torch.isnan(claimed), torch.isnan(replayed)):
        return math.inf
    both = ~torch.isnan(replayed)
    return float((claimed[both] - replayed[both]).abs().max()) if both.any() else 0.0


def replay_gradient(
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    contribution: Contribution,
    *,
    rows: list[dict[str, Any]] | None = None,
    micro_batch_size: int | None = None,
    tolerance: float = GRADIENT_TOLERANCE["fp32"],
) -> ReplayResult:
    """Recompute a contribution's gradient with TRL from ``model`` (which must be at the contribution's state) and
    judge it, with a TRL trainer built for this replay only. The model's parameters and forward are left unchanged.
    An auditor that replays many contributions uses a :class:`Replayer` instead (same verdicts, less overhead).

    :param rows: the rows the peer was assigned (regenerated by the auditor); None: the contribution's own rows
    :param micro_batch_size: the auditor's own micro-batch split (None: the peer's, which replays bitwise); another
      split moves an fp32 gradient by ~2e-3, so pass ``tolerance=OTHER_SPLIT_TOLERANCE`` with it
    :param tolerance: relative L2 error allowed for the declared precision class (:data:`GRADIENT_TOLERANCE`)
    """
    with keeps_forward(model), tempfile.TemporaryDirectory() as scratch:
        def fresh(rows: list[dict[str, Any]], settings: GRPOSettings, **replay: Any):
            recorder = GradientRecorder(_trainable(model), None)
            trainer = make_recording_trainer(model, tokenizer, recipe, rows, settings, recorder, scratch, **replay)
            return trainer, recorder

        return _judge(model, contribution, rows, micro_batch_size, tolerance, fresh)


class Replayer:
    """Replays contributions on one model (the auditor's), reusing one TRL trainer per (GRPO settings, row count)
    instead of building one per replay — building a ``GRPOTrainer`` costs as much as a tiny model's whole replay.

    Verdicts are those of :func:`replay_gradient` (tests/test_replay.py checks they are identical). The model's
    forward stays wrapped in TRL's fused LM head once per cached trainer (behaviour-preserving unless called with
    ``fused_lm_head=True``); at most ``max_cached`` trainers are kept.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, recipe: Recipe, max_cached: int = 4):
        self.model, self.tokenizer, self.recipe, self.max_cached = model, tokenizer, recipe, max_cached
        self._cache: dict[tuple, tuple[RecordingGRPOTrainer, GradientRecorder]] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="swarm-replay-")

    def replay(
        self,
        contribution: Contribution,
        *,
        rows: list[dict[str, Any]] | None = None,
        micro_batch_size: int | None = None,
        tolerance: float = GRADIENT_TOLERANCE["fp32"],
    ) -> ReplayResult:
        """Same as :func:`replay_gradient` on this replayer's model."""
        return _judge(self.model, contribution, rows, micro_batch_size, tolerance, self._trainer_for)

    def _trainer_for(self, rows: list[dict[str, Any]], settings: GRPOSettings, **replay: Any):
        key = (replace(settings, seed=0, learning_rate=0.0), len(rows))  # neither changes a replayed gradient
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            recorder = GradientRecorder(_trainable(self.model), None)
            trainer = make_recording_trainer(
                self.model, self.tokenizer, self.recipe, rows, settings, recorder, self._scratch.name
            )
            self._cache[key] = (trainer, recorder)
        trainer, recorder = self._cache[key]
        trainer.train_dataset = Dataset.from_list(rows)
        trainer.replay_prompts = replay["replay_prompts"]
        trainer.replay_completions = replay["replay_completions"]
        trainer.replay_order = replay["replay_order"]
        trainer.record = _Record()
        trainer._buffered_inputs, trainer._step = None, 0
        for metrics in trainer._metrics.values():  # TRL appends per-step metrics; a long-lived trainer must not grow
            metrics.clear()
        recorder.gradient = None
        return trainer, recorder


def _judge(model, contribution: Contribution, rows, micro_batch_size, tolerance: float, trainer_for) -> ReplayResult:
    """The replay itself: ``trainer_for(rows, settings, **replay) -> (trainer, recorder)`` gives a recording trainer
    set to replay ``contribution``; its step is run and every claim of the contribution is checked."""
    details: dict[str, Any] = {}

    def verdict(kind: Verdict, error: float = math.inf, **more: Any) -> ReplayResult:
        return ReplayResult(kind, error, tolerance, {**details, **more})

    state_hash = param_checksum(model)
    if state_hash != contribution.state_hash:
        return verdict(Verdict.WRONG_STATE, claimed=contribution.state_hash, actual=state_hash)
    rows = contribution.rows if rows is None else rows
    named = _trainable(model)
    if [name for name, _ in named] != contribution.param_names:
        return verdict(Verdict.GRADIENT_MISMATCH, reason="the gradient's parameter names are not the model's")
    settings = contribution.settings
    if micro_batch_size is not None:
        settings = replace(settings, micro_batch_size=micro_batch_size)
    trainer, recorder = trainer_for(
        rows, settings,
        replay_prompts=contribution.prompt_token_ids,
        replay_completions=contribution.completion_token_ids,
        replay_order=contribution.order,
    )
    try:
        trainer.train()
    except _DataMismatch as error:
        return verdict(Verdict.WRONG_DATA, reason=str(error))
    record = trainer.record
    if param_checksum(model) != state_hash:  # the recorder never steps; this guards the auditor's own state
        raise RuntimeError("replaying a contribution changed the auditor's model")
    if recorder.gradient is None or record.inputs is None or record.rewards is None:
        raise RuntimeError("the replayed GRPO step finished without an optimizer step or without rollouts")
    inputs = record.inputs
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        claimed, replayed = getattr(contribution, key), inputs[key]
        if claimed.shape != replayed.shape or not torch.equal(claimed.cpu(), replayed):
            return verdict(Verdict.WRONG_DATA, reason=f"{key} is not what TRL builds from the rollouts")

    reward_error = _max_abs_diff(contribution.rewards, record.rewards)
    details.update(reward_error=reward_error, rewards=record.rewards, completions=record.completions)
    if list(contribution.reward_names) != list(trainer.reward_func_names) or reward_error > REWARD_TOLERANCE:
        return verdict(Verdict.FORGED_REWARDS)
    advantage_error = _max_abs_diff(contribution.advantages, inputs["advantages"])
    details.update(advantage_error=advantage_error, advantages=inputs["advantages"])
    if advantage_error > ADVANTAGE_TOLERANCE:
        return verdict(Verdict.FORGED_ADVANTAGES)

    error = relative_error(contribution.gradient, recorder.gradient)
    details.update(replayed_gradient=recorder.gradient)
    return verdict(Verdict.PASS if error <= tolerance else Verdict.GRADIENT_MISMATCH, error)
