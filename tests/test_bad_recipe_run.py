"""A recipe whose reward function misbehaves stops the peer with one line naming the recipe and the function,
and the peer's state on disk stays usable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, clean_env

NAN_RECIPE = '''
import math
from swarm.recipe import Recipe

def broken_reward(prompts, completions, **_):
    return [math.nan for _ in completions]

def build(options):
    return Recipe(name="nanr", trainer="grpo", make_example=lambda rng: {"prompt": f"{rng.randint(0, 9)}+1="},
                  reward_funcs=[broken_reward], alphabet="0123456789+= ", max_completion_length=3)
'''


@pytest.mark.timeout(200)
def test_nan_reward_is_one_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "nanr.py"
    recipe.write_text(NAN_RECIPE)
    result = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "run", "--plain", "--recipe", str(recipe), "--max-epochs", "2",
         "--workdir", str(tmp_path / "w"), "--set", "monitor.wandb=disabled"],
        cwd=PROJECT_ROOT, env=clean_env(), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("swarm: error:") and "nanr" in last and "broken_reward" in last
    assert "Traceback" not in result.stdout + result.stderr
    assert (tmp_path / "w" / "checkpoint.pt").is_file()
