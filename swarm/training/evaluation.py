"""Held-out evaluation: what the model answers on rows it is not trained on, greedy and sampled, scored by the
recipe's own reward functions.

The rows are the recipe's ``eval_rows`` when it defines them, else rows of its generator drawn from a seed space
that training never uses (``Recipe.eval_rows``). Every peer of a swarm holds the same parameters after an averaged
round and evaluates the same rows, so their figures agree. Figures are named like TRL's: ``eval/greedy/reward``,
``eval/greedy/<function>``, and the same under ``eval/sampled``; with a correctness function (a recipe's first
reward function by default) ``eval/greedy/<function>`` is the share of exact answers when it scores 0 or 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from swarm.recipe import Recipe

EVAL_SEED = 1234  # the sampled pass's generator: the same draws on every peer and at every evaluation


def _generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, sample: bool, temperature: float
) -> list[str]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues each prompt from its last token
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if sample:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # training's random state stays as it was
        torch.manual_seed(EVAL_SEED)
        output = model.generate(**batch, **options)
    completions = output[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


def _scores(recipe: Recipe, rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    prompts = [row["prompt"] for row in rows]
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    figures: dict[str, float] = {}
    total = [0.0] * len(rows)
    for func in recipe.checked_reward_funcs():
        values = func(prompts=prompts, completions=completions, **columns)
        applied = [
            (index, float(value))
            for index, value in enumerate(values)
            if value is not None and not math.isnan(float(value))
        ]
        for index, value in applied:
            total[index] += value
        if applied:
            figures[getattr(func, "__name__", "reward")] = sum(value for _, value in applied) / len(applied)
    figures["reward"] = sum(total) / len(total)
    return figures


def evaluate(
    model: Any,
    tokenizer: Any,
    recipe: Recipe,
    rows: list[dict[str, Any]],
    max_new_tokens: int,
    temperature: float,
    examples: int = 4,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """(figures, examples): ``eval/greedy/...`` and ``eval/sampled/...`` figures over ``rows`` (module
    docstring) with ``eval/rows``, and the first ``examples`` prompts with the model's greedy answer. The model is
    left in the mode it was in."""
    if not rows:
        return {}, []
    training = model.training
    model.eval()
    try:
        figures: dict[str, float] = {"eval/rows": float(len(rows))}
        prompts = [row["prompt"] for row in rows]
        shown: list[dict[str, str]] = []
        for name, sample in (("greedy", False), ("sampled", True)):
            completions = _generate(model, tokenizer, prompts, max_new_tokens, sample, temperature)
            figures.update(
                {f"eval/{name}/{key}": value for key, value in _scores(recipe, rows, completions).items()}
            )
            if not sample:
                shown = [
                    dict(prompt=prompt, completion=answer) for prompt, answer in zip(prompts, completions)
                ]
        return figures, shown[:examples]
    finally:
        model.train(training)
