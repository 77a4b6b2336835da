"""The Recipe API researchers implement, and the registry that finds recipes by name.

A recipe is one Python file (``recipes/NAME.py``) that defines ``build(options: dict) -> Recipe``. The library
never imports ``recipes/`` directly: :func:`load_recipe` looks the name up in ``$SWARM_RECIPE_PATH``, ``./recipes``,
the project's ``recipes/`` and the ``swarm.recipes`` entry-point group.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import numbers
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
    :param eval_examples: held-out rows for the evaluation (``monitor.eval_every``); None: rows of
      ``make_example`` drawn from seeds training never uses (:meth:`eval_rows`)
    :param warm_start_completion: a GRPO recipe's reference completion of a row (e.g. its answer), which the
      SFT warm start (the ``warm_start`` config section) trains on; None: the recipe cannot be warm-started
    """

    name: str
    trainer: Literal["grpo", "sft"]
    make_example: Callable[[random.Random], dict[str, Any]]
    reward_funcs: Sequence[RewardFunc] = ()
    alphabet: str | None = None
    max_completion_length: int = 16
    metadata: dict[str, Any] = field(default_factory=dict)
    eval_examples: Sequence[dict[str, Any]] | None = None
    warm_start_completion: Callable[[dict[str, Any]], str] | None = None

    def tokenizer_alphabet(self) -> str:
        return self.alphabet if self.alphabet is not None else string.printable

    def assigned_rows(self, run_id: str, peer_id: str, epoch: int, count: int) -> list[dict[str, Any]]:
        """The rows a peer must train on in an epoch: row k comes from a seed derived from
        (run, peer, epoch, k), so nobody chooses their own data and anyone can regenerate it.

        :raises UserError: naming the recipe and the row when ``make_example`` raises or returns a bad row
        """
        return [self.assigned_row(run_id, peer_id, epoch, index) for index in range(count)]

    def assigned_row(self, run_id: str, peer_id: str, epoch: int, index: int) -> dict[str, Any]:
        """Row ``index`` of :meth:`assigned_rows` alone (rows do not depend on each other).

        :raises UserError: naming the recipe and the row when ``make_example`` raises or returns a bad row
        """
        seed = hashlib.sha256(f"{run_id}|{peer_id}|{epoch}|{index}".encode()).digest()
        try:
            row = self.make_example(random.Random(int.from_bytes(seed[:8], "big")))
        except Exception as error:
            raise UserError(
                f"recipe {self.name}: make_example raised {type(error).__name__} on row {index} of epoch {epoch}:"
                f" {_one_line(error)}"
            ) from None
        self._check_row(row, index)
        return row

    def _check_row(self, row: Any, index: int) -> None:
        where = f"recipe {self.name}: row {index}"
        if not isinstance(row, dict):
            raise UserError(
                f"{where}: make_example must return a dict with a 'prompt' string, got {type(row).__name__}"
            )
        if not isinstance(row.get("prompt"), str):
            problem = "is missing" if "prompt" not in row else f"is a {type(row['prompt']).__name__}"
            raise UserError(
                f"{where}: make_example must return a dict with a 'prompt' string; field 'prompt' {problem}"
            )
        if self.trainer == "sft" and not isinstance(row.get("completion"), str):
            problem = "is missing" if "completion" not in row else f"is a {type(row['completion']).__name__}"
            raise UserError(
                f"{where}: an SFT recipe's rows need a 'completion' string; field 'completion' {problem}"
            )
        for key, value in row.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as error:
                raise UserError(f"{where}: field {key!r} is not JSON-serialisable ({error})") from None

    def warm_start_rows(self, run_id: str, peer_id: str, epoch: int, count: int) -> list[dict[str, Any]]:
        """A warm-start round's SFT rows: the assigned rows (:meth:`assigned_rows`), each with ``completion`` set to
        :attr:`warm_start_completion` of the row (an SFT recipe's rows keep their own).

        :raises UserError: naming the recipe and the row when the recipe has no reference completion, or it raises
          or returns something other than a non-empty string
        """
        rows = self.assigned_rows(run_id, peer_id, epoch, count)
        if self.trainer == "sft":
            return rows
        if self.warm_start_completion is None:
            raise UserError(
                f"recipe {self.name}: warm_start.epochs needs the recipe's warm_start_completion (the "
                f"reference answer SFT trains on); this recipe defines none — set warm_start.epochs=0"
            )
        for index, row in enumerate(rows):
            try:
                completion = self.warm_start_completion(dict(row))
            except Exception as error:
                raise UserError(
                    f"recipe {self.name}: warm_start_completion raised {type(error).__name__} on row "
                    f"{index} of epoch {epoch}: {_one_line(error)}"
                ) from None
            if not isinstance(completion, str) or not completion:
                raise UserError(
                    f"recipe {self.name}: warm_start_completion must return a non-empty string, got "
                    f"{type(completion).__name__} {completion!r:.40} on row {index} of epoch {epoch}"
                )
            row["completion"] = completion
        return rows

    def eval_rows(self, count: int) -> list[dict[str, Any]]:
        """The held-out rows: the recipe's ``eval_examples`` (up to ``count``), else ``count`` rows of its
        generator from a seed space of their own — the same on every peer, never an assigned training row's seed
        (a small task space still repeats prompts: the rows are held out, not necessarily unseen).

        :raises UserError: naming the recipe and the row when a row is malformed
        """
        if self.eval_examples is not None:
            rows = [dict(row) for row in list(self.eval_examples)[:count]]
            for index, row in enumerate(rows):
                self._check_row(row, index)
            return rows
        return [self.assigned_row("eval", "held-out", 0, index) for index in range(count)]

    def check_encodable(self, tokenizer: Any, rows: list[dict[str, Any]], epoch: int = 0) -> None:
        """Every character of the rows' text fields survives ``tokenizer`` (encode, then decode): a character the
        tokenizer cannot encode would silently become padding and be trained on.

        :raises UserError: naming the recipe, the row and the characters
        """
        for index, row in enumerate(rows):
            for part in ("prompt", "completion"):
                text = row.get(part)
                if not isinstance(text, str) or not text:
                    continue
                decoded = tokenizer.decode(
                    tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True
                )
                # tokenizers may normalise whitespace
                missing = sorted(set(text) - set(decoded) - set(" \t\n"))
                if missing:
                    hint = " (add them to the recipe's alphabet)" if self.alphabet is not None else ""
                    raise UserError(
                        f"recipe {self.name}: row {index} of epoch {epoch}: the {part} has characters "
                        f"the tokenizer cannot encode: {', '.join(map(repr, missing))}{hint}"
                    )

    def checked_reward_funcs(self) -> list[Any]:
        """The reward functions, each wrapped so that bad output stops training with one clear line.

        A wrapper keeps the function's name (TRL logs rewards by it) and raises :class:`UserError` naming the
        recipe and the function when the function raises, returns something that is not a list, returns the
        wrong number of values, or returns a value that is neither a finite number nor None (None means "not
        applicable" to TRL). Reward models (``torch.nn.Module``) and hub ids (strings) are passed on as they are.
        """
        return [_wrap_reward_func(self.name, func) for func in self.reward_funcs]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _reward_func_name(func: Any) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


