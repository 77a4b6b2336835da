"""TRL behind one seam: the only module that touches TRL's private API, pinned to the TRL minor version it was
tested with (``pyproject.toml``; tests/test_trl_adapter.py fails first when an upgrade moves what is used here).

The swarm runs TRL's own code for one optimizer step per epoch and stops short of the step itself:

* :class:`GradientRecorder` is the optimizer handed to TRL: its ``step()`` copies every trainable parameter's
  gradient and steps nothing (the epoch steps through its strategy; a replay keeps the audited state);
* :class:`RecordingGRPOTrainer` is a ``GRPOTrainer`` that records the rollouts TRL builds when capturing, and when
  replaying returns the recorded completion token ids instead of sampling (its only change to TRL's computation),
  so that TRL itself re-tokenizes the prompts, decodes the completions, re-scores them, recomputes the advantages,
  builds the loss and backpropagates with the same ``GRPOConfig`` as the peer (:func:`grpo_config`);
* :func:`make_sft_trainer` builds the SFT round (public API only).

TRL internals used (checked against TRL 1.16):

* ``GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
  -> (completion_ids, logprobs)`` — replaced: completions are sampled by the seeded sampler
  (:mod:`swarm.sampling`, keyed by the settings' seed and each completion's row and generation index) instead of
  ``model.generate``, taken as given for the rows whose completions are shared, and replayed when replaying;
  ``self.eos_token_ids`` (TRL's stop tokens);
* ``GRPOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list) -> rewards_per_func`` (N, F);
* ``GRPOTrainer._generate_and_score_completions(inputs) -> dict`` with keys ``prompt_ids``, ``prompt_mask``,
  ``completion_ids``, ``completion_mask``, ``advantages``;
* the training branch of ``GRPOTrainer._prepare_inputs`` (re-implemented here to pin the shuffle):
  ``self._step``, ``self._buffered_inputs``, ``self.num_iterations``, ``args.steps_per_generation`` and
  ``trl.trainer.utils.split_tensor_dict``; ``self._metrics`` (cleared between replays);
* ``GRPOTrainer.reward_func_names``, ``reward_weights``, ``use_vllm``, ``num_generations``;
* how ``GRPOTrainer._tokenize_prompts`` tokenizes a text (non-conversational) prompt: ``processing_class(text=…)``
  (:func:`prompt_token_ids`, which a receiver of shared rollouts uses to check them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from swarm.recipe import Recipe
from swarm.sampling import SAMPLER, Sampler, SampleRequest, SamplingParams, generate_request

__all__ = [
    "GRPOSettings",
    "GradientRecorder",
    "RecordingGRPOTrainer",
    "RolloutMismatch",
    "TrainerRecord",
    "grpo_config",
    "keeps_forward",
    "make_recording_trainer",
    "make_sft_trainer",
    "prompt_token_ids",
    "stop_token_ids",
]


@dataclass(frozen=True)
class GRPOSettings:
    """The knobs of a peer's GRPO step that change its gradient (everything else is TRL's default)."""

    num_generations: int = 4
    max_completion_length: int = 4
    temperature: float = 1.0
    seed: int = 0
    micro_batch_size: int | None = None  # None: one micro-batch of all completions
    # does not change the gradient; recorded so that capture can take the real step
    learning_rate: float = 1e-2
    # the declared precision class: "fp32" (no autocast), "bf16" or "fp16" (mixed precision)
    precision: str = "fp32"
    # sampling (swarm/sampling.py): the warpers' knobs in transformers' meaning, the tokens a completion stops at
    # (empty: TRL's), and the sampler with its seed derivation; ``seed`` above is the sampling seed
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    sampler: str = SAMPLER

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p)


class RolloutMismatch(Exception):
    """Raised inside the replaying trainer when the rollouts do not fit the rows; aborts the replay."""


@dataclass
class TrainerRecord:
    """What a :class:`RecordingGRPOTrainer` saw in its step: TRL's prompt and completion token ids, the shuffle's
    order, the completions as decoded, the rewards per function and the inputs TRL built (advantages, masks)."""

    prompt_token_ids: list[list[int]] | None = None
    completion_token_ids: list[list[int]] | None = None
    order: list[int] | None = None
    completions: list[Any] | None = None
    rewards: torch.Tensor | None = None
    inputs: dict[str, Any] | None = None


class WrappedOptimizer(torch.optim.Optimizer):
    """Base for optimizers that hand TRL the parameter groups and state of an ``inner`` optimizer and decide in
    ``step()`` what happens with the accumulated gradient. Subclasses implement ``step``."""

    def __init__(self, inner: torch.optim.Optimizer):
        # torch.optim.Optimizer.__init__ is not called: every attribute it would set is the inner optimizer's
        self.inner = inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    def step(self, closure: Callable | None = None) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class GradientRecorder(WrappedOptimizer):
    """The optimizer handed to TRL: ``step()`` copies every trainable parameter's ``.grad`` and then steps ``inner``
    (e.g. the peer's AdamW), or nothing when ``inner`` is None (the epoch, which steps through its strategy; a
    replay, where the model must stay at the audited state)."""

    def __init__(
        self, named_parameters: Sequence[tuple[str, torch.nn.Parameter]], inner: torch.optim.Optimizer | None
    ):
        self.names = [name for name, _ in named_parameters]
        self.params = [param for _, param in named_parameters]
        self.steps_inner = inner is not None
        # never stepped
        super().__init__(inner if inner is not None else torch.optim.SGD(self.params, lr=0.0))
        self.gradient: list[torch.Tensor] | None = None

    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("GradientRecorder does not support closures")
        self.gradient = [
            torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
            for param in self.params
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
        settings: GRPOSettings | None = None,
        sampler: Sampler | None = None,
        **kwargs: Any,
    ):
        """:param forced_rows: when capturing, the completions of some rows (row index -> one token id list per
        generation) that are taken as given instead of sampled: the groups other peers shared (swarm/sharing.py)
        :param settings: the seed and sampling knobs of the seeded sampler (None: ``GRPOSettings()``)
        :param sampler: what samples the completions (default: :func:`swarm.sampling.generate_request`; only a
          cheater of the attack suite passes another one)
        """
        self.record = TrainerRecord()
        self.replay_prompts = replay_prompts
        self.replay_completions = replay_completions
        self.replay_order = replay_order
        self.forced_rows = forced_rows or {}
        self.settings = settings or GRPOSettings()
        self.sampler = sampler or generate_request
        super().__init__(*args, **kwargs)

    def reset_for_replay(
        self,
        rows: list[dict[str, Any]],
        prompts: list[list[int]] | None,
        completions: list[list[int]] | None,
        order: list[int] | None,
    ) -> None:
        """Make this trainer (built for rows of the same count and settings) replay another contribution: TRL's
        buffered inputs, step counter and per-step metrics are reset, so a long-lived trainer does not grow."""
        self.train_dataset = Dataset.from_list(rows)
        self.replay_prompts, self.replay_completions, self.replay_order = prompts, completions, order
        self.record = TrainerRecord()
        self._buffered_inputs, self._step = None, 0
        for metrics in self._metrics.values():
            metrics.clear()

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
                raise RolloutMismatch(f"the micro-batch order is not a permutation of the {size} completions")
            self.record.order = order
            batch = {key: _permute(value, order) for key, value in batch.items()}
            self._buffered_inputs = split_tensor_dict(batch, steps)
        return self._buffered_inputs[self._step % steps]

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        prompts = [[int(token) for token in ids] for ids in prompt_ids]
        self.record.prompt_token_ids = prompts
        if self.replay_completions is None:
            completion_ids, logprobs = self._generate_around_forced(prompt_ids, images), None
        else:
            if self.replay_prompts is not None and prompts != self.replay_prompts:
                raise RolloutMismatch("the rollouts' prompt token ids are not the rows' prompts")
            if len(self.replay_completions) != len(prompts):
                raise RolloutMismatch(
                    f"{len(self.replay_completions)} completions for {len(prompts)} prompts"
                )
            completion_ids, logprobs = [list(ids) for ids in self.replay_completions], None
        self.record.completion_token_ids = [[int(token) for token in ids] for ids in completion_ids]
        return completion_ids, logprobs

    def _generate_around_forced(self, prompt_ids, images) -> list[list[int]]:
        """Sample the completions of the rows that are not forced with the seeded sampler and take the forced
        rows' completions as given. TRL lays the generation batch out row by row, each row repeated
        ``num_generations`` times in a row: element i is generation ``i % G`` of row ``i // G``, which is its
        sampling key (with the settings' seed)."""
        if self.use_vllm or images is not None:
            raise NotImplementedError("the seeded sampler supports text-only generation with transformers")
        group = self.num_generations
        if len(prompt_ids) % group or (
            self.forced_rows and max(self.forced_rows) >= len(prompt_ids) // group
        ):
            raise ValueError(
                f"{len(prompt_ids)} prompts do not hold the forced rows {sorted(self.forced_rows)}"
            )
        free = [index for index in range(len(prompt_ids)) if index // group not in self.forced_rows]
        sampled: list[list[int]] = []
        if free:
            settings = self.settings
            stops = list(settings.stop_token_ids) or list(self.eos_token_ids)
            sampled = self.sampler(
                SampleRequest(
                    model=self.accelerator.unwrap_model(self.model),
                    prompts=[[int(token) for token in prompt_ids[index]] for index in free],
                    element_keys=[(settings.seed, index // group, index % group) for index in free],
                    params=settings.sampling_params(),
                    max_new_tokens=self.max_completion_length,
                    stop_ids=stops,
                    pad_id=int(self.processing_class.pad_token_id),
                )
            )
        by_index = dict(zip(free, sampled))
        completion_ids = []
        for index in range(len(prompt_ids)):
            if index in by_index:
                completion_ids.append(list(by_index[index]))
            else:
                completion_ids.append(
                    [int(token) for token in self.forced_rows[index // group][index % group]]
                )
        return completion_ids

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


def _micro_batch(total: int, micro_batch_size: int | None) -> int:
    """Rows per forward/backward so that ``total`` rows are exactly one optimizer step: ``micro_batch_size`` when
    it divides ``total``, else all of them at once."""
    micro = min(micro_batch_size or total, total)
    return micro if total % micro == 0 else total


def _quiet(trainer: Any) -> Any:
    """No per-step printing or progress bar: the swarm reports its epochs itself."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def grpo_config(settings: GRPOSettings, num_rows: int, output_dir: str | Path) -> GRPOConfig:
    """The GRPOConfig of one swarm epoch, for the peer that trains and the auditor that replays alike: one optimizer
    step (``max_steps=1``), constant learning rate, no clipping (the swarm clips the averaged gradient), no KL term
    (no reference model to keep in lock-step), the dataset in the assigned order."""
    total = num_rows * settings.num_generations
    micro = _micro_batch(total, settings.micro_batch_size)
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
        top_k=settings.top_k,
        top_p=settings.top_p,
        min_p=settings.min_p or None,
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
    sampler: Sampler | None = None,
    **replay: Any,
) -> RecordingGRPOTrainer:
    """A :class:`RecordingGRPOTrainer` for one epoch on ``rows``, sampling with the seeded sampler under
    ``settings`` and scoring with the recipe's reward functions (``reward_funcs`` and ``sampler``: only a cheating
    peer of the attack suite passes other ones)."""
    trainer = RecordingGRPOTrainer(
        model=model,
        reward_funcs=recipe.checked_reward_funcs() if reward_funcs is None else reward_funcs,
        args=grpo_config(settings, len(rows), output_dir),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        settings=settings,
        sampler=sampler,
        **replay,
    )
    return _quiet(trainer)


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """The tokens a completion stops at, as TRL's ``GRPOTrainer`` derives them: the tokenizer's eos first, then
    every eos id the model's generation config declares (e.g. an end-of-turn token)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids = [eos, *ids]
    return tuple(int(token) for token in ids)


def make_sft_trainer(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    optimizer: GradientRecorder,
    output_dir: str | Path,
    *,
    seed: int,
    micro_batch_size: int | None,
    bf16: bool,
    max_length: int | None,
) -> Any:
    """An SFT trainer for one swarm round on ``rows`` (prompt + completion; the loss on the completion only): one
    optimizer step (``max_steps=1``) that ``optimizer`` records without stepping, no clipping (the swarm clips the
    averaged gradient, identically on every peer)."""
    from trl import SFTConfig, SFTTrainer

    total = len(rows)
    micro = _micro_batch(total, micro_batch_size)
    args = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=total // micro,
        max_steps=1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        log_level="error",
        bf16=bf16,
        completion_only_loss=True,
        max_length=max_length,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
    )
    return _quiet(trainer)


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids TRL's GRPO step generates from for a text prompt (``GRPOTrainer._tokenize_prompts``)."""
    return [int(token) for token in tokenizer(text=[prompt])["input_ids"][0]]
