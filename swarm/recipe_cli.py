"""``swarm recipe``: scaffold a new recipe (``new NAME``) and list the recipes this machine can find (``list``).

Only :func:`add_recipe_parser` is imported when the ``swarm`` parser is built; recipes load on use.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import keyword
import sys
from pathlib import Path
from typing import TextIO

from swarm.errors import UserError


def add_recipe_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``recipe`` and its sub-commands on the ``swarm`` command's ``subparsers``."""
    recipe = subparsers.add_parser(
        "recipe", help="create a recipe from a template, or list the available ones"
    )
    commands = recipe.add_subparsers(dest="recipe_command", required=True, metavar="RECIPE_COMMAND")
    new = commands.add_parser("new", help="write a runnable recipe template to DIR/NAME.py")
    new.add_argument(
        "name", metavar="NAME", help="recipe name: letters, digits and underscores (e.g. my_task)"
    )
    new.add_argument(
        "--dir", type=Path, default=Path("recipes"), help="where to write it (default: ./recipes)"
    )
    new.add_argument(
        "--trainer", choices=("grpo", "sft"), default="grpo", help="trainer kind (default: grpo)"
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    commands.add_parser("list", help="every recipe found: name, trainer, description, location")
    return recipe


def run_recipe(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the ``swarm recipe`` sub-command in ``args``; returns the exit code.

    :raises UserError: a bad name, or a file that exists already (without ``--force``)
    """
    out = out or sys.stdout
    if args.recipe_command == "new":
        return _new(args, out)
    return _list(out)


# ---- new -------------------------------------------------------------------------------------------------------
def check_recipe_name(name: str) -> None:
    """:raises UserError: unless ``name`` can be a recipe's file name and ``--recipe`` argument"""
    if not name.isidentifier() or not name.isascii() or keyword.iskeyword(name) or name.startswith("_"):
        raise UserError(
            f"recipe name {name!r} is not valid: use letters, digits and underscores, starting with a letter"
            " (e.g. my_task)",
            exit_code=2,
        )


def _new(args: argparse.Namespace, out: TextIO) -> int:
    from swarm.recipe import recipe_location, recipe_search_path

    name = args.name
    check_recipe_name(name)
    folder: Path = args.dir
    path = folder / f"{name}.py"
    if path.exists() and not args.force:
        raise UserError(f"{path} already exists; pass --force to overwrite it", exit_code=2)
    shadowed = recipe_location(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(render_template(name, args.trainer))
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    print(f"created {path} ({args.trainer.upper()} recipe {name!r})", file=out)
    if shadowed is not None and Path(shadowed).resolve() != path.resolve():
        print(f"note: it takes the name of the recipe in {shadowed}", file=out)
    on_path = any(folder.resolve() == place.resolve() for place in recipe_search_path())
    recipe_arg = name if on_path else str(path)
    if not on_path:
        print(
            f"note: {folder} is not on the recipe search path (./recipes, $SWARM_RECIPE_PATH); "
            f"use --recipe {path}",
            file=out,
        )
    print(f"try it:  swarm local --peers 2 --recipe {recipe_arg} --max-epochs 3", file=out)
    return 0


def render_template(name: str, trainer: str) -> str:
    template = SFT_TEMPLATE if trainer == "sft" else GRPO_TEMPLATE
    return template.replace("__NAME__", name)


# ---- list ------------------------------------------------------------------------------------------------------
def _list(out: TextIO) -> int:
    from swarm.recipe import available_recipes, load_recipe, recipe_location

    names = available_recipes()
    if not names:
        print(
            "no recipes found (searched $SWARM_RECIPE_PATH, ./recipes and the project's recipes/)", file=out
        )
        return 0
    lines = []
    for name in names:
        where = recipe_location(name) or "?"
        description = _description(where)
        try:
            trainer = load_recipe(name).trainer
        except Exception as error:  # a broken or option-needing recipe is listed, not fatal
            trainer = "?"
            description = f"{description} -- cannot load with default options: {_short(error)}"
        lines.append((name, trainer, description, where))
    width = max(len(name) for name, *_ in lines)
    for name, trainer, description, where in lines:
        print(f"{name:<{width}}  {trainer:<4}  {description}  [{_relative(where)}]", file=out)
    return 0


def _description(where: str) -> str:
    """First line of the recipe module's docstring, read without running the file."""
    try:
        if where.startswith("entry point "):
            module = importlib.import_module(where.removeprefix("entry point ").split(":")[0])
            doc = module.__doc__
        else:
            doc = ast.get_docstring(ast.parse(Path(where).read_text(encoding="utf-8")))
    except Exception:
        return "(no description)"
    first = (doc or "").strip().splitlines()
    return first[0].strip() if first else "(no description)"


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200] + ("..." if len(text) > 200 else "")


def _relative(where: str) -> str:
    if where.startswith("entry point "):
        return where
    path = Path(where).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


# ---- templates -------------------------------------------------------------------------------------------------
_API_GUIDE = """
How a recipe works (the Recipe API)
-----------------------------------
A recipe is one Python file that defines ``build(options: dict) -> swarm.recipe.Recipe``. ``swarm`` finds it
by name in ``$SWARM_RECIPE_PATH``, ``./recipes`` and the project's ``recipes/`` (or take a path:
``--recipe path/to/file.py``). ``options`` is ``recipe.options`` from the config, e.g.
``--set recipe.options='{max_length: 6}'``; it may hold keys meant for another recipe (the default config's
are for ``arithmetic``), so read the keys you know with ``options.get(key, default)`` and ignore the rest.

``Recipe(...)`` fields:

* ``name``: the recipe's name (shown in errors and logs).
* ``trainer``: ``"grpo"`` (the model writes completions, reward functions score them) or ``"sft"`` (the model
  is shown the row's ``completion`` and learns it).
* ``make_example(rng) -> dict``: one training row. Use ONLY ``rng`` (a seeded ``random.Random``) for
  randomness: every peer's rows come from seeds derived from (run, peer, epoch, row), so anyone can regenerate
  and audit them. A row needs ``"prompt"`` (a string); an SFT row also ``"completion"``. Any other key (here
  ``"target"``) is handed to each reward function as a keyword argument holding one value per completion.
  Rows must be JSON-serialisable (strings, numbers, lists, dicts).
* ``reward_funcs``: TRL reward functions ``f(prompts, completions, **row_fields) -> list[float]``, one value
  per completion (None = "does not apply"). Total reward = the sum. Give partial credit so a fresh model's
  first completions already differ in reward; GRPO learns from those differences. Score only from the row
  and the completion: never from anything a peer claims.
* ``alphabet``: the characters of the offline tiny model's character tokenizer (None: printable ASCII). Every
  character of your prompts and answers must be in it. Ignored for hub models.
* ``max_completion_length``: default completion length in tokens (characters for the tiny model).
* ``warm_start_completion(row) -> str`` (GRPO): the row's reference answer. With ``warm_start.epochs: N`` (the
  shipped configs set 150) the swarm's first N epochs are SFT on it, so that GRPO starts from a model that can
  already answer; without it there is no warm start.

A reward function that raises, returns NaN/inf or the wrong number of values, or a row without a prompt,
stops the peer with one line naming this recipe and the function or row.

Try it:  swarm local --peers 2 --recipe __NAME__ --max-epochs 3
"""

GRPO_TEMPLATE = (
    '''"""__NAME__: GRPO on a generated task: reverse a short string ("abc>" -> "cba").

Options: ``letters`` (the characters strings are made of, default "abcd"), ``min_length`` / ``max_length``
(default 2 / 4).
'''
    + _API_GUIDE
    + '''"""

import random

from swarm.recipe import Recipe


def exact(prompts, completions, target, **_):
    """1.0 when the completion is exactly the reversed string (surrounding spaces allowed)."""
    return [1.0 if completion.strip() == expected else 0.0 for completion, expected in zip(completions, target)]


def closeness(prompts, completions, target, **_):
    """Partial credit, up to 0.5: the share of positions that are right, less a penalty for the wrong length."""
    scores = []
    for completion, expected in zip(completions, target):
        text = completion.strip()
        right = sum(a == b for a, b in zip(text, expected))
        scores.append(0.5 * right / max(len(text), len(expected), 1))
    return scores


def build(options):
    letters = str(options.get("letters", "abcd"))
    min_length = int(options.get("min_length", 2))
    max_length = int(options.get("max_length", 4))
    if not letters or not 1 <= min_length <= max_length:
        raise ValueError(f"need letters and 1 <= min_length <= max_length, got {letters!r} {min_length} {max_length}")

    def make_example(rng: random.Random):
        text = "".join(rng.choice(letters) for _ in range(rng.randint(min_length, max_length)))
        return {"prompt": f"{text}>", "target": text[::-1]}

    return Recipe(
        name="__NAME__",
        trainer="grpo",
        make_example=make_example,
        reward_funcs=[exact, closeness],
        alphabet=letters + "> ",
        max_completion_length=max_length + 1,
        warm_start_completion=lambda row: row["target"],
    )
'''
)

SFT_TEMPLATE = (
    '''"""__NAME__: SFT on a generated task: reverse a short string ("abc>" -> "cba").

The model is shown the prompt and learns the completion (loss on the completion only); no reward functions.
Options: ``letters`` (the characters strings are made of, default "abcd"), ``min_length`` / ``max_length``
(default 2 / 4).
'''
    + _API_GUIDE.replace('(here\n  ``"target"``)', "(none here)")
    + '''"""

import random

from swarm.recipe import Recipe


def build(options):
    letters = str(options.get("letters", "abcd"))
    min_length = int(options.get("min_length", 2))
    max_length = int(options.get("max_length", 4))
    if not letters or not 1 <= min_length <= max_length:
        raise ValueError(f"need letters and 1 <= min_length <= max_length, got {letters!r} {min_length} {max_length}")

    def make_example(rng: random.Random):
        text = "".join(rng.choice(letters) for _ in range(rng.randint(min_length, max_length)))
        return {"prompt": f"{text}>", "completion": text[::-1]}

    return Recipe(
        name="__NAME__",
        trainer="sft",
        make_example=make_example,
        alphabet=letters + "> ",
        max_completion_length=max_length + 1,
    )
'''
)


def main(argv: list[str] | None = None) -> int:
    """``python -m swarm.recipe_cli new|list ...`` (the same as ``swarm recipe ...``)."""
    parser = argparse.ArgumentParser(prog="swarm")
    add_recipe_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["recipe", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_recipe(args)
    except UserError as error:
        print(f"swarm: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
