"""Verification benchmark: does replay catch every attack of the suite, never an honest peer, and at what cost?

Everything runs offline on the CPU in one process, on the arithmetic recipe and the tiny default model:

* **a shared chain of states** — ``--epochs`` states θ_0, θ_1, ...: at each, every one of ``--peers`` honest peers
  (4 or 2 assigned rows, alternately; 4 generations each) makes its contribution, and θ_{e+1} is an SGD step on
  their mean gradient, as the swarm takes it. These are the ``previous`` (same peer, epoch e-1) and ``other``
  (next peer, epoch e) contributions the attacks of :mod:`swarm.verify.attacks` use.
* **attacks** — for each attack, ``--captures`` cheating contributions, each made the way the live trainer makes
  it (:func:`~swarm.verify.attacks.cheating_contribution`: a real TRL GRPO step on the rows, reward functions and
  precision the attack chooses, then ``tamper``), cycling through epochs, peers, micro-batch splits (one
  micro-batch or micro-batches of 4) and sampling seeds. Each capture is audited twice, by two real replays
  (a :class:`~swarm.verify.replay.Replayer`, as a live auditor replays, against the assigned rows, with the tolerance of the declared
  precision class), one with 1 torch thread and one with 2: audits = 2 x captures, and the table says both.
  A capture that passes and is bit-identical to the honest contribution with the same settings changed nothing
  (``other_model`` whose every token is still the committed state's choice): its audits are counted apart
  (``identical_to_honest_audits`` in the details), not as audits or misses.
* **honest sampling** — ``--sampling-batches`` generation batches per (generation class, auditor class) pair of
  :data:`SAMPLING_PAIRS` (16 prompts x 8 completions of up to 32 tokens; threads, one call or shuffled chunks,
  the knobs of :data:`SAMPLING_KNOBS`), each checked by ``check_sampled`` as an auditor runs it: false positives,
  tie fraction, and the largest honest logit difference against the margin the check applied.
* **honest peers** — ``--honest`` honest captures that vary the peer's thread count (1/2), its micro-batch split
  (one micro-batch, 8, 4 or 2), the sampling seed (so the completions and the recorded shuffle order), the epoch
  and the peer; each replayed with 1 and with 2 threads, with the peer's recorded split and order as the live
  auditor does. A false positive is any verdict but ``pass``. Their relative errors give the fp32 distribution.
* **precision** — ``--precision-captures`` honest captures under ``torch.autocast`` bf16 (and fp16), each replayed
  in fp32 and under the same autocast, with 1 and 2 threads: the relative error distributions (max, p99) that the
  "bf16"/"fp16" tolerance classes should be set from.
* **cost** — the mean wall time of an honest training step (``capture_contribution``: generation + scoring +
  backward) and of its replay, at the size of one epoch of the default config (``training.prompts_per_round``
  rows x ``training.num_generations`` completions, the recipe's completion length), interleaved in the same run:
  ``overhead_fraction = p x replay_s / train_s`` at audit probability ``--p``, and
  ``contributions_to_catch_p99`` = the smallest n with ``1 - (1 - p d)^n >= 0.99``, d the lowest detection rate.
  The honest phase's own (smaller) steps are timed too and reported in the details.

Two things about the environment the figures depend on:

* TRL wraps the model's ``forward`` once more for every ``GRPOTrainer`` built on it (``add_fused_lm_head``);
  :func:`swarm.verify.replay.keeps_forward` (used by capture and replay) undoes it, or thousands of trainers on one
  model would nest thousands of wrappers (slower and slower, then RecursionError).
* accelerate's ``free_memory`` runs ``gc.collect()`` at the end of every ``Trainer.train()``, which costs ~0.2 s
  on the heap of a process that imported torch/transformers/TRL — more than the tiny model's whole step. After
  the set-up the benchmark ``gc.freeze()``-s that heap so that timings measure the step, not the collector; the
  details also give a few timings taken before the freeze.

Usage::

    python bench/verification.py            # tables on stdout, progress on stderr (about 5-10 minutes)
    python bench/verification.py --json     # one JSON object on stdout
    python bench/verification.py --quick    # smoke run: a few audits of each kind (< 60 s)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from swarm import sampling
from swarm.config import ModelConfig, SwarmConfig, VerifyConfig
from swarm.sampling import SamplingParams
from swarm.trl_adapter import prompt_token_ids, stop_token_ids
from swarm.verify.attacks import ATTACKS, AttackContext, cheating_contribution, make_attack
from swarm.verify.checks import SAMPLING_MARGIN, check_sampled
from swarm.verify.replay import (
    GRADIENT_TOLERANCE,
    Contribution,
    GRPOSettings,
    Replayer,
    ReplayResult,
    capture_contribution,
)

RUN_ID = "bench-verification"
NUM_GENERATIONS = 4
NUM_GENERATIONS_TIMED = SwarmConfig().training.num_generations  # the default epoch's
ROWS_PER_PEER = (4, 2)  # peer p is assigned ROWS_PER_PEER[p % 2] rows per epoch
ATTACK_SPLITS: tuple[int | None, ...] = (None, 4)  # the cheater's micro-batch size (None: one micro-batch)
HONEST_SPLITS: tuple[int | None, ...] = (None, 8, 4, 2)
LONGER_COMPLETIONS = 32  # tokens: a second timing closer to real RL completions than the default recipe's 4
AUDIT_THREADS = (1, 2)  # every capture is replayed once with each
CHAIN_LR = 0.1  # SGD step of the chain of shared states


@dataclass(frozen=True)
class Sizes:
    epochs: int
    peers: int
    captures: int  # per attack
    honest: int  # honest captures
    precision_captures: int  # per autocast dtype
    timing_steps: int  # training steps timed before gc.freeze (details only)
    sampling_batches: int  # per (generation class, auditor class) pair: honest generation batches checked


FULL = Sizes(
    epochs=4, peers=4, captures=100, honest=500, precision_captures=40, timing_steps=10, sampling_batches=12
)
QUICK = Sizes(
    epochs=2, peers=2, captures=2, honest=4, precision_captures=2, timing_steps=2, sampling_batches=1
)


class BenchError(Exception):
    """A failure that ends the benchmark with one line on stderr and exit status 1."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "big")


