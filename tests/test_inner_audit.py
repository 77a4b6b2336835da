"""Verified DiLoCo (swarm/verify/inner.py): a peer commits each inner step of its epoch as it takes it, and an auditor
replays the steps the beacon picks, checks the optimizer step to the next committed state and the pseudo-gradient.

Real TRL steps on the tiny offline model, one peer and one auditor in this process; what the peer serves is read
from its contributions folder as its averager would serve it (tests/test_verify_swarm.py-style live runs are in
tests/test_diloco.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from swarm.config import ModelConfig, SwarmConfig
from swarm.network.averager import CONTRIBUTION, INNER_STATE, MANIFEST, STEP, served_file_name
from swarm.network.records import Commitment
from swarm.node.state import TrainingState, make_optimizer
from swarm.recipe import load_recipe
from swarm.sampling import round_seed
from swarm.training.model import load_model_and_tokenizer
from swarm.verify.auditor import Verifier
from swarm.verify.checks import Verdict
from swarm.verify.commitment import contribution_path, save_served
from swarm.verify.inner import (
    MalformedInnerPart,
    Manifest,
    StepLeaf,
    audited_steps,
    final_snapshot,
    optimizer_step,
    pseudo_gradient,
    step_key,
)
from swarm.verify.replay import GRPOSettings, capture_contribution
from swarm.verify.selection import AuditAssignment
from tests.conftest import PROJECT_ROOT, clean_env

pytestmark = pytest.mark.unit

H = 3
PEER, AUDITOR = "QmPeer", "QmAuditor"


class Board:
    """The DHT's commitments key, shared by the peer and its auditor."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, str], Commitment] = {}

    def publish(self, commitment: Commitment) -> bool:
        self.entries[(commitment.epoch, commitment.peer_id)] = commitment
        return True

    def fetch(self, epoch: int) -> dict[str, Commitment]:
        return {peer: value for (e, peer), value in self.entries.items() if e == epoch}


@dataclass
class Served:
    """The averager of every simulated peer: serves the files of its contributions folder, counts requests."""

    folders: dict[str, Path]
    asked: Counter = field(default_factory=Counter)

    def download_contribution(self, peer_id, epoch, timeout, max_bytes, part=CONTRIBUTION, step=None):
        self.asked[(part, step)] += 1
        path = self.folders[peer_id] / served_file_name(epoch, part, step)
        return path.read_bytes() if path.is_file() else None

    def received_span(self, epoch, peer_id):
        return None  # no all-reduce here: what was sent is checked live (tests/test_diloco.py)


@dataclass
class Setup:
    config: SwarmConfig
    model: torch.nn.Module  # at θ_e
    tokenizer: Any
    recipe: Any
    tmp: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    recipe = load_recipe("arithmetic")
    tmp = tmp_path_factory.mktemp("inner")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), recipe.tokenizer_alphabet(), tmp / "models")
    config = SwarmConfig.model_validate(
        dict(
            averaging=dict(strategy="diloco"),
            diloco=dict(inner_steps=H),
            verify=dict(fetch_timeout=0.5),  # a file that is not served is unavailable at once
            workdir=str(tmp / "peer"),
        )
    )
    return Setup(config, model, tokenizer, recipe, tmp)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def _verifier(setup: Setup, me: str, model: torch.nn.Module, workdir: Path, board: Board, served: Served):
    config = setup.config.model_copy(update=dict(workdir=str(workdir)))
    start = [param.detach().float().clone() for param in _trainable(model)]
    peer = SimpleNamespace(peer_id=me, averager=served, state=SimpleNamespace(params=start))
    verifier = Verifier(config, peer, setup.recipe, model, setup.tokenizer, GRPOSettings(), inner_steps=H)
    verifier.commitments = board
    return verifier


