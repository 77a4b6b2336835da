"""The Recipe API researchers implement, and the registry that finds recipes by name.

A recipe is one Python file (``recipes/NAME.py``) that defines ``build(options: dict) -> Recipe``. The library
never imports ``recipes/`` directly: :func:`load_recipe` looks the name up in ``$SWARM_RECIPE_PATH``, ``./recipes``,
the project's ``recipes/`` and the ``swarm.recipes`` entry-point group.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swarm.config import PROJECT_ROOT
from swarm.errors import UserError

RewardFunc = Callable[..., list[float]]


@dataclass
class Recipe:
    """What to train on and how to score it.

    :param name: the recipe's name (its file name)
    :param trainer: ``"grpo"`` (rows need ``prompt``; completions are scored by ``reward_funcs``) or ``"sft"``
      (rows need ``prompt`` and ``completion``)
    :param make_example: builds one row (a dict) from a seeded ``random.Random``; every other key of the row is
      passed to the reward functions as a keyword argument (TRL convention)
    :param reward_funcs: TRL reward functions ``f(prompts, completions, **row_fields) -> list[float]``
    :param alphabet: characters of the offline tiny model's tokenizer; None: printable ASCII
    :param max_completion_length: default completion length in tokens (``training.max_completion_length``)
    """

    name: str
    trainer: Literal["grpo", "sft"]
    make_example: Callable[[random.Random], dict[str, Any]]
    reward_funcs: Sequence[RewardFunc] = ()
    alphabet: str | None = None
    max_completion_length: int = 16
    metadata: dict[str, Any] = field(default_factory=dict)

    def tokenizer_alphabet(self) -> str:
        return self.alphabet if self.alphabet is not None else string.printable

    def assigned_rows(self, run_id: str, peer_id: str, epoch: int, count: int) -> list[dict[str, Any]]:
        """The rows a peer must train on in an epoch: row k comes from a seed derived from
        (run, peer, epoch, k), so nobody chooses their own data and anyone can regenerate it."""
        rows = []
        for index in range(count):
            seed = hashlib.sha256(f"{run_id}|{peer_id}|{epoch}|{index}".encode()).digest()
            row = self.make_example(random.Random(int.from_bytes(seed[:8], "big")))
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"recipe {self.name}: make_example must return a dict with a 'prompt' string")
            if self.trainer == "sft" and not isinstance(row.get("completion"), str):
                raise UserError(f"recipe {self.name}: an SFT recipe's rows need a 'completion' string")
            rows.append(row)
        return rows


def recipe_search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("SWARM_RECIPE_PATH", "").split(os.pathsep) if p]
    return [*extra, Path.cwd() / "recipes", PROJECT_ROOT / "recipes"]


def available_recipes() -> list[str]:
    names = {path.stem for folder in recipe_search_path() if folder.is_dir() for path in folder.glob("*.py")}
    names |= {ep.name for ep in importlib.metadata.entry_points(group="swarm.recipes")}
    return sorted(name for name in names if not name.startswith("_"))


def _find_recipe_file(name: str) -> Path | None:
    if name.endswith(".py"):
        return Path(name)
    for folder in recipe_search_path():
        candidate = folder / f"{name}.py"
        if candidate.is_file():
            return candidate
    return None


def load_recipe(name: str, options: dict[str, Any] | None = None) -> Recipe:
    """Find the recipe called ``name`` (or a path to a ``.py`` file) and build it with ``options``.

    :raises UserError: when it is not found, or its file raises / returns something that is not a Recipe
    """
    options = dict(options or {})
    path = _find_recipe_file(name)
    if path is not None:
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist", exit_code=2)
        spec = importlib.util.spec_from_file_location(f"swarm_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            build = module.build
        except Exception as error:
            raise UserError(f"recipe {path}: failed to import: {type(error).__name__}: {error}") from None
        where = str(path)
    else:
        entry = next((ep for ep in importlib.metadata.entry_points(group="swarm.recipes") if ep.name == name), None)
        if entry is None:
            known = ", ".join(available_recipes()) or "none"
            raise UserError(f"recipe {name!r} not found (available: {known})", exit_code=2)
        try:
            build = entry.load()
        except Exception as error:
            raise UserError(f"recipe {name}: failed to import: {type(error).__name__}: {error}") from None
        where = entry.value
    try:
        recipe = build(options)
    except Exception as error:
        raise UserError(f"recipe {where}: build() raised {type(error).__name__}: {error}") from None
    if not isinstance(recipe, Recipe):
        raise UserError(f"recipe {where}: build() must return a swarm.recipe.Recipe, got {type(recipe).__name__}")
    return recipe
