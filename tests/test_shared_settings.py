"""What a joiner takes from the swarm it joins, what it refuses, and what it never accepts from a peer."""

from __future__ import annotations

import pytest

from swarm.config import SwarmConfig, load_config
from swarm.errors import UserError
from swarm.shared_settings import adopt, differences, fingerprint, reconcile, shared_settings

pytestmark = pytest.mark.unit


def test_the_fingerprint_covers_what_changes_a_step_and_nothing_local() -> None:
    base = SwarmConfig()
    same = SwarmConfig(
        workdir="elsewhere",
        network=dict(startup_timeout=5),
        training=dict(max_epochs=3),
        verify=dict(attack="sign_flip", fetch_timeout=1),
    )
    assert fingerprint(shared_settings(base)) == fingerprint(shared_settings(same))
    for changed in (
        dict(run_id="other"),
        dict(model=dict(lora_r=8)),
        dict(recipe=dict(options=dict(max_operand=5))),
        dict(training=dict(learning_rate=0.5)),
        dict(averaging=dict(compression="fp16")),
        dict(verify=dict(audit_window=5)),
        dict(ledger=dict(slash_amount=1.0)),
    ):
        assert fingerprint(shared_settings(SwarmConfig(**changed))) != fingerprint(shared_settings(base)), (
            changed
        )


def test_a_joiner_takes_the_swarms_settings_it_did_not_choose_and_refuses_those_it_did() -> None:
    swarm = shared_settings(load_config(overrides=["run_id=swarm-cpu", "model.hidden_size=32"]))
    mine = load_config(overrides=["training.max_epochs=7"])
    joined, taken = reconcile(mine, swarm, explicit=["training.max_epochs"], source="initial peer QmA")
    assert joined.run_id == "swarm-cpu" and joined.model.hidden_size == 32 and joined.training.max_epochs == 7
    assert set(taken) == {"run_id", "model.hidden_size"}
    assert shared_settings(joined) == swarm
    with pytest.raises(
        UserError, match=r"at initial peer QmA: model\.hidden_size: 64 here, 32 in the swarm"
    ) as error:
        reconcile(mine, swarm, explicit=["model.hidden_size"], source="initial peer QmA")
    assert "run_id" not in str(error.value)  # only what the user chose is named; the rest would be taken
    with pytest.raises(UserError, match=r"model\.hidden_size"):
        reconcile(mine, swarm, explicit=["model"], source="initial peer QmA")  # a whole section chosen
    assert reconcile(mine, shared_settings(mine), explicit=["model"], source="x") == (mine, {})


@pytest.mark.parametrize(
    "hostile",
    [
        {"network": {"initial_peers": ["/ip4/6.6.6.6/tcp/1/p2p/QmEvil"]}},  # not a shared section
        {"training": {"learning_rate": -1}},
        {"training": {"learning_rate": "fast"}},
        {"model": {"hidden_size": 10**30, "surprise": 1}},
        {"run_id": "../../etc"},
    ],
)
def test_settings_from_a_peer_are_validated_like_any_config(hostile: dict) -> None:
    with pytest.raises(UserError, match="^initial peer QmA announces "):
        adopt(SwarmConfig(), hostile, "initial peer QmA")


def test_differences_name_each_dotted_key() -> None:
    found = differences(
        shared_settings(SwarmConfig()),
        shared_settings(SwarmConfig(recipe=dict(name="count", options=dict(n=1)))),
    )
    assert found == {"recipe.name": ("arithmetic", "count"), "recipe.options": ({}, {"n": 1})}


def test_swarm_doctor_compares_this_peers_settings_with_the_swarms(monkeypatch) -> None:
    """`swarm doctor --join` reads the initial peer's announcement (monkeypatched here; tests/test_joining.py reads
    a real one) and names what differs: taken from the swarm, or refused where chosen on purpose."""
    from swarm import doctor
    from swarm.network import discovery
    from swarm.network.run_records import RunAnnouncement

    theirs = shared_settings(SwarmConfig(run_id="swarm-cpu"))
    announcement = RunAnnouncement(
        peer_id="QmA", run_id="swarm-cpu", fingerprint=fingerprint(theirs), settings=theirs
    )
    monkeypatch.setattr(discovery, "discover", lambda peers, timeout: announcement)
    joiner = SwarmConfig(network=dict(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmA"]))
    [taken] = doctor.check_swarm_settings(joiner, [], 1.0)
    assert (
        taken.status == doctor.OK and 'run_id: "swarm-default" here, "swarm-cpu" in the swarm' in taken.detail
    )
    [refused] = doctor.check_swarm_settings(joiner, ["run_id"], 1.0)
    assert refused.status == doctor.FAIL and "run_id" in refused.detail
    same = SwarmConfig(run_id="swarm-cpu", network=joiner.network)
    [ok] = doctor.check_swarm_settings(same, [], 1.0)
    assert ok.status == doctor.OK and "the same as the swarm's" in ok.detail
    monkeypatch.setattr(discovery, "discover", lambda peers, timeout: None)
    [unknown] = doctor.check_swarm_settings(joiner, [], 1.0)
    assert unknown.status == doctor.WARN