def diloco_epoch(setup: Setup, tmp: Path, cheat: str | None = None, at: int = 1) -> tuple[Verifier, dict]:
    """The peer's epoch 0 as SwarmTrainer.run_epoch takes it (cheating in inner step ``at`` as ``cheat`` says),
    then the auditor's verdict on it with every step audited."""
    board, served = Board(), Served({})
    model = copy.deepcopy(setup.model)
    peer = _verifier(setup, PEER, model, tmp / "peer", board, served)
    served.folders[PEER] = peer.directory
    params = _trainable(model)
    optimizer = make_optimizer(
        params, setup.config.training.learning_rate, setup.config.training.weight_decay
    )
    run_id, leaves = setup.config.run_id, []
    for step in range(H):
        key = step_key(0, step, H)
        start = TrainingState(model, optimizer).snapshot(step)
        rows = setup.recipe.assigned_rows(run_id, PEER, key, 2)
        settings = GRPOSettings(seed=round_seed(run_id, PEER, key))
        contribution = capture_contribution(model, setup.tokenizer, setup.recipe, rows, settings)
        applied = contribution.gradient
        if step == at and cheat == "gradient":  # commits and applies a gradient it did not compute
            # (an offset, not a factor: a step whose honest gradient is zero must still be forged)
            contribution = contribution.with_changes(gradient=[3 * grad + 1e-3 for grad in applied])
            applied = contribution.gradient
        if step == at and cheat == "update":  # commits its honest gradient, applies another one
            applied = [1e-3 - grad for grad in applied]
        leaves.append(peer.keep_inner_step(0, step, contribution, start))
        optimizer_step(params, optimizer, applied, setup.config.training.max_grad_norm)
        if step == at and cheat == "rounding":  # not a cheat: the step as other kernels may round it
            with torch.no_grad():
                for param in params:
                    param.mul_(1 + 2**-22)
    sent = pseudo_gradient(peer.peer.state.params, params)
    if cheat == "pseudo":
        sent = [3 * tensor for tensor in sent]
    commitment = peer.commit_inner(0, leaves, final_snapshot(params, H), sent)
    auditor = _verifier(setup, AUDITOR, copy.deepcopy(setup.model), tmp / "auditor", board, served)
    auditor.remember_state(0)
    return auditor, dict(commitment=commitment, served=served, board=board, peer=peer)


def _audit(auditor: Verifier, commitment: Commitment, beacon: str = "beacon") -> tuple[str, float | None]:
    kind, error, _ = auditor._judge(AuditAssignment(0, PEER, commitment.digest(), (AUDITOR,), beacon=beacon))
    return kind, error


def test_an_honest_diloco_epoch_passes_with_every_step_replayed_exactly(setup: Setup, tmp_path: Path) -> None:
    auditor, epoch = diloco_epoch(setup, tmp_path)
    commitment = epoch["commitment"]
    assert commitment.inner_steps == H and commitment.steps_root is not None
    assert commitment.samples == H * 2 * GRPOSettings().num_generations
    assert _audit(auditor, commitment) == (Verdict.PASS.value, 0.0)
    asked = epoch["served"].asked
    # the manifest, every step and S_1..S_{H-1} (S_0 is the swarm's state); every optimizer step the auditor took
    # was bit-identical to the committed next state, so neither S_{k+1} nor θ_(e,n) had to be fetched to compare
    assert asked[(MANIFEST, None)] == 1 and all(asked[(STEP, k)] == 1 for k in range(H))
    assert [asked[(INNER_STATE, k)] for k in range(H + 1)] == [0] + [1] * (H - 1) + [0]


def test_an_inner_state_rounded_otherwise_passes_within_the_tolerance(setup: Setup, tmp_path: Path) -> None:
    """Another machine's kernels round an optimizer step differently: the auditor's state then differs from the
    committed one by a few ulps, so it fetches the served next state and compares within the tolerance."""
    auditor, epoch = diloco_epoch(setup, tmp_path, "rounding", at=H - 1)
    assert _audit(auditor, epoch["commitment"]) == (Verdict.PASS.value, 0.0)
    assert epoch["served"].asked[(INNER_STATE, H)] == 1  # θ_(e,n), compared instead of hashed


