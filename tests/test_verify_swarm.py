"""The verification layer in a real local swarm: 3 honest peers + 1 cheater (one per attack family), every
contribution audited. The cheater must be caught and excluded, no honest peer flagged, and the honest peers must
end on identical parameters."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import clean_env, local_argv, read_json, read_metrics, run_swarm

pytestmark = pytest.mark.e2e

PEERS = 4
EPOCHS = 5
# one attack per family: a tampered gradient, work on other data, forged rewards, a lower precision than declared,
# a gradient sent into averaging that is not the committed one, and completions that were not sampled — fabricated
# (the right answer, no generation) or poisoned (the right answer behind a payload)
FAMILIES = [
    "sign_flip",
    "wrong_data",
    "forged_rewards",
    "lower_precision",
    "send_mismatch",
    "fabricated_completions",
    "payload",
]
SAMPLING_FAMILIES = {"fabricated_completions", "payload"}
SMALL_AND_AUDITED = [
    "training.prompts_per_round=4",
    "training.num_generations=4",
    "verify.audit_probability=1.0",
    "verify.recheck_auditors=2",
    "averaging.peer_timeout=8",
    "averaging.round_timeout=40",
]

# for the runs with a peer that announces a far-ahead epoch (see test_a_peer_announcing_a_far_ahead_epoch_...)
LIAR_ROUND_TIMEOUT = "averaging.round_timeout=15"


def run_attack(
    root: Path, attack: str | None, *settings: str
) -> tuple[dict[str, dict], subprocess.CompletedProcess]:
    """Run ``swarm local`` with ``verify.attack`` (applied to the last peer) and ``settings``; peers' summaries by
    directory name."""
    overrides = [*SMALL_AND_AUDITED, *([f"verify.attack={attack}"] if attack else []), *settings]
    result = run_swarm(local_argv(root, PEERS, EPOCHS, overrides, "--timeout", "500"), root, 560, clean_env())
    summaries = {}
    for index in range(PEERS):
        summary = read_json(root / f"peer_{index}" / "summary.json")
        assert summary is not None, f"peer_{index} wrote no summary: {result.stderr[-2000:]}"
        summaries[f"peer_{index}"] = summary["peers"][0]
    return summaries, result


def audit_events(workdir: Path) -> list[dict]:
    path = workdir / "audit_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.timeout(600)
@pytest.mark.parametrize("attack", FAMILIES)
def test_cheater_is_caught_and_excluded(tmp_path: Path, attack: str) -> None:
    summaries, result = run_attack(tmp_path, attack)
    honest = [f"peer_{index}" for index in range(PEERS - 1)]
    cheater = summaries[f"peer_{PEERS - 1}"]["peer_id"]
    honest_ids = {summaries[name]["peer_id"] for name in honest}
    logs = {name: (tmp_path / name / "stdout.log").read_text(errors="replace") for name in summaries}
    assert all(summaries[name]["epochs"] == EPOCHS for name in honest), result.stderr[-2000:]
    assert len({summaries[name]["param_checksum"] for name in honest}) == 1, "honest peers diverged"

    for name in honest:
        events = audit_events(tmp_path / name)
        flagged = {event["audited"] for event in events}
        assert flagged == {cheater}, (
            f"{name} flagged {flagged}, expected only the cheater; log:\n{logs[name][-3000:]}"
        )
        if (
            attack in SAMPLING_FAMILIES
        ):  # its rewards, advantages and gradient are consistent: only sampling tells
            assert {kind for event in events for kind in event["verdicts"]} == {"forged_completions"}, events
        status = read_json(tmp_path / name / "status.json")
        assert status["verify"]["banned"] == [cheater]
        assert (
            status["verify"]["my_audits_failed"] == 0 and status["verify"]["my_audits_passed"] >= 1
        )  # audited, and passed
        assert status["verify"]["audits_done"] >= 1
        # excluded: once banned, no honest round has the cheater in its group (groups of at most 3)
        banned_at = min(event["epoch"] for event in events)
        later = [record for record in read_metrics(tmp_path / name) if record["epoch"] > banned_at + 1]
        assert later, f"{name}: no rounds after the ban at epoch {banned_at}"
        assert all(record["swarm"]["group_size"] <= PEERS - 1 for record in later), later
    assert "CHEATING" in logs[f"peer_{PEERS - 1}"] and "CHEATING" not in "".join(
        logs[name] for name in honest
    )
    # no honest peer was ever failed by a majority, on any peer (the cheater's own view included)
    for name in summaries:
        assert not {event["audited"] for event in audit_events(tmp_path / name)} & honest_ids, logs[name][
            -3000:
        ]


@pytest.mark.timeout(600)
def test_a_peer_announcing_a_far_ahead_epoch_is_not_followed(tmp_path: Path) -> None:
    """The last peer announces an epoch a million ahead of its own and serves scrambled parameters whose hash
    matches. Peers that followed the highest announced epoch would load them and stop at once; the honest peers
    must train every epoch and end identical, never loading its state."""
    # the honest peers wait for the liar before their first epoch (it is one of swarm local's peers) and never
    # count it (it is not at their epoch): a shorter round timeout makes that wait shorter
    summaries, result = run_attack(tmp_path, "epoch_inflation", LIAR_ROUND_TIMEOUT)
    honest = [f"peer_{index}" for index in range(PEERS - 1)]
    liar = summaries[f"peer_{PEERS - 1}"]["peer_id"]
    logs = {name: (tmp_path / name / "stdout.log").read_text(errors="replace") for name in honest}
    assert all(summaries[name]["epochs"] == EPOCHS for name in honest), result.stderr[-2000:]
    assert len({summaries[name]["param_checksum"] for name in honest}) == 1, "honest peers diverged"
    for name in honest:
        assert f"from {liar}" not in logs[name], logs[name][-3000:]  # never loaded its state
        rounds = read_metrics(tmp_path / name)
        assert {record["epoch"] for record in rounds} == set(range(EPOCHS)), rounds  # one epoch at a time
        assert sum(record["swarm"]["outcome"] == "averaged" for record in rounds) >= EPOCHS - 2, (
            rounds
        )  # together
