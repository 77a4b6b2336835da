"""SFT warm start on the arithmetic task: the model is shown "3+4=" -> "7" (loss on the completion only).

Same generator and options as ``arithmetic`` (``max_operand``, ``operators``), with the answer as the completion.
"""

from swarm.recipe import Recipe, load_recipe


def build(options):
    task = load_recipe("arithmetic", options)

    def make_example(rng):
        row = task.make_example(rng)
        return {"prompt": row["prompt"], "completion": row["answer"]}

    return Recipe(
        name="arithmetic_sft",
        trainer="sft",
        make_example=make_example,
        alphabet=task.alphabet,
        max_completion_length=task.max_completion_length,
    )