@pytest.mark.parametrize(
    ("cheat", "verdict"),
    [
        ("gradient", Verdict.GRADIENT_MISMATCH),  # a step's gradient is not that of its rollouts
        ("update", Verdict.INNER_STEP_MISMATCH),  # the next state does not follow from the committed step
        ("pseudo", Verdict.PSEUDO_GRADIENT_MISMATCH),  # what is sent is not θ_e − θ_(e,n)
    ],
)
def test_a_peer_cheating_in_one_inner_step_fails_the_audit_of_that_step(
    setup: Setup, tmp_path: Path, cheat: str, verdict: Verdict
) -> None:
    auditor, epoch = diloco_epoch(setup, tmp_path, cheat, at=1)
    assert _audit(auditor, epoch["commitment"])[0] == verdict.value
    # an audit that does not pick the cheated step passes it: only its pseudo-gradient is checked by every audit
    diloco = auditor.config.diloco.model_copy(update=dict(audited_steps=1))
    auditor.config = auditor.config.model_copy(update=dict(diloco=diloco))
    beacons = {audited_steps(f"b{i}", PEER, H, 1)[0]: f"b{i}" for i in range(40)}
    assert set(beacons) == set(range(H))
    for step, beacon in sorted(beacons.items()):
        expected = verdict.value if step == 1 or cheat == "pseudo" else Verdict.PASS.value
        assert _audit(auditor, epoch["commitment"], beacon)[0] == expected, f"step {step} audited"


def test_what_is_served_must_be_what_was_committed(setup: Setup, tmp_path: Path) -> None:
    """A manifest, inner state or step swapped after the commitment, or a start that is not the swarm's state."""
    auditor, epoch = diloco_epoch(setup, tmp_path)
    commitment, folder = epoch["commitment"], epoch["peer"].directory
    manifest_path = contribution_path(folder, 0, MANIFEST)
    honest = manifest_path.read_bytes()
    manifest = Manifest.model_validate_json(honest)

    forged = manifest.model_copy(update=dict(steps=[*manifest.steps[:-1], manifest.steps[0]]))
    manifest_path.write_bytes(forged.model_dump_json().encode())
    assert _audit(auditor, commitment)[0] == Verdict.MALFORMED.value  # steps not 0..n-1
    leaf = manifest.steps[1].model_copy(update=dict(samples=manifest.steps[1].samples + 1))
    manifest_path.write_bytes(
        manifest.model_copy(update=dict(steps=[manifest.steps[0], leaf, manifest.steps[2]])).to_bytes()
    )
    assert _audit(auditor, commitment)[0] == Verdict.COMMITMENT_MISMATCH.value  # another root
    manifest_path.write_bytes(b"\x00junk")
    assert _audit(auditor, commitment)[0] == Verdict.MALFORMED.value
    manifest_path.write_bytes(honest)

    inner = contribution_path(folder, 0, INNER_STATE, 2)
    kept = inner.read_bytes()
    inner.write_bytes(contribution_path(folder, 0, INNER_STATE, 1).read_bytes())
    assert _audit(auditor, commitment)[0] == Verdict.MALFORMED.value  # the state of another step
    inner.unlink()
    assert _audit(auditor, commitment)[0] == Verdict.UNAVAILABLE.value
    inner.write_bytes(kept)

    step = contribution_path(folder, 0, STEP, 2)
    step.write_bytes(contribution_path(folder, 0, STEP, 1).read_bytes())
    assert _audit(auditor, commitment)[0] == Verdict.COMMITMENT_MISMATCH.value

    # an auditor whose θ_e differs (the peer started its steps elsewhere) fails it for its state
    auditor.snapshots[0] = [tensor + 1e-3 for tensor in auditor.snapshots[0]]
    assert _audit(auditor, commitment)[0] == Verdict.WRONG_STATE.value


def test_a_sync_commitment_in_a_diloco_swarm_is_refused(setup: Setup, tmp_path: Path) -> None:
    auditor, epoch = diloco_epoch(setup, tmp_path)
    bare = epoch["commitment"].model_copy(update=dict(steps_root=None, inner_steps=1))
    epoch["board"].publish(bare)
    assert _audit(auditor, bare)[0] == Verdict.COMMITMENT_MISMATCH.value
    more = epoch["commitment"].model_copy(update=dict(inner_steps=H + 1))
    epoch["board"].publish(more)
    assert _audit(auditor, more)[0] == Verdict.COMMITMENT_MISMATCH.value


