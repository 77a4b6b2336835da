"""A recipe whose reward function misbehaves stops the peer with one line naming the recipe and the function,
and the peer's state on disk stays usable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import clean_env, local_argv, run_swarm

pytestmark = pytest.mark.e2e

NAN_RECIPE = """
import math
from swarm.recipe import Recipe

def broken_reward(prompts, completions, **_):
    return [math.nan for _ in completions]

def build(options):
    return Recipe(name="nanr", trainer="grpo", make_example=lambda rng: {"prompt": f"{rng.randint(0, 9)}+1="},
                  reward_funcs=[broken_reward], alphabet="0123456789+= ", max_completion_length=3)
"""


def run_recipe(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess:
    """``swarm run`` for 2 epochs on the recipe file ``name``.py holding ``source``, in ``tmp_path/w``."""
    recipe = tmp_path / f"{name}.py"
    recipe.write_text(source)
    argv = ["run", "--plain", "--recipe", str(recipe), "--max-epochs", "2", "--workdir", str(tmp_path / "w")]
    return run_swarm([*argv, "--set", "monitor.wandb=disabled"], tmp_path, 180, clean_env())


@pytest.mark.timeout(200)
def test_nan_reward_is_one_clear_error(tmp_path: Path) -> None:
    result = run_recipe(tmp_path, "nanr", NAN_RECIPE)
    assert result.returncode == 1
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("swarm: error:") and "nanr" in last and "broken_reward" in last
    assert "Traceback" not in result.stdout + result.stderr
    assert (tmp_path / "w" / "checkpoint.pt").is_file()


ONE_PEER_BREAKS = """
import sys
from swarm.recipe import Recipe

def exact(prompts, completions, **_):
    if "peer_1" in " ".join(sys.argv):  # only the second peer of the simulation runs into the bug
        return 1.0
    return [0.0 for _ in completions]

def build(options):
    return Recipe(name="floatr", trainer="grpo", make_example=lambda rng: {"prompt": f"{rng.randint(0, 9)}+1="},
                  reward_funcs=[exact], alphabet="0123456789+= ", max_completion_length=3)
"""


@pytest.mark.timeout(300)
def test_swarm_local_stops_at_the_first_failing_peer_and_prints_its_error(tmp_path: Path) -> None:
    """The researcher's loop: a recipe bug in one peer ends the whole simulation at once with that peer's error
    line, instead of the others waiting a round timeout for it."""
    import time

    recipe = tmp_path / "floatr.py"
    recipe.write_text(ONE_PEER_BREAKS)
    argv = local_argv(tmp_path / "w", 3, 20, ["monitor.wandb=disabled"], "--recipe", str(recipe))
    result = run_swarm(argv, tmp_path, 280, clean_env())
    ended = time.time()
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("swarm local: peer_1 exited")]
    assert lines == [
        "swarm local: peer_1 exited with code 1: swarm: error: recipe floatr: reward function exact "
        "must return a list of numbers, got float"
    ], result.stderr[-2000:]
    failed_at = (tmp_path / "w" / "peer_1" / "stdout.log").stat().st_mtime  # its last line is its error
    assert ended - failed_at < 20, f"swarm local took {ended - failed_at:.0f}s to stop after peer_1 failed"
    for other in ("peer_0", "peer_2"):  # stopped cleanly, not killed: their checkpoints are saved
        assert (tmp_path / "w" / other / "checkpoint.pt").is_file()


ACCENTED = """
from swarm.recipe import Recipe

def build(options):
    return Recipe(name="accents", trainer="grpo", alphabet="0123456789+= ",
                  make_example=lambda rng: {"prompt": f"{rng.randint(0, 9)}+1=é"},
                  reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)], max_completion_length=3)
"""


@pytest.mark.timeout(200)
def test_prompt_characters_the_tokenizer_cannot_encode_fail_at_start_naming_them(tmp_path: Path) -> None:
    result = run_recipe(tmp_path, "accents", ACCENTED)
    assert result.returncode == 1, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last == (
        "swarm: error: recipe accents: row 0 of epoch 0: the prompt has characters the tokenizer cannot "
        "encode: 'é' (add them to the recipe's alphabet)"
    ), result.stderr[-2000:]
    assert not (tmp_path / "w" / "metrics.jsonl").exists()  # nothing was trained