class CheckedRewardFunc:
    """A recipe's reward function with its output checked (see :meth:`Recipe.checked_reward_funcs`)."""

    def __init__(self, recipe: str, func: RewardFunc):
        self.recipe = recipe
        self.func = func
        self.__name__ = _reward_func_name(func)
        self.__doc__ = getattr(func, "__doc__", None)

    def _fail(self, message: str) -> UserError:
        return UserError(f"recipe {self.recipe}: reward function {self.__name__} {message}")

    def _check(self, scores: Any, completions: Any) -> Any:
        if not isinstance(scores, (list, tuple)):
            raise self._fail(f"must return a list of numbers, got {type(scores).__name__}")
        if completions is not None and len(scores) != len(completions):
            raise self._fail(f"returned {len(scores)} values for {len(completions)} completions")
        for position, score in enumerate(scores):
            if score is None:
                continue
            if not isinstance(score, numbers.Real):
                raise self._fail(
                    f"returned {type(score).__name__} {score!r:.40} for completion {position}"
                    " (a finite number or None is expected)"
                )
            if not math.isfinite(score):
                raise self._fail(
                    f"returned {score} for completion {position} (a finite number or None is expected)"
                )
        return scores

    def _raised(self, error: Exception) -> UserError:
        return self._fail(f"raised {type(error).__name__}: {_one_line(error)}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            scores = self.func(*args, **kwargs)
        except UserError:
            raise
        except Exception as error:
            raise self._raised(error) from None
        return self._check(scores, _completions(args, kwargs))


class AsyncCheckedRewardFunc(CheckedRewardFunc):
    """The same checks for an ``async`` reward function (TRL awaits those in parallel)."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            scores = await self.func(*args, **kwargs)
        except UserError:
            raise
        except Exception as error:
            raise self._raised(error) from None
        return self._check(scores, _completions(args, kwargs))


def _completions(args: tuple, kwargs: dict) -> Any:
    if "completions" in kwargs:
        return kwargs["completions"]
    return args[1] if len(args) > 1 else None


def _wrap_reward_func(recipe: str, func: Any) -> Any:
    if isinstance(func, str) or (hasattr(func, "forward") and hasattr(func, "parameters")):
        return func  # a hub id or a reward model: TRL runs it, there is no Python output to check
    target = func
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__):
        return AsyncCheckedRewardFunc(recipe, func)
    return CheckedRewardFunc(recipe, func)


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


def recipe_location(name: str) -> str | None:
    """Where :func:`load_recipe` would find ``name``: the file's path, ``entry point MODULE:ATTR``, or None."""
    path = _find_recipe_file(name)
    if path is not None:
        return str(path)
    entry = next(
        (ep for ep in importlib.metadata.entry_points(group="swarm.recipes") if ep.name == name), None
    )
    return None if entry is None else f"entry point {entry.value}"


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
        entry = next(
            (ep for ep in importlib.metadata.entry_points(group="swarm.recipes") if ep.name == name), None
        )
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
    except UserError as error:  # the recipe's own message (a missing option, an unreadable file): keep it
        raise UserError(f"recipe {where}: {error}", exit_code=error.exit_code) from None
    except Exception as error:
        raise UserError(f"recipe {where}: build() raised {type(error).__name__}: {error}") from None
    if not isinstance(recipe, Recipe):
        raise UserError(
            f"recipe {where}: build() must return a swarm.recipe.Recipe, got {type(recipe).__name__}"
        )
    return recipe