def _leaf(step: int, **changes: Any) -> StepLeaf:
    fields = dict(
        step=step,
        inner_hash="a" * 64,
        state_hash="s",
        data_seed="d",
        samples=8,
        tokens=40,
        rollouts_hash="r",
        gradient_hash="g",
    )
    return StepLeaf(**{**fields, **changes})


def test_the_manifest_root_binds_every_field_of_every_step_and_the_end() -> None:
    manifest = Manifest(epoch=4, steps=[_leaf(0), _leaf(1)], final_hash="f" * 64)
    roots = {manifest.root()}
    for index in range(2):
        for name, value in dict(
            inner_hash="b" * 64,
            state_hash="x",
            data_seed="x",
            samples=9,
            tokens=41,
            rollouts_hash="x",
            gradient_hash="x",
        ).items():
            steps = list(manifest.steps)
            steps[index] = steps[index].model_copy(update={name: value})
            roots.add(manifest.model_copy(update=dict(steps=steps)).root())
    roots.add(manifest.model_copy(update=dict(final_hash="e" * 64)).root())
    roots.add(manifest.model_copy(update=dict(epoch=5)).root())
    assert len(roots) == 1 + 2 * 7 + 2
    assert Manifest.from_bytes(manifest.to_bytes(), 4) == manifest
    for data, epoch in [(manifest.to_bytes(), 5), (b"[]", 4), (json.dumps({"epoch": 4}).encode(), 4)]:
        with pytest.raises(MalformedInnerPart):
            Manifest.from_bytes(data, epoch)


def test_the_beacon_picks_each_inner_step_equally_often_and_the_same_on_every_member() -> None:
    picks = Counter(step for i in range(3000) for step in audited_steps(f"beacon{i}", PEER, 10, 1))
    assert set(picks) == set(range(10)) and all(250 <= count <= 350 for count in picks.values())
    assert audited_steps("b", PEER, 10, 3) == audited_steps("b", PEER, 10, 3)
    assert len(set(audited_steps("b", PEER, 10, 3))) == 3
    assert audited_steps("b", PEER, 4, None) == audited_steps("b", PEER, 4, 9) == [0, 1, 2, 3]


def test_only_the_files_of_an_epoch_are_served_and_old_ones_are_deleted(tmp_path: Path) -> None:
    for bad in [
        (-1, CONTRIBUTION, None),
        (1, "../x", None),
        (1, STEP, None),
        (1, STEP, -1),
        (1, MANIFEST, 0),
        ("1", CONTRIBUTION, None),
        (1, INNER_STATE, True),
    ]:
        with pytest.raises(ValueError):
            served_file_name(*bad)
    for epoch in range(6):
        for part, step in [(STEP, 0), (INNER_STATE, 1), (MANIFEST, None), (CONTRIBUTION, None)]:
            save_served(tmp_path, epoch, b"x", keep_epochs=3, part=part, step=step)
    assert sorted({path.name.split("-")[1].split(".")[0] for path in tmp_path.iterdir()}) == ["3", "4", "5"]


def test_the_benchmark_states_the_rate_that_catches_a_one_step_cheater() -> None:
    """bench/diloco_audit.py --quick: honest audits pass, the forged step fails exactly the audits that pick it, and
    every reported rate that claims 99 % within 50 contributions reaches it."""
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "bench" / "diloco_audit.py"), "--quick", "--json"]
        + ["--inner-steps", "3", "--audits", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)["H"]["3"]
    assert figures["false_positives"] == 0 and figures["honest_audits"] == 2
    assert figures["caught_when_picked"] == figures["audits_picking"] == 1
    assert figures["passed_when_not_picked"] == figures["audits_not_picking"] == 1
    assert abs(figures["detection_per_audit"] - 1 / 3) < 0.03
    for rate in figures["rates"]:
        assert rate["reaches_99"] == (rate["caught_within_50"] >= 0.99)
        assert rate["reaches_99"], rate  # at H = 3 every split of p and s reaches it
