"""Offline default: GRPO on procedurally generated sums ("3+4=" -> "7"), for a tiny model on a CPU.

Two rewards: ``correct`` (1.0 for the exact answer) and ``format`` (up to 0.5 for a bare number), so a randomly
initialised model gets a first reward at once and the mean reward rises within a few epochs.
The reference answer is the row's ``answer``, so the recipe can be warm-started with SFT (the ``warm_start`` config
section; the offline default does). Options: ``max_operand`` (default 9), ``operators`` (default "+").
"""

import random

from swarm.recipe import Recipe


def correct(prompts, completions, answer, **_):
    return [
        1.0 if completion.strip() == expected else 0.0 for completion, expected in zip(completions, answer)
    ]


def number_format(prompts, completions, **_):
    scores = []
    for completion in completions:
        text = completion.strip()
        if text.isdigit() and len(text) <= 3:
            scores.append(0.5)
        else:  # partial credit for the share of digits, so the first rollouts already differ in reward
            scores.append(0.25 * sum(char.isdigit() for char in text) / max(len(text), 1))
    return scores


def build(options):
    max_operand = int(options.get("max_operand", 9))
    operators = str(options.get("operators", "+"))

    def make_example(rng: random.Random):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(operators)
        a, b = (a, b) if op != "-" else (max(a, b), min(a, b))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return {"prompt": f"{a}{op}{b}=", "answer": str(value)}

    return Recipe(
        name="arithmetic",
        trainer="grpo",
        make_example=make_example,
        reward_funcs=[correct, number_format],
        alphabet="0123456789+-*= ",
        max_completion_length=4,
        warm_start_completion=lambda row: row["answer"],
    )
