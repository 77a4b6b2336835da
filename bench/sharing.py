"""Rollout sharing benchmark: does training on other peers' rollouts (SAPO) help, and what does it cost?

For each of ``--repeats`` runs (each its own ``run_id``, so other data), two local swarms are trained with the same
settings, one without and one with ``sharing.enabled`` (``--fraction`` of each round's prompt groups taken from the
others), verification on at its default audit probability:

* **held-out reward** — the swarm's final model (peers end bit-identical; peer 0's checkpoint is read) samples
  ``--samples`` completions (the training temperature) for each of ``--prompts`` prompts nobody trained on, and the
  recipe's reward functions score them: mean total reward and the share of exactly correct answers (reward function
  ``correct``). Before-training figures (the initial model) are the common baseline. This is the comparison that
  counts: the training reward mixes in shared groups, which are filtered to carry signal.
* **cost** — mean compute seconds per epoch and per peer (``metrics.jsonl``), and the bytes of shared bundles.
* **integrity** — audits failed and peers banned (expected 0), and shared groups used per peer.

Usage::

    python bench/sharing.py              # table on stdout, progress on stderr (about 3-4 minutes)
    python bench/sharing.py --json       # one JSON object on stdout
    python bench/sharing.py --quick      # 2 peers, 3 epochs, 1 repeat: a smoke run

Tiny models learn fast and noisily; read the per-repeat rows, not only the means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from throughput import BenchError, Runner, check_leftover_daemons, log, p2pd_pids

from swarm.config import ModelConfig
from swarm.monitor.summary import METRICS_FILE, STATUS_FILE, read_json
from swarm.node.state import TrainingState
from swarm.recipe import Recipe, load_recipe
from swarm.training.checkpoint import CHECKPOINT_FILE, load_checkpoint
from swarm.training.model import load_model_and_tokenizer

SETTINGS = ["training.prompts_per_round=8", "training.num_generations=8"]


@dataclass
class Evaluation:
    mean_reward: float
    correct: float  # share of completions with the exact answer


@dataclass
class SwarmRun:
    sharing: bool
    repeat: int
    held_out: Evaluation
    compute_s_per_epoch: float
    shared_groups_used: int  # summed over peers
    audits_failed: int
    banned: int


def evaluate(model: torch.nn.Module, tokenizer, recipe: Recipe, prompts: int, samples: int) -> Evaluation:
    """Sample ``samples`` completions per held-out prompt and score them with the recipe's reward functions."""
    rows = recipe.assigned_rows("held-out", "bench", 0, prompts)
    totals, correct = [], []
    model.eval()
    torch.manual_seed(0)
    for row in rows:
        encoded = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **encoded,
                do_sample=True,
                temperature=1.0,
                max_new_tokens=recipe.max_completion_length,
                num_return_sequences=samples,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        fields = {key: [value] * samples for key, value in row.items() if key != "prompt"}
        scores = [0.0] * samples
        for func in recipe.reward_funcs:
            values = func(prompts=[row["prompt"]] * samples, completions=texts, **fields)
            scores = [score + (value or 0.0) for score, value in zip(scores, values)]
            if getattr(func, "__name__", "") == "correct":
                correct.extend(values)
        totals.extend(scores)
    return Evaluation(statistics.fmean(totals), statistics.fmean(correct) if correct else float("nan"))


def final_model(workdir: Path, recipe: Recipe, cache: Path):
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), recipe.tokenizer_alphabet(), cache)
    payload = load_checkpoint(workdir / CHECKPOINT_FILE)
    if payload is None:
        raise BenchError(f"{workdir}: no checkpoint")
    optimizer = torch.optim.AdamW(model.parameters())
    TrainingState(model, optimizer).load(payload["metadata"], payload["tensors"])
    return model, tokenizer


