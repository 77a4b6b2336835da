"""The options every config-reading command shares (``--config``, ``--set``, ``--recipe``, …) and what they
mean: the config they select (:func:`config_from_args`) and the keys the user chose on purpose
(:func:`explicit_keys`). Used by ``swarm run``, ``local``, ``config`` and ``doctor``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # swarm.config is imported when a config is read: `swarm --help` stays fast
    from swarm.config import SwarmConfig

__all__ = ["add_config_options", "config_from_args", "explicit_keys"]


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (default: configs/default.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.learning_rate=1e-4 (repeatable)",
    )
    parser.add_argument("--recipe", help="recipe name or path to a recipe .py file (recipe.name)")
    parser.add_argument("--max-epochs", type=int, help="stop after this swarm epoch (training.max_epochs)")
    parser.add_argument("--workdir", type=Path, help="work directory: identity, checkpoints, logs (workdir)")
    parser.add_argument("--summary", type=Path, help="write the run summary JSON here at the end")


def config_from_args(args: argparse.Namespace) -> SwarmConfig:
    from swarm.config import load_config

    overrides = list(args.overrides)
    if args.recipe:
        overrides.append(f"recipe.name={args.recipe}")
        if load_config(args.config, []).recipe.name != args.recipe:
            # the config file's options are its own recipe's, not this one's (options set with --set still apply)
            overrides.insert(0, "recipe.options={}")
    if args.max_epochs is not None:
        overrides.append(f"training.max_epochs={args.max_epochs}")
    if args.workdir is not None:
        overrides.append(f"workdir={args.workdir}")
    if getattr(args, "join", None):
        overrides.append(f"network.initial_peers=[{', '.join(repr(a) for a in args.join)}]")
    return load_config(args.config, overrides)


def explicit_keys(args: argparse.Namespace) -> list[str]:
    """The dotted config keys the user chose on purpose: ``--set``, ``--recipe``, ``SWARM_*`` variables, and every
    key of a ``--config`` file it named (a file picked by ``--tier`` is a default, not a choice)."""
    from swarm.config import _read_yaml, env_overrides

    keys = [item.partition("=")[0].strip() for item in args.overrides]
    if args.recipe:
        keys.append("recipe.name")
    keys += [key for key, _, _ in env_overrides(os.environ)]
    if args.config is not None and not getattr(args, "tier", None):

        def walk(tree: dict, prefix: str) -> None:
            for key, value in tree.items():
                if isinstance(value, dict) and f"{prefix}{key}" != "recipe.options":
                    walk(value, f"{prefix}{key}.")
                else:
                    keys.append(f"{prefix}{key}")

        walk(_read_yaml(Path(args.config)), "")
    return keys
