"""What the model produced in an epoch, read from the recording GRPO trainer: every rollout's prompt, completion
and reward per reward function (for the completions log, per-function reward means and trackers)."""

from __future__ import annotations

import math
from typing import Any


def _text(completion: Any) -> str:
    """A completion as text (TRL passes conversational completions as lists of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(
            str(message.get("content", "")) if isinstance(message, dict) else str(message)
            for message in completion
        )
    return str(completion)


def rollout_samples(trl_trainer: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """``{prompt, completion, reward, rewards: {function: value}}`` for every rollout the trainer scored this
    epoch, in TRL's order; ``reward`` is TRL's weighted sum of the functions that applied (a None score — "not
    applicable" to TRL — is left out). Empty when the trainer recorded no rollouts."""
    record = getattr(trl_trainer, "record", None)
    if record is None or record.rewards is None or record.completions is None:
        return []
    names = list(getattr(trl_trainer, "reward_func_names", [])) or [
        f"reward_{i}" for i in range(record.rewards.shape[1])
    ]
    weights = getattr(trl_trainer, "reward_weights", None)
    weights = [float(w) for w in weights.tolist()] if weights is not None else [1.0] * len(names)
    prompts = record.prompt_token_ids or []
    samples = []
    for index, completion in enumerate(record.completions):
        scores = [float(value) for value in record.rewards[index].tolist()]
        rewards = {name: score for name, score in zip(names, scores) if not math.isnan(score)}
        total = sum(weight * score for weight, score in zip(weights, scores) if not math.isnan(score))
        prompt = tokenizer.decode(prompts[index], skip_special_tokens=True) if index < len(prompts) else ""
        samples.append(dict(prompt=prompt, completion=_text(completion), reward=total, rewards=rewards))
    return samples


def reward_means(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Each reward function's mean over the rollouts it applied to (TRL's ``rewards/<function>/mean``)."""
    totals: dict[str, list[float]] = {}
    for sample in samples:
        for name, value in sample["rewards"].items():
            totals.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in totals.items()}
