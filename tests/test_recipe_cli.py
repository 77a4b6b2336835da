"""``swarm recipe new|list`` through the real CLI, and the issue's acceptance: a freshly scaffolded recipe runs in a
2-peer ``swarm local`` simulation found by name from the working directory's ``recipes/``."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.recipe import Recipe, load_recipe
from tests.conftest import Processes, clean_env, processes_mentioning, wait_until

pytestmark = pytest.mark.e2e


def swarm(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm.cli", *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def total_reward(recipe: Recipe, rows: list[dict], completions: list[str]) -> list[float]:
    """Every checked reward function called the way TRL calls it: other row fields as keyword lists."""
    extra = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    prompts = [row["prompt"] for row in rows]
    per_func = [
        func(prompts=prompts, completions=completions, **extra) for func in recipe.checked_reward_funcs()
    ]
    return [sum(scores) for scores in zip(*per_func)]


def test_new_writes_a_grpo_recipe_that_list_shows(tmp_path: Path) -> None:
    created = swarm("recipe", "new", "demo", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    path = tmp_path / "recipes" / "demo.py"
    assert path.is_file()
    assert "recipes/demo.py" in created.stdout
    assert "--recipe demo" in created.stdout  # tells the user what to run next

    listed = swarm("recipe", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert {"demo", "arithmetic", "arithmetic_sft", "reasoning_gym", "jsonl"} <= set(lines)
    assert lines["demo"].split()[1] == "grpo"
    assert "reverse" in lines["demo"]  # the first line of its docstring
    assert "recipes/demo.py" in lines["demo"]
    assert lines["arithmetic_sft"].split()[1] == "sft"
    assert "path" in lines["jsonl"]  # needs an option: listed with why it cannot load, not a crash

    recipe = load_recipe(str(path))
    assert recipe.name == "demo" and recipe.trainer == "grpo"
    rows = recipe.assigned_rows("run", "peer", 0, 16)
    assert rows == load_recipe(str(path)).assigned_rows("run", "peer", 0, 16)
    for row in rows:
        assert set(row["prompt"]) <= set(recipe.tokenizer_alphabet())
        assert row["prompt"].endswith(">") and row["target"] == row["prompt"][:-1][::-1]
    right = total_reward(recipe, rows, [row["target"] for row in rows])
    wrong = total_reward(recipe, rows, [row["target"] + "x" for row in rows])
    first_try = total_reward(recipe, rows, ["a" for _ in rows])  # what a fresh model writes: partial credit
    assert right == pytest.approx([1.5] * len(rows))
    assert all(w < r for w, r in zip(wrong, right))
    assert 0 < sum(first_try) < sum(right)


def test_new_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert swarm("recipe", "new", "demo", cwd=tmp_path).returncode == 0
    path = tmp_path / "recipes" / "demo.py"
    path.write_text("# my edits\n")
    refused = swarm("recipe", "new", "demo", cwd=tmp_path)
    assert_one_line_error(refused, "recipes/demo.py", "--force")
    assert path.read_text() == "# my edits\n"
    forced = swarm("recipe", "new", "demo", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "def build(options)" in path.read_text()


@pytest.mark.parametrize("name", ["my-recipe", "9lives", "class", "_hidden", "a/b", "demo.py"])
def test_new_refuses_a_bad_name(tmp_path: Path, name: str) -> None:
    result = swarm("recipe", "new", name, cwd=tmp_path)
    assert_one_line_error(result, repr(name))
    assert result.returncode == 2
    assert not any(tmp_path.rglob("*.py"))


def test_new_sft_scaffold_in_another_dir(tmp_path: Path) -> None:
    created = swarm("recipe", "new", "warm", "--trainer", "sft", "--dir", "elsewhere/deep", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    path = tmp_path / "elsewhere" / "deep" / "warm.py"
    assert path.is_file()
    # not on the search path: use the file
    assert f"--recipe {Path('elsewhere/deep/warm.py')}" in created.stdout
    recipe = load_recipe(str(path))
    assert recipe.trainer == "sft" and not recipe.reward_funcs
    rows = recipe.assigned_rows("run", "peer", 0, 8)
    for row in rows:
        assert isinstance(row["completion"], str) and row["completion"]
        assert row["completion"] == row["prompt"][:-1][::-1]
        assert set(row["prompt"] + row["completion"]) <= set(recipe.tokenizer_alphabet())
    assert recipe.make_example(random.Random(3)) == recipe.make_example(random.Random(3))


def test_list_shows_a_broken_recipe_with_its_error(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "broken.py").write_text(
        '"""Half-written."""\n\ndef build(options):\n    raise RuntimeError("dataset missing")\n'
    )
    listed = swarm("recipe", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("broken "))
    assert "dataset missing" in line and "Half-written." in line
    assert any(line.startswith("arithmetic ") for line in listed.stdout.splitlines())  # the rest still listed


@pytest.mark.timeout(360)
def test_scaffolded_recipe_runs_in_a_local_swarm(tmp_path: Path, processes: Processes) -> None:
    """The issue's acceptance: ``swarm recipe new demo && swarm local --peers 2 --recipe demo --max-epochs 3``."""
    assert swarm("recipe", "new", "demo", cwd=tmp_path).returncode == 0
    workdir = tmp_path / "W"
    log = tmp_path / "local.log"
    argv = [
        "local",
        "--peers",
        "2",
        "--recipe",
        "demo",
        "--max-epochs",
        "3",
        "--workdir",
        str(workdir),
        "--plain",
    ]
    # the shipped config, as the user runs it: it starts with a warm start
    local = processes.swarm(*argv, log=log, cwd=tmp_path, schedule={})
    try:
        code = local.wait(timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"swarm local did not finish in 300 s:\n{log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    peers = summary["peers"]
    assert len(peers) == 2
    assert all(peer["epochs"] == 3 for peer in peers), peers
    assert peers[0]["param_checksum"] == peers[1]["param_checksum"]
    for index in range(2):  # the peers really trained the scaffolded recipe
        config = (workdir / f"peer_{index}" / "config.yaml").read_text()
        assert "name: demo" in config
    # the template's reference answers drive the shipped SFT warm start; its reward functions score the evaluation
    assert [entry["trainer"] for entry in peers[0]["history"]] == ["sft"] * 3
    assert all(entry["loss"] is not None for entry in peers[0]["history"])
    assert "eval/greedy/exact" in peers[0]["eval"]["figures"]
    wait_until(lambda: not processes_mentioning(str(tmp_path)), 15, "every peer process and p2pd to exit")
