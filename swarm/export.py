"""``swarm export``: a peer's current model and tokenizer in Hugging Face format, loadable with
``AutoModelForCausalLM.from_pretrained`` (and ``AutoTokenizer.from_pretrained``) anywhere.

It rebuilds the model the way the peer did (from ``WORKDIR/config.yaml``: the same base, tiny model or hub id, the
same LoRA wrapping), loads ``WORKDIR/checkpoint.pt`` into it — validated like any state (shapes, finite values,
hash) — and writes it with ``save_pretrained``: with LoRA merged into the base weights by default, or as the
adapter alone (``--adapter``, loadable with peft). Nothing in the work directory is changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swarm.errors import UserError

# what was exported: run, epoch, recipe, LoRA handling, the tokenizer's class
EXPORT_FILE = "swarm_export.json"


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="write a peer's current model in Hugging Face format")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("swarm_work"),
        help="the peer's work directory (default: swarm_work)",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: WORKDIR/export)")
    parser.add_argument(
        "--adapter", action="store_true", help="with LoRA: write the adapter alone, not merged"
    )
    return parser


def run_export(args: argparse.Namespace) -> int:
    out = export_model(args.workdir, args.out or args.workdir / "export", adapter=args.adapter)
    tokenizer = json.loads((out / EXPORT_FILE).read_text())["tokenizer_class"]
    loader = "peft.AutoPeftModelForCausalLM" if args.adapter else "transformers.AutoModelForCausalLM"
    print(
        f"swarm export: wrote {out} (load it with {loader}.from_pretrained({str(out)!r}) and "
        f"transformers.{tokenizer}.from_pretrained({str(out)!r}))"
    )
    return 0


def export_model(workdir: Path, out: Path, adapter: bool = False) -> Path:
    """Write the model of ``workdir``'s checkpoint to ``out``; returns ``out``.

    :raises UserError: one line naming the file at fault (no config, no or unusable checkpoint) or the option
    """
    import torch

    from swarm.config import load_config
    from swarm.node.state import TrainingState
    from swarm.recipe import load_recipe
    from swarm.training.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from swarm.training.model import load_model_and_tokenizer

    config_path = workdir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{config_path}: not found (is {workdir} a peer's work directory?)")
    config = load_config(config_path, [], environ={})
    if adapter and config.model.lora_r <= 0:
        raise UserError(
            f"--adapter: the model of {workdir} has no LoRA adapter (model.lora_r is 0)", exit_code=2
        )
    checkpoint = workdir / CHECKPOINT_FILE
    payload = load_checkpoint(checkpoint)
    if payload is None:
        raise UserError(f"{checkpoint}: no readable checkpoint to export")
    recipe = load_recipe(config.recipe.name, config.recipe.options)
    model, tokenizer = load_model_and_tokenizer(config.model, recipe.tokenizer_alphabet(), workdir / "models")
    state = TrainingState(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    try:
        epoch = state.load(payload["metadata"], payload["tensors"])
    except (KeyError, ValueError) as error:
        raise UserError(f"{checkpoint}: does not fit the model of {config_path} ({error})") from None
    if config.model.lora_r > 0 and not adapter:
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # the tiny model's character tokenizer says qwen2 in its config: AutoTokenizer would rebuild it as Qwen2's
    tokenizer_class = "PreTrainedTokenizerFast" if config.model.name_or_path is None else "AutoTokenizer"
    (out / EXPORT_FILE).write_text(
        json.dumps(
            dict(
                run_id=config.run_id,
                epoch=epoch,
                recipe=config.recipe.name,
                tokenizer_class=tokenizer_class,
                lora="adapter" if adapter else ("merged" if config.model.lora_r > 0 else "none"),
            ),
            indent=1,
        )
        + "\n"
    )
    print(f"swarm export: epoch {epoch} of run {config.run_id!r}", file=sys.stderr)
    return out