# ---- the world: model, chain of shared states, honest contributions ---------------------------------------
@dataclass
class World:
    model: torch.nn.Module
    tokenizer: Any
    recipe: Any
    sizes: Sizes
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    chain: dict[tuple[int, int], Contribution] = field(default_factory=dict)  # (epoch, peer) -> honest
    replayer: Replayer | None = None

    def peer(self, index: int) -> str:
        return f"peer-{index}"

    def rows(self, epoch: int, peer: int) -> list[dict[str, Any]]:
        return self.recipe.assigned_rows(RUN_ID, self.peer(peer), epoch, ROWS_PER_PEER[peer % 2])

    def unassigned_rows(self, epoch: int, peer: int) -> list[dict[str, Any]]:
        return self.recipe.assigned_rows(
            RUN_ID, f"{self.peer(peer)}/unassigned", epoch, ROWS_PER_PEER[peer % 2]
        )

    def at(self, epoch: int) -> torch.nn.Module:
        """The model, loaded with the shared state of ``epoch``."""
        self.model.load_state_dict(self.states[epoch])
        return self.model

    def replay(
        self, contribution: Contribution, rows: list[dict[str, Any]], tolerance: float
    ) -> ReplayResult:
        """An audit as a peer runs it: a :class:`~swarm.verify.replay.Replayer` on the model (one per world)."""
        if self.replayer is None:
            self.replayer = Replayer(self.model, self.tokenizer, self.recipe)
        return self.replayer.replay(contribution, rows=rows, tolerance=tolerance)


def build_world(root: Path, sizes: Sizes) -> World:
    from swarm.recipe import load_recipe
    from swarm.training.model import load_model_and_tokenizer

    recipe = load_recipe("arithmetic")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), recipe.tokenizer_alphabet(), root / "models")
    world = World(model, tokenizer, recipe, sizes)
    trainable = [param for param in model.parameters() if param.requires_grad]
    for epoch in range(sizes.epochs):
        world.states.append({key: value.detach().clone() for key, value in model.state_dict().items()})
        gradients = []
        for peer in range(sizes.peers):
            settings = GRPOSettings(num_generations=NUM_GENERATIONS, seed=stable_seed("chain", epoch, peer))
            contribution = capture_contribution(model, tokenizer, recipe, world.rows(epoch, peer), settings)
            world.chain[(epoch, peer)] = contribution
            gradients.append(contribution.gradient)
        with torch.no_grad():
            for index, param in enumerate(trainable):
                param -= CHAIN_LR * sum(gradient[index] for gradient in gradients) / len(gradients)
    world.at(0)
    return world


# ---- phases ------------------------------------------------------------------------------------------------
@dataclass
class AttackFigures:
    expected: str
    captures: int = 0
    audits: int = 0
    detected: int = 0
    verdicts: Counter = field(default_factory=Counter)
    errors: list[float] = field(default_factory=list)  # finite relative errors (gradient_mismatch / pass)
    # audits of captures bit-identical to the honest contribution (left out of audits and detection)
    identical_to_honest: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "captures": self.captures,
            "audits": self.audits,
            "detected": self.detected,
            "verdicts": dict(self.verdicts),
            "identical_to_honest_audits": self.identical_to_honest,
            "min_error": min(self.errors) if self.errors else None,
            "median_error": statistics.median(self.errors) if self.errors else None,
        }


def is_honest(
    world: World, epoch: int, rows: list[dict[str, Any]], settings: GRPOSettings, contribution: Contribution
) -> bool:
    """Whether a cheating capture is bit-identical to what an honest peer computes with the same settings (a
    perturbed model whose every token is the committed state's choice produced honest completions)."""
    reference = capture_contribution(world.at(epoch), world.tokenizer, world.recipe, rows, settings)
    return reference.completion_token_ids == contribution.completion_token_ids and all(
        torch.equal(a, b) for a, b in zip(reference.gradient, contribution.gradient, strict=True)
    )


