"""The shipped reasoning_gym and jsonl recipes, and the checks that turn bad recipe output into one clear error."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import pytest

from swarm.errors import UserError
from swarm.recipe import Recipe, load_recipe

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _hermetic_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_RECIPE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)


def call(func, rows: list[dict], completions: list[str]) -> list:
    """Call a reward function the way TRL does: every other row field as a keyword list."""
    extra = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    return func(prompts=[row["prompt"] for row in rows], completions=completions, **extra)


def by_name(recipe: Recipe, name: str):
    return next(func for func in recipe.checked_reward_funcs() if func.__name__ == name)


# ---- reasoning_gym --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gym() -> Recipe:
    return load_recipe("reasoning_gym")


def true_answers(rows: list[dict]) -> list[str]:
    """Each row's answer, straight from reasoning-gym's dataset with the recipe's default settings."""
    from reasoning_gym import create_dataset

    return [create_dataset(row["task"], seed=0, size=100_000)[row["index"]]["answer"] for row in rows]


def test_reasoning_gym_rows_are_deterministic_and_serialisable(gym: Recipe) -> None:
    assert gym.trainer == "grpo"
    assert gym.make_example(random.Random(7)) == gym.make_example(random.Random(7))
    rows = gym.assigned_rows("run", "peer", 0, 24)
    # anyone can regenerate them
    assert rows == load_recipe("reasoning_gym").assigned_rows("run", "peer", 0, 24)
    assert rows != gym.assigned_rows("run", "peer", 1, 24)
    assert json.loads(json.dumps(rows)) == rows
    assert {row["task"] for row in rows} == {"basic_arithmetic", "chain_sum", "leg_counting"}
    for row in rows:
        assert "only the final answer" in row["prompt"]
        assert set(row["prompt"]) <= set(gym.tokenizer_alphabet())


def test_reasoning_gym_rewards_the_true_answer_only(gym: Recipe) -> None:
    rows = gym.assigned_rows("run", "peer", 0, 24)
    answers = true_answers(rows)
    correct = by_name(gym, "correct")
    assert call(correct, rows, answers) == [1.0] * len(rows)
    assert call(correct, rows, [f"  {answer}\n" for answer in answers]) == [1.0] * len(rows)
    assert call(correct, rows, [f"<answer>{answer}</answer>" for answer in answers]) == [1.0] * len(rows)
    wrong = call(correct, rows, [f"{answer}1" for answer in answers])
    assert all(score < 1.0 for score in wrong)
    total_right = [sum(s) for s in zip(*(call(f, rows, answers) for f in gym.checked_reward_funcs()))]
    total_wrong = [
        sum(s) for s in zip(*(call(f, rows, ["no idea"] * len(rows)) for f in gym.checked_reward_funcs()))
    ]
    assert all(w < r for w, r in zip(total_wrong, total_right))


def test_reasoning_gym_reward_trusts_only_task_and_index(gym: Recipe) -> None:
    rows = gym.assigned_rows("run", "peer", 0, 4)
    answers = true_answers(rows)
    correct = by_name(gym, "correct")
    # a row whose prompt was swapped for another question is still scored against its own (task, index)
    forged = [dict(row, prompt="What is 1+1?") for row in rows]
    assert call(correct, forged, answers) == [1.0] * 4
    assert call(correct, forged, ["2"] * 4) == [0.0 if a != "2" else 1.0 for a in answers]
    # rows this recipe cannot have made earn nothing
    alien = [dict(rows[0], task="spell_backward"), dict(rows[1], index=-1), dict(rows[2], index=10**9)]
    assert call(correct, alien, answers[:3]) == [0.0, 0.0, 0.0]


def test_reasoning_gym_options() -> None:
    recipe = load_recipe("reasoning_gym", {"tasks": ["chain_sum", "spell_backward"], "weights": [0, 1]})
    rows = recipe.assigned_rows("run", "peer", 0, 12)
    assert {row["task"] for row in rows} == {"spell_backward"}
    small = load_recipe("reasoning_gym", {"tasks": ["chain_sum"], "config": {"chain_sum": {"max_terms": 2}}})
    big = load_recipe("reasoning_gym", {"tasks": ["chain_sum"], "difficulty": 4})

    def terms(recipe) -> int:
        return max(
            row["prompt"].count(" + ") + row["prompt"].count(" - ")
            for row in recipe.assigned_rows("x", "y", 0, 32)
        )

    assert terms(small) <= 1 < terms(big)
    with pytest.raises(UserError, match="no_such_task"):
        load_recipe("reasoning_gym", {"tasks": ["chain_sum", "no_such_task"]})
    with pytest.raises(UserError, match="weights"):
        load_recipe("reasoning_gym", {"tasks": ["chain_sum"], "weights": [1, 2]})


# ---- jsonl ------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("\n".join(item if isinstance(item, str) else json.dumps(item) for item in items) + "\n")
    return path


def test_jsonl_sft_rows_come_from_the_file(tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": f"{i}>", "completion": str(i * 2)} for i in range(10)]
    )
    recipe = load_recipe("jsonl", {"path": str(data)})
    assert recipe.trainer == "sft"
    rows = recipe.assigned_rows("run", "peer", 0, 40)
    assert rows == load_recipe("jsonl", {"path": str(data)}).assigned_rows("run", "peer", 0, 40)
    assert all(row["completion"] == str(int(row["prompt"][:-1]) * 2) for row in rows)
    assert len({row["prompt"] for row in rows}) > 5  # drawn from across the file


