"""Verified DiLoCo: the audit rate that catches a peer cheating in one of its H inner steps, and what it costs.

Offline, on the CPU, in one process: the arithmetic recipe and the tiny default model at the default epoch size
(``training.prompts_per_round`` rows x ``training.num_generations`` completions per inner step). For each H of
``--inner-steps``:

* **an honest DiLoCo epoch**, taken and committed as ``SwarmTrainer.run_epoch`` does (swarm/verify/inner.py): per
  inner step a real TRL GRPO step, its commitment leaf and inner state written as the peer serves them, the
  optimizer step; then the manifest, θ_{e,n} and the epoch's commitment. Timed per step: ``train_s`` and the
  commitment's own ``commit_s``; the bytes a peer keeps on disk per epoch.
* **a one-step cheater's epoch**: the same, but one inner step (drawn at random) has a forged gradient (the honest
  one plus noise of its norm), applied, committed and sent as if honest.
* **audits**, as a live auditor runs them (:meth:`swarm.verify.auditor.Verifier._judge` reading the peer's served
  files): ``--audits`` audits of one step each of the honest epoch (all must pass: ``false_positives``) and of the
  cheater's, half of them on beacons that pick the cheated step (all must fail) and half on others (they pass: the
  step is not looked at). Timed: ``audit_step_s``, and the bytes one audit downloads.
* **the rate**: an audit of s of the H steps catches the one-step cheater with probability s / H (measured over
  10^4 beacons: ``detection_per_audit``), a contribution with p·s/H at audit probability p, so 50 contributions
  with 1 − (1 − p·s/H)^50 — at least 0.99 needs p·s/H ≥ 0.088. For a few (p, s) that reach it: the compute the
  audits add to training (p·s·audit_step_s / (H·train_s)) and the bytes they download per contribution.

Usage::

    python bench/diloco_audit.py                 # table (about 2 minutes)
    python bench/diloco_audit.py --json          # {"H": {str(H): {...}}, ...}
    python bench/diloco_audit.py --inner-steps 4 --audits 2 --quick   # smoke run (< 30 s)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from swarm.config import ModelConfig, SwarmConfig  # noqa: E402
from swarm.network.averager import CONTRIBUTION, served_file_name  # noqa: E402
from swarm.network.records import Commitment  # noqa: E402
from swarm.node.state import TrainingState, make_optimizer  # noqa: E402
from swarm.recipe import load_recipe  # noqa: E402
from swarm.sampling import round_seed  # noqa: E402
from swarm.training.model import load_model_and_tokenizer  # noqa: E402
from swarm.verify.auditor import Verifier  # noqa: E402
from swarm.verify.inner import audited_steps, final_snapshot, optimizer_step, pseudo_gradient, step_key  # noqa: E402
from swarm.verify.replay import GRPOSettings, capture_contribution  # noqa: E402
from swarm.verify.selection import AuditAssignment  # noqa: E402

CONFIDENCE, CONTRIBUTIONS = 0.99, 50
NEEDED = 1 - (1 - CONFIDENCE) ** (1 / CONTRIBUTIONS)  # p·s/H that catches within 50 contributions at 99 %
PEER, AUDITOR = "QmBenchPeer", "QmBenchAuditor"


class Board:
    """The DHT's commitments key, in memory."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, str], Commitment] = {}

    def publish(self, commitment: Commitment) -> bool:
        self.entries[(commitment.epoch, commitment.peer_id)] = commitment
        return True

    def fetch(self, epoch: int) -> dict[str, Commitment]:
        return {peer: value for (e, peer), value in self.entries.items() if e == epoch}


@dataclass
class Served:
    """What the audited peer's averager serves: its contributions folder; counts the bytes downloaded."""

    folder: Path | None = None
    downloaded: int = 0

    def download_contribution(self, peer_id, epoch, timeout, max_bytes, part=CONTRIBUTION, step=None):
        path = self.folder / served_file_name(epoch, part, step)
        if not path.is_file():
            return None
        data = path.read_bytes()
        self.downloaded += len(data)
        return data

    def received_span(self, epoch, peer_id):
        return None


