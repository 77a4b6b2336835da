"""GRPO on a mix of reasoning-gym tasks (the RL-Swarm task family), scored by reasoning-gym's own verifiers.

Each row is one question from one task of the mix: the task is drawn by ``weights``, the question is item
``index`` of that task's procedural dataset, built from this recipe's options and ``seed``. The reward rebuilds
that item from (task, index) and the recipe's own options, and scores the completion with the dataset's
``score_answer`` — it trusts nothing but the row's task/index and the completion (not an answer carried in the
row, nor anything a peer claims). Works offline; needs the ``reasoning-gym`` package.

Options:

* ``tasks``: reasoning-gym dataset names (default ``["basic_arithmetic", "chain_sum", "leg_counting"]``); a
  dict ``{name: weight}`` is accepted too. ``python -c "import reasoning_gym.factory as f; print(sorted(f.DATASETS))"``
  lists them all.
* ``weights``: relative weight of each task (default: equal).
* ``difficulty``: a curriculum level (0 = easiest) applied to every task that has a reasoning-gym curriculum;
  default: each dataset's own defaults.
* ``config``: per-task dataset settings, ``{task: {key: value}}`` (e.g. ``{chain_sum: {max_terms: 3}}``),
  applied on top of ``difficulty``.
* ``seed``: seed of the procedural datasets (default 0); ``size``: how many distinct items per task rows are
  drawn from (default 100000).
* ``instruction``: appended to every question (default: answer with only the final answer).
* ``max_completion_length``: default 32.

A completion is scored after stripping spaces; an ``<answer>...</answer>`` span, if present, is scored instead.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from swarm.errors import UserError
from swarm.recipe import Recipe

DEFAULT_TASKS = ("basic_arithmetic", "chain_sum", "leg_counting")
DEFAULT_INSTRUCTION = "\nAnswer with only the final answer, nothing else."
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _task_weights(options: dict[str, Any]) -> tuple[list[str], list[float]]:
    tasks = options.get("tasks", list(DEFAULT_TASKS))
    if isinstance(tasks, str):
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    if isinstance(tasks, dict):
        names, weights = [str(name) for name in tasks], [float(weight) for weight in tasks.values()]
    else:
        names = [str(name) for name in tasks]
        weights = [float(weight) for weight in options.get("weights") or [1.0] * len(names)]
    if not names:
        raise UserError("option 'tasks' is empty: name at least one reasoning-gym dataset")
    if len(weights) != len(names):
        raise UserError(f"option 'weights' has {len(weights)} values for {len(names)} tasks")
    if any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise UserError(f"option 'weights' must be non-negative with a positive sum, got {weights}")
    return names, weights


def _make_dataset(name: str, difficulty: int | None, overrides: dict[str, Any], seed: int, size: int):
    from reasoning_gym.factory import CURRICULA, DATASETS

    if name not in DATASETS:
        raise UserError(f"unknown reasoning-gym task {name!r} (known: {', '.join(sorted(DATASETS))})")
    dataset_cls, config_cls = DATASETS[name]
    if difficulty is not None and name in CURRICULA:
        curriculum = CURRICULA[name]()
        curriculum.set_global_level(int(difficulty))
        config = curriculum.generate_configuration({"seed": seed, "size": size})
    else:
        config = config_cls(seed=seed, size=size)
    try:
        config = dataclasses.replace(config, **overrides, seed=seed, size=size)
        if hasattr(config, "validate"):
            config.validate()
        return dataset_cls(config=config)
    except (TypeError, ValueError, AssertionError) as error:
        raise UserError(f"task {name}: bad config {overrides}: {type(error).__name__}: {error}") from None


def extract_answer(completion: str) -> str:
    match = ANSWER_TAG.search(completion)
    return (match.group(1) if match else completion).strip()


def build(options: dict[str, Any]) -> Recipe:
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        raise UserError("needs the reasoning-gym package: pip install reasoning-gym") from None
    names, weights = _task_weights(options)
    difficulty = options.get("difficulty")
    per_task = options.get("config") or {}
    unknown = set(per_task) - set(names)
    if unknown:
        raise UserError(f"option 'config' names tasks that are not in 'tasks': {', '.join(sorted(unknown))}")
    seed, size = int(options.get("seed", 0)), int(options.get("size", 100_000))
    if size < 1:
        raise UserError(f"option 'size' must be at least 1, got {size}")
    instruction = str(options.get("instruction", DEFAULT_INSTRUCTION))
    datasets = {
        name: _make_dataset(name, difficulty, dict(per_task.get(name) or {}), seed, size) for name in names
    }
    cumulative = []
    total = 0.0
    for weight in weights:
        total += weight
        cumulative.append(total)

    def make_example(rng: random.Random) -> dict[str, Any]:
        task = rng.choices(names, cum_weights=cumulative)[0]
        index = rng.randrange(size)
        entry = datasets[task][index]
        return {"prompt": f"{entry['question']}{instruction}", "task": task, "index": index}

    def correct(prompts, completions, task, index, **_):
        """reasoning-gym's score for the completion (1.0 = right), from the item rebuilt from (task, index)."""
        scores = []
        for completion, name, item in zip(completions, task, index):
            dataset = datasets.get(name)
            if dataset is None or not isinstance(item, int) or not 0 <= item < size:
                scores.append(0.0)  # a row this recipe cannot have made: no reward
                continue
            entry = dataset[item]
            scores.append(float(dataset.score_answer(extract_answer(completion), entry)))
        return scores

    def short_answer(prompts, completions, **_):
        """Up to 0.1 for a short one-line answer, so a fresh model's completions already differ in reward."""
        return [
            0.1 if 0 < len(text := extract_answer(c)) <= 12 and "\n" not in text else 0.0 for c in completions
        ]

    def reference_answer(row: dict[str, Any]) -> str:
        """reasoning-gym's own answer to the row's item: what an SFT warm start trains on."""
        return str(datasets[row["task"]][row["index"]]["answer"])

    return Recipe(
        name="reasoning_gym",
        trainer="grpo",
        make_example=make_example,
        reward_funcs=[correct, short_answer],
        alphabet=None,
        max_completion_length=int(options.get("max_completion_length", 32)),
        warm_start_completion=reference_answer,
        metadata={"tasks": dict(zip(names, weights)), "difficulty": difficulty, "seed": seed, "size": size},
    )
