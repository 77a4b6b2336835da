"""Rollout sharing in a real local swarm: 3 peers publish their rollouts, train on a mix of their own and the
others' groups, and every contribution is audited. Nobody fails an audit, the shared groups really are in the
contributions, and the peers stay in lock-step."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.verify.commitment import load_contribution
from tests.conftest import clean_env, local_argv, read_json, run_swarm

pytestmark = pytest.mark.e2e

PEERS = 3
EPOCHS = 4
OVERRIDES = [
    "training.prompts_per_round=4",
    "training.num_generations=4",
    "sharing.enabled=true",
    "sharing.external_fraction=0.5",
    "verify.audit_probability=1.0",
    "averaging.peer_timeout=8",
    "averaging.round_timeout=40",
]


@pytest.mark.timeout(400)
def test_peers_train_on_each_others_rollouts_and_pass_every_audit(tmp_path: Path) -> None:
    argv = local_argv(tmp_path, PEERS, EPOCHS, OVERRIDES, "--timeout", "300")
    result = run_swarm(argv, tmp_path, 360, clean_env())
    names = [f"peer_{index}" for index in range(PEERS)]
    logs = {name: (tmp_path / name / "stdout.log").read_text(errors="replace") for name in names}
    assert result.returncode == 0, result.stderr[-2000:] + logs["peer_0"][-2000:]
    summaries = {name: read_json(tmp_path / name / "summary.json")["peers"][0] for name in names}
    assert all(summary["epochs"] == EPOCHS for summary in summaries.values())
    assert len({summary["param_checksum"] for summary in summaries.values()}) == 1, "peers diverged"

    peer_ids = {summary["peer_id"] for summary in summaries.values()}
    for name in names:
        status = read_json(tmp_path / name / "status.json")
        assert status["sharing"]["published_groups"] >= 2 * EPOCHS, status  # 2 local groups per epoch
        assert status["sharing"]["used_groups"] >= 1, (
            f"{name} never trained on a shared group:\n{logs[name][-2000:]}"
        )
        assert status["sharing"]["dropped"] == 0
        assert status["sharing"]["dropped_unsampled"] == 0, logs[name][-3000:]  # honest groups pass the check
        assert status["verify"]["my_audits_failed"] == 0 and status["verify"]["my_audits_passed"] >= 1, status
        assert status["verify"]["cheats_found"] == 0 and status["verify"]["banned"] == [], logs[name][-3000:]
        assert (
            not (tmp_path / name / "audit_events.jsonl").is_file()
            or not (tmp_path / name / "audit_events.jsonl").read_text().strip()
        )

    # the contributions that were audited carry other peers' signed groups, never the peer's own
    shared_seen = 0
    for name in names:
        for path in sorted((tmp_path / name / "contributions").glob("epoch-*.pt")):
            contribution = load_contribution(path.read_bytes())
            shared_seen += len(contribution.shared_groups)
            assert len(contribution.shared_groups) <= 2
            for canonical, _ in contribution.shared_bundles:
                assert b'"sender":"' + summaries[name]["peer_id"].encode() not in canonical
                assert any(b'"sender":"' + peer.encode() in canonical for peer in peer_ids)
    assert shared_seen >= 1
