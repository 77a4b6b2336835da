"""Train on a local JSONL file: one JSON object per line with a prompt and a completion (SFT, or GRPO exact match).

Every peer must have the same file (same content, same path or a path of its own via its config): a peer's rows
are drawn by its seeded rng from the file's lines, so anyone with the file can regenerate them. The file's
sha256 is in ``recipe.metadata["sha256"]``.

Options:

* ``path`` (required): the JSONL file; blank lines are skipped.
* ``prompt_field`` (default ``"prompt"``) and ``completion_field`` (default ``"completion"``): the keys of each
  object to use; both must be strings.
* ``trainer``: ``"sft"`` (default: learn the completion) or ``"grpo"`` (reward 1.0 when the generated
  completion equals the file's completion after stripping spaces, else 0.0).
* ``max_completion_length``: default: the longest completion in characters (at least 16, at most 256).

The tiny offline model's tokenizer covers printable ASCII; other characters become padding (use a hub model for
other text).

Example: ``swarm local --peers 2 --recipe jsonl --set recipe.options='{path: data/train.jsonl}'``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from swarm.errors import UserError
from swarm.recipe import Recipe


def read_pairs(path: Path, prompt_field: str, completion_field: str) -> list[tuple[str, str]]:
    """(prompt, completion) of every non-blank line. :raises UserError: naming the file (and line) at fault"""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"JSONL file {path} does not exist (option 'path')") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"JSONL file {path} cannot be read: {error}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error})") from None
        if not isinstance(item, dict):
            raise UserError(f"{path} line {number}: expected a JSON object, got {type(item).__name__}")
        for field in (prompt_field, completion_field):
            if field not in item:
                raise UserError(
                    f"{path} line {number}: missing field {field!r} (has: {', '.join(item) or 'none'})"
                )
            if not isinstance(item[field], str):
                raise UserError(
                    f"{path} line {number}: field {field!r} must be a string, "
                    f"got {type(item[field]).__name__}"
                )
        pairs.append((item[prompt_field], item[completion_field]))
    if not pairs:
        raise UserError(f"JSONL file {path} has no rows")
    return pairs


def exact_match(prompts, completions, answer, **_):
    """1.0 when the completion equals the file's completion (spaces around either ignored), else 0.0."""
    return [
        1.0 if completion.strip() == expected.strip() else 0.0
        for completion, expected in zip(completions, answer)
    ]


def build(options: dict[str, Any]) -> Recipe:
    if not options.get("path"):
        raise UserError(
            "option 'path' is required: the JSONL file to train on (--set recipe.options='{path: FILE}')",
            exit_code=2,
        )
    path = Path(str(options["path"])).expanduser()
    prompt_field = str(options.get("prompt_field", "prompt"))
    completion_field = str(options.get("completion_field", "completion"))
    trainer = str(options.get("trainer", "sft")).lower()
    if trainer not in ("sft", "grpo"):
        raise UserError(f"option 'trainer' must be 'sft' or 'grpo', got {trainer!r}", exit_code=2)
    pairs = read_pairs(path, prompt_field, completion_field)
    longest = max(len(completion) for _, completion in pairs)
    max_completion_length = int(options.get("max_completion_length", min(256, max(16, longest + 1))))

    if trainer == "sft":

        def make_example(rng: random.Random) -> dict[str, Any]:
            prompt, completion = pairs[rng.randrange(len(pairs))]
            return {"prompt": prompt, "completion": completion}

        reward_funcs = []
    else:

        def make_example(rng: random.Random) -> dict[str, Any]:
            prompt, completion = pairs[rng.randrange(len(pairs))]
            return {"prompt": prompt, "answer": completion}  # TRL keeps "completion" for its own use

        reward_funcs = [exact_match]

    return Recipe(
        name="jsonl",
        trainer=trainer,
        make_example=make_example,
        reward_funcs=reward_funcs,
        alphabet=None,
        max_completion_length=max_completion_length,
        metadata={
            "path": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "rows": len(pairs),
        },
    )