@dataclass
class Epoch:
    commitment: Commitment
    folder: Path
    train_s: list[float] = field(default_factory=list)
    commit_s: list[float] = field(default_factory=list)
    cheated_step: int | None = None


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def grpo_settings(config: SwarmConfig, recipe: Any, seed: int) -> GRPOSettings:
    """The swarm's GRPO settings (the trainer's ``_grpo_settings`` for the tiny model: no stop tokens)."""
    training = config.training
    return GRPOSettings(
        num_generations=training.num_generations,
        max_completion_length=training.max_completion_length or recipe.max_completion_length,
        seed=seed,
    )


def _verifier(config, me, model, tokenizer, recipe, workdir: Path, board, served, inner_steps) -> Verifier:
    start = [param.detach().float().clone() for param in _trainable(model)]
    peer = SimpleNamespace(peer_id=me, averager=served, state=SimpleNamespace(params=start))
    config = config.model_copy(update=dict(workdir=str(workdir)))
    settings = grpo_settings(config, recipe, 0)
    verifier = Verifier(config, peer, recipe, model, tokenizer, settings, inner_steps=inner_steps)
    verifier.commitments = board
    return verifier


def forged(gradient: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The cheater's gradient for its one step: the honest one plus Gaussian noise of the honest norm (at least
    1e-3, so that a step whose honest gradient is zero — GRPO groups of equal rewards — is still a forgery)."""
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.randn(grad.shape, generator=generator) for grad in gradient]
    norm = lambda tensors: math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))  # noqa: E731
    scale = max(norm(gradient), 1e-3) / max(norm(noise), 1e-30)
    return [grad + scale * n for grad, n in zip(gradient, noise)]


def diloco_epoch(world: dict[str, Any], inner_steps: int, workdir: Path, cheat_at: int | None) -> Epoch:
    """One DiLoCo epoch (epoch 0) of the peer, taken and committed as the trainer does; ``cheat_at``: the step
    whose gradient it forges (:func:`forged`; committed and applied as if honest)."""
    config, recipe, tokenizer = world["config"], world["recipe"], world["tokenizer"]
    model = copy.deepcopy(world["model"])
    peer = _verifier(config, PEER, model, tokenizer, recipe, workdir, world["board"], None, inner_steps)
    params = _trainable(model)
    optimizer = make_optimizer(params, config.training.learning_rate, config.training.weight_decay)
    training, leaves = config.training, []
    epoch = Epoch(None, peer.directory, cheated_step=cheat_at)  # type: ignore[arg-type]
    for step in range(inner_steps):
        key = step_key(0, step, inner_steps)
        rows = recipe.assigned_rows(config.run_id, PEER, key, training.prompts_per_round)
        settings = grpo_settings(config, recipe, round_seed(config.run_id, PEER, key))
        started = time.perf_counter()
        contribution = capture_contribution(model, tokenizer, recipe, rows, settings)
        epoch.train_s.append(time.perf_counter() - started)
        if step == cheat_at:
            contribution = contribution.with_changes(gradient=forged(contribution.gradient, step))
        started = time.perf_counter()
        leaves.append(
            peer.keep_inner_step(0, step, contribution, TrainingState(model, optimizer).snapshot(step))
        )
        epoch.commit_s.append(time.perf_counter() - started)
        optimizer_step(params, optimizer, contribution.gradient, training.max_grad_norm)
    started = time.perf_counter()
    sent = pseudo_gradient(peer.peer.state.params, params)
    epoch.commitment = peer.commit_inner(0, leaves, final_snapshot(params, inner_steps), sent)
    epoch.commit_s.append(time.perf_counter() - started)
    return epoch


def audit(
    world: dict[str, Any], epoch: Epoch, inner_steps: int, workdir: Path, beacon: str
) -> tuple[str, float, int]:
    """(verdict, seconds, bytes downloaded) of one audit of one step of ``epoch``, as a live auditor runs it."""
    served = Served(epoch.folder)
    config = world["config"].model_copy(
        update=dict(diloco=world["config"].diloco.model_copy(update=dict(audited_steps=1)))
    )
    auditor = _verifier(
        config,
        AUDITOR,
        copy.deepcopy(world["model"]),
        world["tokenizer"],
        world["recipe"],
        workdir,
        world["board"],
        served,
        inner_steps,
    )
    auditor.remember_state(0)
    assignment = AuditAssignment(0, PEER, epoch.commitment.digest(), (AUDITOR,), beacon=beacon)
    started = time.perf_counter()
    kind, _, _ = auditor._judge(assignment)
    return kind, time.perf_counter() - started, served.downloaded


def beacons_for(inner_steps: int, step: int, wanted: int, picks: bool) -> list[str]:
    """``wanted`` beacons whose one audited step is (``picks``) or is not ``step``."""
    found, index = [], 0
    while len(found) < wanted:
        beacon = f"bench-beacon-{index}"
        if (audited_steps(beacon, PEER, inner_steps, 1) == [step]) == picks:
            found.append(beacon)
        index += 1
    return found


def measure(
    world: dict[str, Any], inner_steps: int, audits: int, root: Path, rng: random.Random
) -> dict[str, Any]:
    world["board"] = Board()  # each H has its own, shared by its peer and auditors
    honest = diloco_epoch(world, inner_steps, root / f"h{inner_steps}" / "honest", None)
    cheated = rng.randrange(inner_steps)
    cheater = diloco_epoch(world, inner_steps, root / f"h{inner_steps}" / "cheater", cheated)
    world["board"].publish(honest.commitment)
    audit_dir = root / f"h{inner_steps}" / "auditor"
    honest_audits = [
        audit(world, honest, inner_steps, audit_dir, beacon)
        for beacon in beacons_for(inner_steps, -1, audits, picks=False)
    ]
    world["board"].publish(cheater.commitment)
    picking = [
        audit(world, cheater, inner_steps, audit_dir, b)
        for b in beacons_for(inner_steps, cheated, max(1, audits // 2), True)
    ]
    missing = [
        audit(world, cheater, inner_steps, audit_dir, b)
        for b in beacons_for(inner_steps, cheated, max(1, audits // 2), False)
    ]
    draws = 10_000
    detection = (
        sum(audited_steps(f"draw-{i}", PEER, inner_steps, 1) == [cheated] for i in range(draws)) / draws
    )
    train_s = sum(honest.train_s) / inner_steps
    audit_step_s = sum(seconds for _, seconds, _ in honest_audits) / len(honest_audits)
    audit_bytes = sum(size for _, _, size in honest_audits) / len(honest_audits)
    kept = sum(path.stat().st_size for path in honest.folder.iterdir())
    gradient_bytes = 4 * sum(param.numel() for param in _trainable(world["model"]))
    rates = []
    for steps in sorted({1, math.ceil(NEEDED * inner_steps), inner_steps}):
        p = min(1.0, NEEDED * inner_steps / steps)
        chance = p * steps / inner_steps
        rates.append(
            dict(
                audit_probability=round(p, 4),
                audited_steps=steps,
                per_contribution=round(chance, 4),
                caught_within_50=round(1 - (1 - chance) ** CONTRIBUTIONS, 4),
                reaches_99=chance >= NEEDED - 1e-12,
                compute_overhead=round(p * steps * audit_step_s / (inner_steps * train_s), 4),
                # a first step needs no S_k, the others one more state: audit_bytes is the mean over the picks
                audit_bytes_per_contribution=round(p * (steps * audit_bytes), 1),
            )
        )
    return dict(
        train_s=round(train_s, 4),
        commit_s=round(sum(honest.commit_s) / inner_steps, 4),
        audit_step_s=round(audit_step_s, 4),
        audit_bytes=round(audit_bytes, 1),
        gradient_bytes=gradient_bytes,
        kept_bytes_per_epoch=kept,
        false_positives=sum(kind != "pass" for kind, _, _ in honest_audits),
        verdicts=sorted({kind for kind, _, _ in honest_audits + picking + missing}),
        honest_audits=len(honest_audits),
        cheated_step=cheated,
        caught_when_picked=sum(kind == "gradient_mismatch" for kind, _, _ in picking),
        audits_picking=len(picking),
        passed_when_not_picked=sum(kind == "pass" for kind, _, _ in missing),
        audits_not_picking=len(missing),
        detection_per_audit=round(detection, 4),
        expected_detection=round(1 / inner_steps, 4),
        rates=rates,
    )


def print_table(results: dict[str, Any]) -> None:
    print("Verified DiLoCo: catching a peer that cheats in one of its H inner steps (CPU, tiny model)")
    print(
        f"needed per contribution: p·s/H >= {NEEDED:.4f} (caught within {CONTRIBUTIONS} contributions at 99 %)\n"
    )
    for inner_steps, figures in results["H"].items():
        print(
            f"H = {inner_steps}: train {figures['train_s']:.3f}s/step, commit {figures['commit_s'] * 1000:.1f}ms/step,"
            f" audit of one step {figures['audit_step_s']:.3f}s and {figures['audit_bytes'] / 1e6:.2f} MB"
            f" (pseudo-gradient {figures['gradient_bytes'] / 1e6:.2f} MB), kept on disk"
            f" {figures['kept_bytes_per_epoch'] / 1e6:.2f} MB/epoch"
        )
        print(
            f"  honest audits failed {figures['false_positives']}/{figures['honest_audits']}; cheated step"
            f" {figures['cheated_step']}: caught {figures['caught_when_picked']}/{figures['audits_picking']} audits"
            f" that picked it, passed {figures['passed_when_not_picked']}/{figures['audits_not_picking']} that did"
            f" not; detection per audit {figures['detection_per_audit']:.4f} (1/H = {figures['expected_detection']})"
        )
        print(
            f"  {'p':>6} {'s':>4} {'p·s/H':>7} {'caught in 50':>13} {'compute +':>10} {'audit MB/contrib':>17}"
        )
        for rate in figures["rates"]:
            print(
                f"  {rate['audit_probability']:>6.3f} {rate['audited_steps']:>4} {rate['per_contribution']:>7.4f}"
                f" {rate['caught_within_50']:>13.4f} {rate['compute_overhead']:>9.1%}"
                f" {rate['audit_bytes_per_contribution'] / 1e6:>17.3f}"
            )
        print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--inner-steps", default="10,50", help="comma-separated H values (default 10,50)")
    parser.add_argument("--audits", type=int, default=4, help="audits of each kind per H (default 4)")
    parser.add_argument("--quick", action="store_true", help="smaller inner steps (4 rows x 4 completions)")
    args = parser.parse_args(argv)
    try:
        values = [int(value) for value in args.inner_steps.split(",")]
    except ValueError:
        parser.error(f"--inner-steps: {args.inner_steps!r} is not a comma-separated list of integers")
    if any(value < 1 for value in values) or args.audits < 1:
        parser.error("--inner-steps values and --audits must be at least 1")
    torch.manual_seed(0)
    recipe = load_recipe("arithmetic")
    with tempfile.TemporaryDirectory(prefix="swarm-bench-diloco-audit-") as scratch:
        root = Path(scratch)
        model, tokenizer = load_model_and_tokenizer(
            ModelConfig(), recipe.tokenizer_alphabet(), root / "models"
        )
        training = dict(prompts_per_round=4, num_generations=4) if args.quick else {}
        config = SwarmConfig.model_validate(
            dict(averaging=dict(strategy="diloco"), verify=dict(fetch_timeout=1.0), training=training)
        )
        world = dict(config=config, recipe=recipe, tokenizer=tokenizer, model=model)
        rng = random.Random(0)
        results = dict(
            needed_per_contribution=round(NEEDED, 4),
            H={str(value): measure(world, value, args.audits, root, rng) for value in values},
        )
    if args.json:
        print(json.dumps(results))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
