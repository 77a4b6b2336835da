"""Tests for swarm.recipe: finding and building recipes, assigned data, and the arithmetic recipe's rewards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from swarm.errors import UserError
from swarm.recipe import Recipe, available_recipes, load_recipe

pytestmark = pytest.mark.unit

PROMPT = re.compile(r"^(\d+)\+(\d+)=$")


@pytest.fixture(autouse=True)
def _hermetic_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the project's own recipes/ is searched (no ./recipes of the caller, no SWARM_RECIPE_PATH)."""
    monkeypatch.delenv("SWARM_RECIPE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def arithmetic() -> Recipe:
    return load_recipe("arithmetic")


def _total_reward(recipe: Recipe, rows: list[dict], completions: list[str]) -> list[float]:
    """Sum of every reward function, called the way TRL does: extra row fields as keyword lists."""
    extra = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    prompts = [row["prompt"] for row in rows]
    per_func = [func(prompts=prompts, completions=completions, **extra) for func in recipe.reward_funcs]
    assert all(len(scores) == len(rows) for scores in per_func)
    return [sum(scores) for scores in zip(*per_func)]


def test_arithmetic_is_a_grpo_recipe(arithmetic: Recipe) -> None:
    assert arithmetic.name == "arithmetic"
    assert arithmetic.trainer == "grpo"
    assert len(arithmetic.reward_funcs) >= 1
    rows = arithmetic.assigned_rows("run", "peer", 0, 32)
    for row in rows:
        match = PROMPT.match(row["prompt"])
        assert match, row
        assert row["answer"] == str(int(match[1]) + int(match[2]))
        assert set(row["prompt"]) <= set(arithmetic.tokenizer_alphabet())


def test_options_reach_the_recipe() -> None:
    recipe = load_recipe("arithmetic", {"max_operand": 3})
    operands = [
        int(x)
        for row in recipe.assigned_rows("run", "peer", 0, 64)
        for x in PROMPT.match(row["prompt"]).groups()
    ]
    assert max(operands) <= 3
    wide = load_recipe("arithmetic", {"max_operand": 99})
    assert (
        max(
            int(x)
            for row in wide.assigned_rows("run", "peer", 0, 64)
            for x in PROMPT.match(row["prompt"]).groups()
        )
        > 9
    )


def test_assigned_rows_are_deterministic_per_run_peer_and_epoch(arithmetic: Recipe) -> None:
    rows = arithmetic.assigned_rows("run-a", "peer-1", 3, 16)
    assert len(rows) == 16
    assert rows == arithmetic.assigned_rows("run-a", "peer-1", 3, 16)
    # anyone can regenerate them
    assert rows == load_recipe("arithmetic").assigned_rows("run-a", "peer-1", 3, 16)
    assert rows[:5] == arithmetic.assigned_rows("run-a", "peer-1", 3, 5)
    assert rows != arithmetic.assigned_rows("run-a", "peer-2", 3, 16)
    assert rows != arithmetic.assigned_rows("run-a", "peer-1", 4, 16)
    assert rows != arithmetic.assigned_rows("run-b", "peer-1", 3, 16)


def test_exact_answer_earns_full_reward(arithmetic: Recipe) -> None:
    rows = arithmetic.assigned_rows("run", "peer", 0, 8)
    exact = _total_reward(arithmetic, rows, [row["answer"] for row in rows])
    assert exact == pytest.approx([1.5] * len(rows))
    padded = _total_reward(arithmetic, rows, [f" {row['answer']} " for row in rows])
    assert padded == pytest.approx([1.5] * len(rows))


def test_wrong_and_non_numeric_answers_earn_less(arithmetic: Recipe) -> None:
    rows = arithmetic.assigned_rows("run", "peer", 0, 8)
    wrong_number = _total_reward(arithmetic, rows, [str(int(row["answer"]) + 1) for row in rows])
    mixed = _total_reward(arithmetic, rows, [f"{row['answer']}=x" for row in rows])
    garbage = _total_reward(arithmetic, rows, ["+=+=" for _ in rows])
    empty = _total_reward(arithmetic, rows, ["" for _ in rows])
    for right, wrong, partial, none, blank in zip([1.5] * len(rows), wrong_number, mixed, garbage, empty):
        assert wrong < right
        assert partial < right
        assert none < partial  # some digits earn something, none earn nothing
        assert none == 0.0 and blank == 0.0


def test_available_recipes_include_the_shipped_ones() -> None:
    names = available_recipes()
    assert {"arithmetic", "arithmetic_sft"} <= set(names)
    assert load_recipe("arithmetic_sft").trainer == "sft"


def test_unknown_recipe_lists_available_ones() -> None:
    with pytest.raises(UserError) as caught:
        load_recipe("no_such_recipe")
    message = str(caught.value)
    assert "no_such_recipe" in message
    assert "arithmetic" in message and "arithmetic_sft" in message
    assert caught.value.exit_code == 2


def test_recipe_file_by_path(tmp_path: Path) -> None:
    path = tmp_path / "echo.py"
    path.write_text(
        "from swarm.recipe import Recipe\n"
        "def build(options):\n"
        "    return Recipe(name='echo', trainer='sft',\n"
        "                  make_example=lambda rng: {'prompt': str(rng.randint(0, 9)), 'completion': 'x'})\n"
    )
    recipe = load_recipe(str(path))
    assert recipe.name == "echo"
    assert len(recipe.assigned_rows("r", "p", 0, 3)) == 3


def test_recipe_found_by_name_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.py").write_text(
        "from swarm.recipe import Recipe\n"
        "def build(options):\n"
        "    return Recipe(name='mine', trainer='grpo', make_example=lambda rng: {'prompt': 'hi'})\n"
    )
    assert "mine" in available_recipes()
    assert load_recipe("mine").name == "mine"


def test_build_that_raises_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("def build(options):\n    raise RuntimeError('dataset missing')\n")
    with pytest.raises(UserError) as caught:
        load_recipe(str(path))
    assert str(path) in str(caught.value)
    assert "dataset missing" in str(caught.value)


def test_recipe_file_that_fails_to_import_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.py"
    path.write_text("import this_module_does_not_exist\n")
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_recipe(str(path))


def test_build_must_return_a_recipe(tmp_path: Path) -> None:
    path = tmp_path / "wrong.py"
    path.write_text("def build(options):\n    return {'name': 'wrong'}\n")
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_recipe(str(path))


def test_missing_recipe_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.py"
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_recipe(str(path))


def test_example_without_prompt_names_the_recipe(tmp_path: Path) -> None:
    path = tmp_path / "promptless.py"
    path.write_text(
        "from swarm.recipe import Recipe\n"
        "def build(options):\n"
        "    return Recipe(name='promptless', trainer='grpo', make_example=lambda rng: {'question': '1+1='})\n"
    )
    recipe = load_recipe(str(path))
    with pytest.raises(UserError) as caught:
        recipe.assigned_rows("run", "peer", 0, 2)
    assert "promptless" in str(caught.value)
    assert "prompt" in str(caught.value)


def test_sft_example_without_completion_is_refused() -> None:
    recipe = Recipe(name="half_sft", trainer="sft", make_example=lambda rng: {"prompt": "1+1="})
    with pytest.raises(UserError, match="half_sft"):
        recipe.assigned_rows("run", "peer", 0, 1)