def run_pair(
    runner: Runner,
    recipe: Recipe,
    cache: Path,
    repeat: int,
    peers: int,
    epochs: int,
    fraction: float,
    prompts: int,
    samples: int,
) -> list[SwarmRun]:
    runs = []
    for sharing in (False, True):
        name = f"r{repeat}-{'sharing' if sharing else 'solo-data'}"
        overrides = [
            *SETTINGS,
            f"sharing.enabled={str(sharing).lower()}",
            f"sharing.external_fraction={fraction}",
        ]
        log(f"{name}: {peers} peers, {epochs} epochs")
        workdirs = runner.swarm(name, peers, epochs, overrides)
        model, tokenizer = final_model(workdirs[0], recipe, cache)
        metrics = [
            json.loads(line)
            for workdir in workdirs
            for line in (workdir / METRICS_FILE).read_text().splitlines()
            if line.strip()
        ]
        statuses = [read_json(workdir / STATUS_FILE) or {} for workdir in workdirs]
        runs.append(
            SwarmRun(
                sharing=sharing,
                repeat=repeat,
                held_out=evaluate(model, tokenizer, recipe, prompts, samples),
                compute_s_per_epoch=statistics.fmean(
                    item["train"]["compute_s"] for item in metrics if item["epoch"] > 0
                ),
                shared_groups_used=sum(
                    int(status.get("sharing", {}).get("used_groups", 0)) for status in statuses
                ),
                audits_failed=sum(
                    int(status.get("verify", {}).get("my_audits_failed", 0)) for status in statuses
                ),
                banned=sum(len(status.get("verify", {}).get("banned", [])) for status in statuses),
            )
        )
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="2 peers, 3 epochs, 1 repeat")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.5, help="sharing.external_fraction")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts")
    parser.add_argument("--samples", type=int, default=8, help="completions per held-out prompt")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per swarm run")
    parser.add_argument(
        "--workdir", type=Path, help="keep the runs' files here (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.peers, args.epochs, args.repeats, args.prompts = 2, 3, 1, 16
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="swarm-bench-sharing-"))
    daemons_before = len(p2pd_pids())
    try:
        root.mkdir(parents=True, exist_ok=True)
        runner = Runner(root, args.timeout)
        recipe = load_recipe("arithmetic")
        cache = root / "models"
        model, tokenizer = load_model_and_tokenizer(ModelConfig(), recipe.tokenizer_alphabet(), cache)
        baseline = evaluate(model, tokenizer, recipe, args.prompts, args.samples)
        runs = [
            run
            for repeat in range(args.repeats)
            for run in run_pair(
                runner,
                recipe,
                cache,
                repeat,
                args.peers,
                args.epochs,
                args.fraction,
                args.prompts,
                args.samples,
            )
        ]
        check_leftover_daemons(daemons_before, runner.tag)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {}
    for sharing in (False, True):
        chosen = [run for run in runs if run.sharing == sharing]
        summary["sharing" if sharing else "local_only"] = dict(
            held_out_reward=statistics.fmean(run.held_out.mean_reward for run in chosen),
            held_out_correct=statistics.fmean(run.held_out.correct for run in chosen),
            compute_s_per_epoch=statistics.fmean(run.compute_s_per_epoch for run in chosen),
            shared_groups_used=sum(run.shared_groups_used for run in chosen),
            audits_failed=sum(run.audits_failed for run in chosen),
            banned=sum(run.banned for run in chosen),
        )
    summary["reward_ratio"] = summary["sharing"]["held_out_reward"] / max(
        summary["local_only"]["held_out_reward"], 1e-9
    )
    result = dict(
        peers=args.peers,
        epochs=args.epochs,
        repeats=args.repeats,
        fraction=args.fraction,
        before_training=asdict(baseline),
        **summary,
        runs=[asdict(run) for run in runs],
    )
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"rollout sharing: {args.peers} peers x {args.epochs} epochs, fraction {args.fraction}"
        f" (held-out: {args.prompts} prompts x {args.samples} samples)"
    )
    for column in (
        "run",
        "held-out reward",
        "exact answers",
        "compute s/epoch",
        "shared groups used",
        "audits failed",
        "bans",
    ):
        table.add_column(column, justify="right")
    table.add_row("before training", f"{baseline.mean_reward:.3f}", f"{baseline.correct:.1%}", "", "", "", "")
    for run in runs:
        table.add_row(
            f"repeat {run.repeat}, {'sharing' if run.sharing else 'local only'}",
            f"{run.held_out.mean_reward:.3f}",
            f"{run.held_out.correct:.1%}",
            f"{run.compute_s_per_epoch:.3f}",
            str(run.shared_groups_used),
            str(run.audits_failed),
            str(run.banned),
        )
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    print(f"held-out reward, sharing / local only: {result['reward_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