def measure_attack(world: World, name: str) -> AttackFigures:
    attack = make_attack(name)  # one instance per attack: alie keeps its direction across epochs, as live
    figures = AttackFigures(expected=attack.expected.value)
    tolerance = GRADIENT_TOLERANCE[attack.declared_precision]
    sizes = world.sizes
    for index in range(sizes.captures):
        epoch, peer = index % sizes.epochs, (index // sizes.epochs) % sizes.peers
        seed = stable_seed(name, index)
        rows = world.rows(epoch, peer)
        others = [world.chain[(epoch, other)] for other in range(sizes.peers) if other != peer]
        context = AttackContext(
            rows=rows,
            unassigned_rows=lambda epoch=epoch, peer=peer: world.unassigned_rows(epoch, peer),
            previous=world.chain.get((epoch - 1, peer)),
            other=lambda others=others, index=index: others[index % len(others)] if others else None,
            generator=torch.Generator().manual_seed(seed),
        )
        settings = GRPOSettings(
            num_generations=NUM_GENERATIONS,
            seed=seed,
            micro_batch_size=ATTACK_SPLITS[index % len(ATTACK_SPLITS)],
        )
        contribution = cheating_contribution(
            attack, world.at(epoch), world.tokenizer, world.recipe, context, settings
        )
        figures.captures += 1
        honest: bool | None = None  # whether the capture is bit-identical to the honest one (asked on a pass)
        for count in AUDIT_THREADS:
            with threads(count):
                result = world.replay(contribution, rows, tolerance)
            if result.passed and honest is None:
                honest = is_honest(world, epoch, rows, settings, contribution)
            if result.passed and honest:
                figures.identical_to_honest += 1  # nothing was changed: not an attack to catch
                continue
            figures.audits += 1
            figures.detected += not result.passed
            figures.verdicts[result.verdict.value] += 1
            if math.isfinite(result.error):
                figures.errors.append(result.error)
    return figures


@dataclass
class HonestFigures:
    captures: int = 0
    audits: int = 0
    false_positives: int = 0
    verdicts: Counter = field(default_factory=Counter)
    errors: list[float] = field(default_factory=list)
    by_split: Counter = field(default_factory=Counter)
    tokens_checked: int = (
        0  # completion positions the audits' sampling checks recomputed (each audit its own)
    )
    tie_positions: int = 0
    train_s: list[float] = field(default_factory=list)  # wall time of each capture (a training step)
    replay_s: list[float] = field(default_factory=list)  # wall time of each replay (an audit)

    def timing(self) -> dict[str, float]:
        return {
            "train_s": statistics.mean(self.train_s),
            "replay_s": statistics.mean(self.replay_s),
            "train_median_s": statistics.median(self.train_s),
            "replay_median_s": statistics.median(self.replay_s),
            "steps": len(self.train_s),
            "replays": len(self.replay_s),
        }


def measure_honest(world: World) -> HonestFigures:
    figures = HonestFigures()
    sizes = world.sizes
    for index in range(sizes.honest):
        choice = random.Random(stable_seed("honest", index))
        epoch, peer = choice.randrange(sizes.epochs), choice.randrange(sizes.peers)
        split = HONEST_SPLITS[index % len(HONEST_SPLITS)]
        settings = GRPOSettings(
            num_generations=NUM_GENERATIONS, seed=stable_seed("honest-seed", index), micro_batch_size=split
        )
        rows = world.rows(epoch, peer)
        model = world.at(epoch)
        with threads(AUDIT_THREADS[index % len(AUDIT_THREADS)]):  # the peer's own thread count
            started = time.perf_counter()
            contribution = capture_contribution(model, world.tokenizer, world.recipe, rows, settings)
            figures.train_s.append(time.perf_counter() - started)
        figures.captures += 1
        figures.by_split[str(split)] += 1
        for count in AUDIT_THREADS:
            with threads(count):
                started = time.perf_counter()
                result = world.replay(contribution, rows, GRADIENT_TOLERANCE["fp32"])
                figures.replay_s.append(time.perf_counter() - started)
            figures.audits += 1
            figures.false_positives += not result.passed
            figures.verdicts[result.verdict.value] += 1
            figures.errors.append(result.error)
            figures.tokens_checked += result.details.get("tokens_checked", 0)
            figures.tie_positions += result.details.get("tie_positions", 0)
    return figures


# (generation class, auditor class): bf16/fp16 generation checked by an fp32 auditor, the reverse, and the same class
SAMPLING_PAIRS = (
    ("fp32", "fp32"),
    ("bf16", "fp32"),
    ("fp16", "fp32"),
    ("fp32", "bf16"),
    ("fp32", "fp16"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# the knobs the honest generation batches cycle through (each boundary of the kept vocabulary gets crossed)
SAMPLING_KNOBS = (
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.3, min_p=0.1),
)
SAMPLING_PROMPTS = (
    16  # rows per generation batch (the default epoch's), NUM_GENERATIONS_TIMED completions each
)
SAMPLING_LENGTH = LONGER_COMPLETIONS
SAMPLING_CHUNK = 32  # completions per generate call when a batch is generated in chunks


@dataclass
class SamplingFigures:
    """Honest completions checked by the sampling check for one (generation class, auditor class) pair."""

    batches: int = 0
    completions: int = 0
    tokens_checked: int = 0
    tie_positions: int = 0
    false_positives: int = 0  # batches in which the check named a forged position
    # largest |generation logit - check logit| of a position over max(1, max |logit|): what the margin must cover
    largest_difference: float = 0.0

    def as_json(self, margin: float) -> dict[str, Any]:
        """``margin``: the one the check applied (the wider of the peer's declared class and the auditor's)."""
        return {
            **self.__dict__,
            "tie_fraction": self.tie_positions / self.tokens_checked if self.tokens_checked else None,
            "margin": margin,
            "largest_difference_over_margin": self.largest_difference / margin,
        }


@contextlib.contextmanager
def recorded_logits(into: list[torch.Tensor]) -> Iterator[None]:
    """Every logits tensor the seeded sampler chooses from while active, in call order (one per position)."""
    choose = sampling.choose

    def recording(logits: torch.Tensor, keys: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        into.append(logits.detach().float().clone())
        return choose(logits, keys, params)

    with mock.patch.object(sampling, "choose", recording):
        yield


def generate_batch(
    world: World,
    prompts: list[list[int]],
    keys: list[tuple[int, int, int]],
    params: SamplingParams,
    order: list[int],
) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Generate every element in ``order``, in chunks of :data:`SAMPLING_CHUNK` unless ``order`` is the natural one
    (then one call): the completions, and for each element the (length, V) logits its tokens were chosen from."""
    chunks = (
        [order]
        if order == sorted(order)
        else [order[at : at + SAMPLING_CHUNK] for at in range(0, len(order), SAMPLING_CHUNK)]
    )
    completions: list[list[int]] = [[] for _ in prompts]
    logits: list[torch.Tensor | None] = [None] * len(prompts)
    stops = list(stop_token_ids(world.model, world.tokenizer))
    for chunk in chunks:
        steps: list[torch.Tensor] = []
        with recorded_logits(steps):
            out = sampling.generate(
                world.model,
                [prompts[i] for i in chunk],
                [keys[i] for i in chunk],
                params,
                SAMPLING_LENGTH,
                stops,
                world.tokenizer.pad_token_id,
            )
        for slot, element in enumerate(chunk):
            completions[element] = out[slot]
            logits[element] = torch.stack([steps[position][slot] for position in range(len(out[slot]))])
    return completions, logits


def measure_sampling(world: World) -> dict[str, SamplingFigures]:
    """Honest generation checked by :func:`~swarm.verify.checks.check_sampled` as an auditor runs it, per
    (generation class, auditor class): the peer generates under its class's autocast with 1 or 2 threads, the whole
    batch in one call or in shuffled chunks (other batch compositions and padding), under the knobs of
    :data:`SAMPLING_KNOBS`; the auditor checks under its own class with the other thread count, at the margin of
    the peer's declared class (widened to its own by ``check_sampled``)."""
    figures: dict[str, SamplingFigures] = {}
    sizes = world.sizes
    for generation_class, auditor_class in SAMPLING_PAIRS:
        pair = figures.setdefault(f"{generation_class} generation, {auditor_class} check", SamplingFigures())
        for index in range(sizes.sampling_batches):
            choice = random.Random(stable_seed("sampling", generation_class, auditor_class, index))
            epoch, peer = choice.randrange(sizes.epochs), choice.randrange(sizes.peers)
            params = SAMPLING_KNOBS[index % len(SAMPLING_KNOBS)]
            seed = stable_seed("sampling-seed", generation_class, auditor_class, index)
            rows = world.recipe.assigned_rows(RUN_ID, world.peer(peer), epoch, SAMPLING_PROMPTS)
            row_prompts = [prompt_token_ids(world.tokenizer, row["prompt"]) for row in rows]
            elements = [
                (row, generation) for row in range(len(rows)) for generation in range(NUM_GENERATIONS_TIMED)
            ]
            prompts = [row_prompts[row] for row, _ in elements]
            keys = [(seed, row, generation) for row, generation in elements]
            order = list(range(len(elements)))
            if index % 2:
                choice.shuffle(order)
            generate_threads = AUDIT_THREADS[index % len(AUDIT_THREADS)]
            model = world.at(epoch)
            with threads(generate_threads), autocast(DTYPES[generation_class]):
                completions, generated = generate_batch(world, prompts, keys, params, order)
            settings = GRPOSettings(
                num_generations=NUM_GENERATIONS_TIMED,
                max_completion_length=SAMPLING_LENGTH,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=params.min_p,
                seed=seed,
            )
            prompt_ids, prompt_mask = sampling.pad(prompts, world.tokenizer.pad_token_id)
            audit_threads = AUDIT_THREADS[(index + 1) % len(AUDIT_THREADS)]
            with threads(audit_threads), autocast(DTYPES[auditor_class]):
                result = check_sampled(
                    model,
                    prompt_ids,
                    prompt_mask,
                    completions,
                    elements,
                    settings,
                    SAMPLING_MARGIN[generation_class],
                    world.tokenizer.pad_token_id,
                )
                completion_ids, completion_mask = sampling.pad(
                    completions, world.tokenizer.pad_token_id, "right"
                )
                checked = sampling.completion_logits(
                    model, prompt_ids, prompt_mask, completion_ids, completion_mask
                )
            for element, logits in enumerate(generated):
                ours = checked[element, : len(logits)].float()
                scale = logits.abs().amax(dim=-1).clamp(min=1.0)
                difference = float(((ours - logits).abs().amax(dim=-1) / scale).max())
                pair.largest_difference = max(pair.largest_difference, difference)
            pair.batches += 1
            pair.completions += len(completions)
            pair.tokens_checked += result.checked
            pair.tie_positions += result.ties
            pair.false_positives += result.first_forged is not None
    return figures


def distribution(errors: Sequence[float]) -> dict[str, float | int | None]:
    """max, p99 (nearest rank) and median of relative errors."""
    if not errors:
        return {"n": 0, "max": None, "p99": None, "median": None}
    ordered = sorted(errors)
    rank = max(0, math.ceil(0.99 * len(ordered)) - 1)
    return {"n": len(ordered), "max": ordered[-1], "p99": ordered[rank], "median": statistics.median(ordered)}


def measure_precision(world: World) -> dict[str, list[float]]:
    """Relative errors of honest captures under bf16/fp16 autocast, replayed in fp32 and under the same autocast."""
    errors: dict[str, list[float]] = {}
    sizes = world.sizes
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for index in range(sizes.precision_captures):
            epoch, peer = index % sizes.epochs, index % sizes.peers
            settings = GRPOSettings(
                num_generations=NUM_GENERATIONS,
                seed=stable_seed(label, index),
                micro_batch_size=HONEST_SPLITS[index % len(HONEST_SPLITS)],
            )
            rows = world.rows(epoch, peer)
            with threads(AUDIT_THREADS[index % len(AUDIT_THREADS)]), autocast(dtype):
                contribution = capture_contribution(
                    world.at(epoch), world.tokenizer, world.recipe, rows, settings
                )
            for replay_dtype, replay_label in ((None, "fp32"), (dtype, label)):
                for count in AUDIT_THREADS:
                    with threads(count), autocast(replay_dtype):
                        result = world.replay(contribution, rows, math.inf)
                    errors.setdefault(f"{label} capture, {replay_label} replay", []).append(result.error)
    return errors


def measure_timing(world: World, steps: int, completion_length: int | None = None) -> dict[str, float]:
    """Mean wall time of an honest training step and of its replay, interleaved, at state θ_0 and the size of one
    epoch of the default config, with the process's thread count (the first pair is a warm-up and is left out).

    :param completion_length: completions of this many tokens instead of the recipe's (the default recipe's are 4
      tokens, far shorter than real RL completions: generation, which a replay skips, weighs little there)"""
    training = SwarmConfig().training
    rows = world.recipe.assigned_rows(RUN_ID, world.peer(0), 0, training.prompts_per_round)
    model = world.at(0)
    train, audit, generation, check = [], [], [], []
    for index in range(steps + 1):
        generated: list[float] = []

        def timed_sampler(
            request: sampling.SampleRequest, generated: list[float] = generated
        ) -> list[list[int]]:
            begun = time.perf_counter()
            completions = sampling.generate_request(request)
            generated.append(time.perf_counter() - begun)
            return completions

        settings = GRPOSettings(
            num_generations=training.num_generations,
            max_completion_length=completion_length or world.recipe.max_completion_length,
            temperature=training.temperature,
            seed=stable_seed("timing", index),
            learning_rate=training.learning_rate,
        )
        started = time.perf_counter()
        contribution = capture_contribution(
            model, world.tokenizer, world.recipe, rows, settings, sampler=timed_sampler
        )
        middle = time.perf_counter()
        result = world.replay(contribution, rows, GRADIENT_TOLERANCE["fp32"])
        ended = time.perf_counter()
        if not result.passed:
            raise BenchError(
                f"an honest timing step failed its replay: {result.verdict.value} {result.error:.3e}"
            )
        if index:  # the first pair is a warm-up
            train.append(middle - started)
            audit.append(ended - middle)
            generation.append(sum(generated))
            check.append(result.details["sampling_check_s"])
    return {
        "train_s": statistics.mean(train),
        "replay_s": statistics.mean(audit),
        "generation_s": statistics.mean(generation),  # inside the training step
        "sampling_check_s": statistics.mean(check),  # inside the replay
        "tokens_checked": result.details["tokens_checked"],
        "train_median_s": statistics.median(train),
        "replay_median_s": statistics.median(audit),
        "steps": len(train),
        "replays": len(audit),
        "rows": len(rows),
        "completions": len(rows) * training.num_generations,
        "completion_length": completion_length or world.recipe.max_completion_length,
    }


def check_cost(timing: dict[str, float], p: float) -> dict[str, float]:
    """The sampling check's own wall time (inside the replay) against the generation it verifies and the training
    step, and what it adds to training compute at audit probability ``p``."""
    return {
        "check_s": timing["sampling_check_s"],
        "over_generation": timing["sampling_check_s"] / timing["generation_s"],
        "over_training": timing["sampling_check_s"] / timing["train_s"],
        "overhead_fraction": p * timing["sampling_check_s"] / timing["train_s"],
        "overhead_fraction_without_check": p
        * (timing["replay_s"] - timing["sampling_check_s"])
        / timing["train_s"],
    }


def steps_to_catch(p: float, detection: float, confidence: float = 0.99) -> float:
    """Smallest n with 1 - (1 - p d)^n >= confidence (inf when p d = 0)."""
    chance = p * detection
    if chance <= 0:
        return math.inf
    if chance >= 1:
        return 1.0
    return float(math.ceil(math.log(1 - confidence) / math.log(1 - chance) - 1e-12))


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass
class Results:
    p: float
    sizes: Sizes
    attacks: dict[str, AttackFigures]
    honest: HonestFigures
    precision: dict[str, list[float]]
    timing: dict[str, float]
    timing_unfrozen: dict[str, float]
    timing_longer: dict[str, float]
    sampling: dict[str, SamplingFigures]
    runtime_s: float
    load_average: float
    phase_s: dict[str, float]

    @property
    def lowest_detection(self) -> float:
        return min(f.detected / f.audits for f in self.attacks.values()) if self.attacks else 0.0

    @property
    def tokens_checked(self) -> int:
        """Honest completion tokens the sampling check recomputed: in the honest audits and the sampling phase."""
        return self.honest.tokens_checked + sum(f.tokens_checked for f in self.sampling.values())

    @property
    def tie_fraction(self) -> float | None:
        ties = self.honest.tie_positions + sum(f.tie_positions for f in self.sampling.values())
        return ties / self.tokens_checked if self.tokens_checked else None

    @property
    def raw_ratio(self) -> float:
        return self.timing["replay_s"] / self.timing["train_s"]

    def as_json(self) -> dict[str, Any]:
        precision = {"fp32 capture, fp32 replay": distribution(self.honest.errors)}
        precision.update({name: distribution(errors) for name, errors in self.precision.items()})
        return {
            "attacks": {
                name: {"audits": f.audits, "detected": f.detected} for name, f in self.attacks.items()
            },
            "honest": {
                "audits": self.honest.audits,
                "false_positives": self.honest.false_positives
                + sum(f.false_positives for f in self.sampling.values()),
                "tokens_checked": self.tokens_checked,
            },
            "overhead_fraction": self.p * self.raw_ratio,
            "contributions_to_catch_p99": steps_to_catch(self.p, self.lowest_detection),
            "details": {
                "p": self.p,
                "lowest_detection_rate": self.lowest_detection,
                "replay_over_train": self.raw_ratio,
                "replay_over_train_medians": self.timing["replay_median_s"] / self.timing["train_median_s"],
                "timing": self.timing,
                "timing_before_gc_freeze": self.timing_unfrozen,
                "honest_phase_timing": self.honest.timing(),
                "timing_longer_completions": self.timing_longer,
                "overhead_fraction_longer_completions": self.p
                * self.timing_longer["replay_s"]
                / self.timing_longer["train_s"],
                "sampling_check": {
                    "honest_by_class": {
                        name: f.as_json(
                            max(SAMPLING_MARGIN[name.split()[0]], SAMPLING_MARGIN[name.split()[2]])
                        )
                        for name, f in self.sampling.items()
                    },
                    "tie_fraction": self.tie_fraction,
                    "cost": {
                        label: check_cost(timing, self.p)
                        for label, timing in (
                            ("default", self.timing),
                            ("longer_completions", self.timing_longer),
                        )
                    },
                },
                "attacks": {name: f.as_json() for name, f in self.attacks.items()},
                "honest": {
                    "audit_tokens_checked": self.honest.tokens_checked,
                    "audit_tie_positions": self.honest.tie_positions,
                    "audit_false_positives": self.honest.false_positives,
                    "captures": self.honest.captures,
                    "verdicts": dict(self.honest.verdicts),
                    "captures_by_micro_batch": dict(self.honest.by_split),
                },
                "relative_error": precision,
                "sizes": self.sizes.__dict__,
                "audit_threads": list(AUDIT_THREADS),
                "runtime_s": self.runtime_s,
                "phase_s": self.phase_s,
                "load_average": self.load_average,
            },
        }


def run_benchmark(root: Path, sizes: Sizes, p: float, attacks: Sequence[str]) -> Results:
    started = time.monotonic()
    load_average = os.getloadavg()[0]
    log(f"load average {load_average:.2f} on {os.cpu_count()} CPUs; sizes {sizes}")
    phase_s: dict[str, float] = {}

    def phase(name: str, work: Callable[[], Any]) -> Any:
        begun = time.monotonic()
        value = work()
        phase_s[name] = round(time.monotonic() - begun, 1)
        return value

    world = phase("setup", lambda: build_world(root, sizes))
    log(f"chain of {sizes.epochs} states x {sizes.peers} peers ready in {phase_s['setup']}s")
    unfrozen = phase("timing_before_gc_freeze", lambda: measure_timing(world, sizes.timing_steps))
    gc.collect()
    gc.freeze()
    figures = {}
    for name in attacks:
        figures[name] = phase(f"attack {name}", lambda name=name: measure_attack(world, name))
        f = figures[name]
        log(f"{name}: {f.detected}/{f.audits} detected ({dict(f.verdicts)}) in {phase_s[f'attack {name}']}s")
    honest = phase("honest", lambda: measure_honest(world))
    log(f"honest: {honest.false_positives}/{honest.audits} false positives in {phase_s['honest']}s")
    timing = phase("timing", lambda: measure_timing(world, sizes.timing_steps))
    longer = phase("timing_longer", lambda: measure_timing(world, sizes.timing_steps, LONGER_COMPLETIONS))
    log(
        f"timing: train {timing['train_s'] * 1e3:.0f} ms, replay {timing['replay_s'] * 1e3:.0f} ms per step"
        f" (before gc.freeze: {unfrozen['train_s'] * 1e3:.0f} / {unfrozen['replay_s'] * 1e3:.0f} ms)"
    )
    precision = phase("precision", lambda: measure_precision(world))
    log(f"precision: done in {phase_s['precision']}s")
    sampled = phase("sampling", lambda: measure_sampling(world))
    log(
        f"sampling: {sum(f.tokens_checked for f in sampled.values())} honest tokens checked, "
        f"{sum(f.false_positives for f in sampled.values())} false positives in {phase_s['sampling']}s"
    )
    return Results(
        p=p,
        sizes=sizes,
        attacks=figures,
        honest=honest,
        precision=precision,
        timing=timing,
        timing_unfrozen=unfrozen,
        timing_longer=longer,
        sampling=sampled,
        runtime_s=round(time.monotonic() - started, 1),
        load_average=load_average,
        phase_s=phase_s,
    )


# ---- output ------------------------------------------------------------------------------------------------
def _error(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def print_tables(results: Results) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # a pipe gets the whole table
    data = results.as_json()
    per_capture = len(AUDIT_THREADS)
    table = Table(title=f"Attacks: detection by replay ({per_capture} audits per capture: 1 and 2 threads)")
    for column in (
        "attack",
        "expected verdict",
        "captures",
        "audits",
        "detected",
        "rate",
        "verdicts",
        "min error",
    ):
        table.add_column(
            column, justify="left" if column in ("attack", "expected verdict", "verdicts") else "right"
        )
    for name, figures in results.attacks.items():
        verdicts = ", ".join(f"{count} {kind}" for kind, count in sorted(figures.verdicts.items()))
        table.add_row(
            name,
            figures.expected,
            str(figures.captures),
            str(figures.audits),
            str(figures.detected),
            f"{figures.detected / figures.audits:.1%}",
            verdicts,
            _error(min(figures.errors) if figures.errors else None),
        )
    console.print(table)

    honest = results.honest
    table = Table(title="Honest peers (threads 1/2, micro-batch split none/8/4/2, recorded order)")
    for column in ("captures", "audits", "false positives", "verdicts", "tokens sampling-checked", "ties"):
        table.add_column(column, justify="right")
    table.add_row(
        str(honest.captures),
        str(honest.audits),
        str(honest.false_positives),
        ", ".join(f"{count} {kind}" for kind, count in sorted(honest.verdicts.items())),
        str(honest.tokens_checked),
        str(honest.tie_positions),
    )
    console.print(table)

    table = Table(
        title=f"Honest sampling check by precision ({SAMPLING_PROMPTS} prompts x {NUM_GENERATIONS_TIMED} completions"
        f" of <= {SAMPLING_LENGTH} tokens per batch; threads 1/2, one call or shuffled chunks, 4 sampling knobs)"
    )
    for column in (
        "generation, check",
        "batches",
        "tokens checked",
        "false positives",
        "tie fraction",
        "largest logit difference",
        "margin",
        "difference / margin",
    ):
        table.add_column(column, justify="left" if column == "generation, check" else "right")
    for name, figures in data["details"]["sampling_check"]["honest_by_class"].items():
        table.add_row(
            name,
            str(figures["batches"]),
            str(figures["tokens_checked"]),
            str(figures["false_positives"]),
            "" if figures["tie_fraction"] is None else f"{figures['tie_fraction']:.2e}",
            _error(figures["largest_difference"]),
            f"{figures['margin']:.0e}",
            f"{figures['largest_difference_over_margin']:.3f}",
        )
    console.print(table)
    ties = results.tie_fraction
    console.print(
        f"honest tokens sampling-checked: {results.tokens_checked} in all, {data['honest']['false_positives']} false"
        f" positives, {'n/a' if ties is None else f'{ties:.2e}'} of positions inside the tie margin"
    )
    for label, cost in data["details"]["sampling_check"]["cost"].items():
        console.print(
            f"sampling check ({label} completions): {cost['check_s'] * 1e3:.1f} ms per audit ="
            f" {cost['over_generation']:.3f} of the generation it verifies, {cost['over_training']:.3f} of a training"
            f" step; at p = {results.p:g} it adds {cost['overhead_fraction']:.2%} of training compute (the rest of"
            f" the audit {cost['overhead_fraction_without_check']:.2%})"
        )

    table = Table(
        title=f"Honest relative L2 error by precision (fp32 tolerance: {GRADIENT_TOLERANCE['fp32']:.0e})"
    )
    for column in ("capture, replay", "replays", "max", "p99", "median"):
        table.add_column(column, justify="left" if column == "capture, replay" else "right")
    for name, stats in data["details"]["relative_error"].items():
        table.add_row(
            name, str(stats["n"]), _error(stats["max"]), _error(stats["p99"]), _error(stats["median"])
        )
    console.print(table)

    timing = results.timing
    console.print(
        f"training step {timing['train_s'] * 1e3:.1f} ms, replay {timing['replay_s'] * 1e3:.1f} ms (means of "
        f"{timing['steps']} honest steps of {timing['completions']} completions, the default config's epoch, and their"
        f" {timing['replays']} replays): replay / train = {results.raw_ratio:.3f}; at p = {results.p:g} verification costs "
        f"{data['overhead_fraction']:.1%} of training compute"
    )
    console.print(
        f"lowest detection rate {results.lowest_detection:.1%}: {data['contributions_to_catch_p99']:g} "
        f"contributions of a cheater to catch it with 99% probability at p = {results.p:g}"
    )
    console.print(
        f"medians: training step {timing['train_median_s'] * 1e3:.1f} ms, replay {timing['replay_median_s'] * 1e3:.1f}"
        f" ms, ratio {timing['replay_median_s'] / timing['train_median_s']:.3f} (the means carry the shared machine's"
        " stalls)"
    )
    longer = results.timing_longer
    console.print(
        f"with {longer['completion_length']}-token completions: training step {longer['train_s'] * 1e3:.1f} ms, replay"
        f" {longer['replay_s'] * 1e3:.1f} ms: verification costs {data['details']['overhead_fraction_longer_completions']:.1%}"
        f" of training compute at p = {results.p:g}"
    )
    before = results.timing_unfrozen
    console.print(
        f"before gc.freeze: training step {before['train_s'] * 1e3:.0f} ms, replay {before['replay_s'] * 1e3:.0f} ms"
        " (accelerate's gc.collect per Trainer.train)"
    )
    console.print(
        f"load average at start {results.load_average:.2f} on {os.cpu_count()} CPUs; "
        f"benchmark took {results.runtime_s:.0f}s"
    )


# ---- command line ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few audits of each kind")
    default_p = VerifyConfig().audit_probability
    parser.add_argument(
        "--p",
        type=float,
        default=default_p,
        help=f"audit probability (default: the config's verify.audit_probability, {default_p:g})",
    )
    parser.add_argument(
        "--captures", type=int, help=f"cheating captures per attack (default {FULL.captures})"
    )
    parser.add_argument("--honest", type=int, help=f"honest captures (default {FULL.honest})")
    parser.add_argument(
        "--sampling-batches",
        type=int,
        help=f"honest generation batches per precision pair (default {FULL.sampling_batches})",
    )
    parser.add_argument("--attacks", help="comma-separated attack names (default: all)")
    args = parser.parse_args(argv)
    if not 0 < args.p <= 1:
        parser.error("--p must be in (0, 1]")
    base = QUICK if args.quick else FULL
    given = (
        ("captures", args.captures),
        ("honest", args.honest),
        ("sampling_batches", args.sampling_batches),
    )
    changes = {key: value for key, value in given if value}
    args.sizes = Sizes(**{**base.__dict__, **changes})
    names = args.attacks.split(",") if args.attacks else list(ATTACKS)
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    args.attack_names = names
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="swarm-bench-verify-"))
    try:
        results = run_benchmark(root, args.sizes, args.p, args.attack_names)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results.as_json()))
    else:
        print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