def test_jsonl_grpo_with_custom_fields_rewards_exact_match(tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "qa.jsonl", [{"q": "ab>", "a": "ba"}, "", {"q": "cd>", "a": "dc", "extra": 1}]
    )
    recipe = load_recipe(
        "jsonl", {"path": str(data), "trainer": "grpo", "prompt_field": "q", "completion_field": "a"}
    )
    assert recipe.trainer == "grpo"
    rows = recipe.assigned_rows("run", "peer", 0, 8)
    assert {row["prompt"] for row in rows} == {"ab>", "cd>"}
    (exact,) = recipe.checked_reward_funcs()
    expected = [row["prompt"][:-1][::-1] for row in rows]
    assert call(exact, rows, [f" {e} " for e in expected]) == [1.0] * 8
    assert call(exact, rows, [e + "x" for e in expected]) == [0.0] * 8


@pytest.mark.parametrize(
    "lines, fragment",
    [
        ([{"prompt": "a", "completion": "b"}, "", "{not json"], "line 3: not valid JSON"),
        ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "line 2: missing field 'completion'"),
        ([{"prompt": 1, "completion": "b"}], "line 1: field 'prompt' must be a string"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        ([""], "no rows"),
    ],
)
def test_jsonl_bad_file_names_file_and_line(tmp_path: Path, lines: list, fragment: str) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError) as caught:
        load_recipe("jsonl", {"path": str(data)})
    assert str(data) in str(caught.value) and fragment in str(caught.value)


def test_jsonl_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'path' is required"):
        load_recipe("jsonl", {})
    absent = tmp_path / "absent.jsonl"
    with pytest.raises(UserError, match=str(absent)):
        load_recipe("jsonl", {"path": str(absent)})


# ---- checked reward functions and rows ------------------------------------------------------------------------
def recipe_with(*funcs, make_example=None, trainer="grpo") -> Recipe:
    return Recipe(
        name="faulty",
        trainer=trainer,
        reward_funcs=list(funcs),
        make_example=make_example or (lambda rng: {"prompt": str(rng.randint(0, 9)), "answer": "1"}),
    )


def nan_reward(prompts, completions, **_):
    return [math.nan for _ in completions]


def short_reward(prompts, completions, **_):
    return [1.0 for _ in completions[1:]]


def raising_reward(prompts, completions, answer, **_):
    return [1.0 / 0 for _ in completions]


def dict_reward(prompts, completions, **_):
    return {"score": 1.0}


def text_reward(prompts, completions, **_):
    return ["1.0" for _ in completions]


def inf_reward(prompts, completions, **_):
    return [math.inf for _ in completions]


@pytest.mark.parametrize(
    "func, fragment",
    [
        (nan_reward, "returned nan for completion 0"),
        (inf_reward, "returned inf"),
        (short_reward, "returned 2 values for 3 completions"),
        (raising_reward, "raised ZeroDivisionError"),
        (dict_reward, "must return a list"),
        (text_reward, "returned str"),
    ],
)
def test_bad_reward_output_names_recipe_and_function(func, fragment: str) -> None:
    recipe = recipe_with(func)
    (checked,) = recipe.checked_reward_funcs()
    assert checked.__name__ == func.__name__  # TRL logs rewards by this name
    rows = recipe.assigned_rows("run", "peer", 0, 3)
    with pytest.raises(UserError) as caught:
        call(checked, rows, ["1", "2", "3"])
    message = str(caught.value)
    assert (
        "recipe faulty" in message and f"reward function {func.__name__}" in message and fragment in message
    )
    assert "\n" not in message


def test_good_reward_output_passes_through_unchanged() -> None:
    def sometimes(prompts, completions, **_):
        return [None, 0.5, 1]

    async def later(prompts, completions, **_):
        return [0.0, 0.0, 0.0]

    async def later_nan(prompts, completions, **_):
        return [0.0, math.nan, 0.0]

    recipe = recipe_with(sometimes, later, later_nan)
    plain, asynchronous, async_nan = recipe.checked_reward_funcs()
    rows = recipe.assigned_rows("run", "peer", 0, 3)
    assert call(plain, rows, ["a", "b", "c"]) == [None, 0.5, 1]  # None: "not applicable", allowed
    assert asyncio.run(call(asynchronous, rows, ["a", "b", "c"])) == [0.0, 0.0, 0.0]
    with pytest.raises(UserError, match="later_nan returned nan"):
        asyncio.run(call(async_nan, rows, ["a", "b", "c"]))


def test_make_example_that_raises_names_recipe_and_row() -> None:
    def make_example(rng: random.Random) -> dict:
        if rng.random() < 0.5:
            raise KeyError("question")
        return {"prompt": "1+1="}

    with pytest.raises(UserError) as caught:
        recipe_with(make_example=make_example).assigned_rows("run", "peer", 0, 16)
    message = str(caught.value)
    assert "recipe faulty" in message and "make_example raised KeyError" in message and "row " in message


@pytest.mark.parametrize(
    "row, trainer, fragment",
    [
        (
            {"question": "1+1="},
            "grpo",
            "row 0: make_example must return a dict with a 'prompt' string; field 'prompt' is missing",
        ),
        ({"prompt": 3}, "grpo", "field 'prompt' is a int"),
        ({"prompt": "1+1="}, "sft", "row 0: an SFT recipe's rows need a 'completion' string"),
        ({"prompt": "1+1=", "answer": {1, 2}}, "grpo", "row 0: field 'answer' is not JSON-serialisable"),
        (["1+1="], "grpo", "got list"),
    ],
)
def test_bad_row_names_recipe_row_and_field(row, trainer: str, fragment: str) -> None:
    recipe = recipe_with(make_example=lambda rng: row, trainer=trainer)
    with pytest.raises(UserError) as caught:
        recipe.assigned_rows("run", "peer", 0, 2)
    assert "recipe faulty" in str(caught.value) and fragment in str(caught.value)
