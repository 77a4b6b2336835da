"""SFT warm start on the arithmetic task: the model is shown "3+4=" -> "7" (loss on the completion only).

Options: ``max_operand`` (default 9), ``operators`` (default "+").
"""

import random

from swarm.recipe import Recipe


def build(options):
    max_operand = int(options.get("max_operand", 9))
    operators = str(options.get("operators", "+"))

    def make_example(rng: random.Random):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(operators)
        a, b = (a, b) if op != "-" else (max(a, b), min(a, b))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return {"prompt": f"{a}{op}{b}=", "completion": str(value)}

    return Recipe(
        name="arithmetic_sft",
        trainer="sft",
        make_example=make_example,
        alphabet="0123456789+-*= ",
        max_completion_length=4,
    )
