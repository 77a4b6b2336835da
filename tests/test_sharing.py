"""Rollout sharing (SAPO-style), offline: signed bundles, what a receiver accepts and picks, training on a mix of
local and shared groups with TRL, and what an auditor checks about the shared groups in a contribution."""

from __future__ import annotations

import io
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm.config import ModelConfig, NetworkConfig, SwarmConfig
from swarm.identity import Identity
from swarm.network.dht import start_dht
from swarm.network.records import owner_marker
from swarm.network.rollout_records import (
    MAX_STORED_BYTES,
    RolloutBoard,
    RolloutRecordValidator,
    compress_bundle,
    inflate_bundle,
    rollouts_key,
)
from swarm.node.state import param_checksum
from swarm.recipe import Recipe, load_recipe
from swarm.sharing import (
    GroupLimits,
    RolloutBundle,
    RolloutSharing,
    SharedGroup,
    SharingError,
    check_shared,
    contribution_sharing,
    external_count,
)
from swarm.training.model import load_model_and_tokenizer
from swarm.verify.commitment import contribution_bytes, load_contribution, rollouts_hash
from swarm.verify.replay import (
    GradientRecorder,
    GRPOSettings,
    Verdict,
    contribution_from_record,
    keeps_forward,
    make_recording_trainer,
    replay_gradient,
)
from tests.conftest import wait_until

GENERATIONS = 4
RUN = "sharing-test"


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> list[Identity]:
    folder = tmp_path_factory.mktemp("keys")
    return [Identity.load_or_create(folder / f"peer{i}.key") for i in range(3)]


def config(**sharing: Any) -> SwarmConfig:
    return SwarmConfig(
        run_id=RUN,
        training=dict(prompts_per_round=4, num_generations=GENERATIONS, max_completion_length=4),
        sharing=dict(dict(enabled=True, external_fraction=0.5), **sharing),
    )


def bundle_of(identity: Identity, epoch: int, groups: list[SharedGroup], run_id: str = RUN):
    bundle, signature = RolloutBundle.create(identity, run_id, epoch, groups)
    return bundle.canonical_bytes(), signature


GROUP = SharedGroup(0, ((5, 6), (7,), (8, 9), (5,)))


# ---- bundles ---------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_bundle_round_trips_and_its_signature_checks(identities: list[Identity]) -> None:
    canonical, signature = bundle_of(identities[0], 3, [GROUP, SharedGroup(2, ((1,),) * 4)])
    bundle = RolloutBundle.from_canonical(canonical)
    bundle.verify(signature)
    assert bundle.sender == str(identities[0].peer_id) and bundle.epoch == 3 and bundle.groups[0] == GROUP
    assert bundle.canonical_bytes() == canonical


@pytest.mark.unit
def test_a_tampered_or_misattributed_bundle_is_refused(identities: list[Identity]) -> None:
    canonical, signature = bundle_of(identities[0], 3, [GROUP])
    tampered = canonical.replace(b"[5,6]", b"[5,7]")
    with pytest.raises(SharingError, match="invalid signature"):
        RolloutBundle.from_canonical(tampered).verify(signature)
    other_canonical, other_signature = bundle_of(identities[1], 3, [GROUP])
    with pytest.raises(SharingError, match="invalid signature"):  # a signature of another peer's bundle
        RolloutBundle.from_canonical(canonical).verify(other_signature)
    claimed = canonical.replace(str(identities[0].peer_id).encode(), str(identities[1].peer_id).encode())
    with pytest.raises(SharingError, match="another peer's"):  # names peer 1 but carries peer 0's key
        RolloutBundle.from_canonical(claimed).verify(signature)
    assert other_canonical != canonical


@pytest.mark.unit
@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\xff", "not JSON"),
        (b"[]", "not a swarm.rollouts/1 bundle"),
        (b'{"schema": "swarm.rollouts/1"}', "unexpected or missing fields"),
    ],
)
def test_malformed_bundles_are_refused_with_a_reason(data: bytes, problem: str) -> None:
    with pytest.raises(SharingError, match=problem):
        RolloutBundle.from_canonical(data)


@pytest.mark.unit
def test_malformed_groups_are_refused(identities: list[Identity]) -> None:
    canonical, _ = bundle_of(identities[0], 1, [GROUP])
    for bad in (b'"groups":[[0,[[5,6],[7],[8,9],[-5]]]]', b'"groups":[[0,"x"]]', b'"groups":[[-1,[]]]'):
        start = canonical.index(b'"groups":')
        end = canonical.index(b',"run_id"')
        with pytest.raises(SharingError, match="group 0"):
            RolloutBundle.from_canonical(canonical[:start] + bad + canonical[end:])


@pytest.mark.unit
def test_group_limits_name_what_is_wrong() -> None:
    limits = GroupLimits(
        num_generations=4,
        max_completion_length=3,
        vocab_size=10,
        eos_token_ids=frozenset({1}),
        rows_per_round=4,
    )
    assert limits.problem(GROUP) is None
    # would make receivers build rows
    assert "row index 4" in limits.problem(SharedGroup(4, GROUP.completions))
    assert "3 completions" in limits.problem(SharedGroup(0, GROUP.completions[:3]))
    assert "tokens (1..3" in limits.problem(SharedGroup(0, ((5, 6, 7, 8),) + GROUP.completions[1:]))
    assert "vocabulary" in limits.problem(SharedGroup(0, ((5, 10),) + GROUP.completions[1:]))
    assert "after the end" in limits.problem(SharedGroup(0, ((1, 5),) + GROUP.completions[1:]))
    assert limits.problem(SharedGroup(0, ((5, 1),) + GROUP.completions[1:])) is None  # ends with EOS: fine


@pytest.mark.unit
def test_the_mix_follows_the_configured_fraction() -> None:
    assert external_count(config(external_fraction=0.5)) == 2
    assert external_count(config(external_fraction=1.0)) == 4
    assert external_count(config(external_fraction=0.0)) == 0
    assert external_count(config(enabled=False)) == 0


# ---- receiving ---------------------------------------------------------------------------------------------------
class MemoryBoard:
    """What RolloutBoard.fetch returns, from memory: (owner, epoch, canonical bytes, signature)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int, bytes, bytes]] = []

    def add(
        self,
        identity: Identity,
        epoch: int,
        groups: list[SharedGroup],
        owner: str | None = None,
        signature: bytes | None = None,
        run_id: str = RUN,
    ) -> None:
        canonical, signed = bundle_of(identity, epoch, groups, run_id)
        self.entries.append((owner or str(identity.peer_id), epoch, canonical, signature or signed))

    def fetch(self, epochs: set[int]) -> list[tuple[str, int, bytes, bytes]]:
        return [entry for entry in self.entries if entry[1] in epochs]

    def publish(self, epoch: int, canonical: bytes, signature: bytes) -> bool:
        self.entries.append((RolloutBundle.from_canonical(canonical).sender, epoch, canonical, signature))
        return True


@dataclass
class Offline:
    model: torch.nn.Module
    tokenizer: Any
    recipe: Recipe

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def limits(self, max_completion_length: int = 4) -> GroupLimits:
        return GroupLimits(
            GENERATIONS,
            max_completion_length,
            self.model.get_input_embeddings().num_embeddings,
            frozenset([self.tokenizer.eos_token_id]),
            rows_per_round=4,
        )

    def sharing(self, identity: Identity, board: MemoryBoard, banned: tuple[str, ...] = (), **options: Any):
        return RolloutSharing(
            config(**options),
            identity,
            self.recipe,
            board,
            self.limits(),
            decode=lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=True),
            banned=lambda: banned,
        )


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Offline:
    recipe = load_recipe("arithmetic")
    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(), recipe.tokenizer_alphabet(), Path(tmp_path_factory.mktemp("models"))
    )
    return Offline(model, tokenizer, recipe)


def answered(offline: Offline, sender: Identity, epoch: int, row_index: int, right: int) -> SharedGroup:
    """A group whose first ``right`` completions give the row's correct answer and the others a wrong one."""
    row = offline.recipe.assigned_rows(RUN, str(sender.peer_id), epoch, row_index + 1)[row_index]
    answer = str(row["answer"]) if "answer" in row else None
    assert answer is not None, row
    correct, wrong = offline.encode(answer)[:4], offline.encode("=")
    return SharedGroup(row_index, tuple(correct if k < right else wrong for k in range(GENERATIONS)))


@pytest.mark.unit
def test_a_receiver_takes_other_peers_informative_groups_and_regenerates_their_rows(
    offline: Offline, identities: list[Identity]
) -> None:
    me, alice, bob = identities
    board = MemoryBoard()
    # row 1: no signal
    board.add(alice, 4, [answered(offline, alice, 4, 0, 2), answered(offline, alice, 4, 1, 0)])
    board.add(bob, 4, [answered(offline, bob, 4, 3, 1)])
    board.add(me, 4, [answered(offline, me, 4, 0, 2)])  # my own: never taken
    board.add(alice, 2, [answered(offline, alice, 2, 0, 2)])  # too old at epoch 5 (max_age_epochs 1)
    sharing = offline.sharing(me, board)
    chosen = sharing.select(5, 4)
    assert {group.key for group in chosen} == {(str(alice.peer_id), 4, 0), (str(bob.peer_id), 4, 3)}
    for group in chosen:
        sender_rows = offline.recipe.assigned_rows(RUN, group.sender, group.epoch, group.row_index + 1)
        # the receiver's own copy, not anything the sender sent
        assert group.row == sender_rows[group.row_index]
    assert [group.key for group in sharing.select(5, 4)] == [group.key for group in chosen]  # seeded
    keep_all = offline.sharing(me, board, skip_uninformative=False).select(5, 4)
    assert len(keep_all) == 3


@pytest.mark.unit
def test_a_receiver_drops_forged_banned_and_malformed_bundles(
    offline: Offline, identities: list[Identity]
) -> None:
    me, alice, bob = identities
    board = MemoryBoard()
    good = answered(offline, alice, 0, 0, 1)
    board.add(bob, 0, [good], owner=str(alice.peer_id))  # stored under alice's key, names bob
    board.add(alice, 0, [good], signature=b"not a signature")
    board.add(alice, 0, [good], run_id="another-run")
    board.add(alice, 0, [SharedGroup(1, good.completions[:2])])  # 2 completions, not 4
    board.add(bob, 0, [answered(offline, bob, 0, 0, 1)])  # banned below
    sharing = offline.sharing(me, board, banned=(str(bob.peer_id),))
    assert sharing.select(1, 4) == []
    assert sharing.dropped == 4


# ---- training on a mix, and auditing it --------------------------------------------------------------------------
def capture_with_shared(offline: Offline, identity: Identity, epoch: int, local: int, shared: list):
    settings = GRPOSettings(num_generations=GENERATIONS, max_completion_length=4, seed=3)
    rows = [*offline.recipe.assigned_rows(RUN, str(identity.peer_id), epoch, local), *(g.row for g in shared)]
    forced = {local + index: group.completions for index, group in enumerate(shared)}
    named = [(name, param) for name, param in offline.model.named_parameters() if param.requires_grad]
    recorder = GradientRecorder(named, None)
    with tempfile.TemporaryDirectory() as scratch, keeps_forward(offline.model):
        trainer = make_recording_trainer(
            offline.model,
            offline.tokenizer,
            offline.recipe,
            rows,
            settings,
            recorder,
            scratch,
            forced_rows=forced,
        )
        trainer.train()
    contribution = contribution_from_record(trainer, recorder, param_checksum(offline.model), rows, settings)
    bundles, groups = contribution_sharing(shared)
    return contribution.with_changes(shared_bundles=bundles, shared_groups=groups)


@pytest.fixture(scope="module")
def mixed(offline: Offline, identities: list[Identity]):
    me, alice, bob = identities
    board = MemoryBoard()
    board.add(alice, 6, [answered(offline, alice, 6, 0, 2), answered(offline, alice, 6, 2, 3)])
    board.add(bob, 6, [answered(offline, bob, 6, 1, 1)])
    shared = offline.sharing(me, board).select(7, 2)
    assert len(shared) == 2
    return capture_with_shared(offline, me, 7, 2, shared), shared


@pytest.mark.unit
def test_training_on_a_mix_samples_local_rows_and_takes_shared_completions_as_given(
    offline: Offline, mixed
) -> None:
    contribution, shared = mixed
    assert contribution.num_completions == 4 * GENERATIONS
    for index, group in enumerate(shared):
        start = (2 + index) * GENERATIONS
        assert contribution.completion_token_ids[start : start + GENERATIONS] == [
            list(ids) for ids in group.completions
        ]
        prompts = offline.tokenizer.batch_decode(contribution.prompt_token_ids[start : start + GENERATIONS])
        assert prompts == [group.row["prompt"]] * GENERATIONS
    # the receiver's own reward functions scored the shared completions: the right answers earn "correct"
    correct = contribution.reward_names.index("correct")
    for index, group in enumerate(shared):
        answer = offline.encode(group.row["answer"])
        scored = contribution.rewards[(2 + index) * GENERATIONS : (3 + index) * GENERATIONS, correct].tolist()
        assert scored == [1.0 if ids == answer else 0.0 for ids in group.completions]
        assert 0 < sum(scored) < GENERATIONS


@pytest.mark.unit
def test_an_auditor_accepts_an_honest_mix_and_replays_it_exactly(
    offline: Offline, identities: list[Identity], mixed
) -> None:
    contribution, _ = mixed
    contribution = load_contribution(contribution_bytes(contribution))  # as served over the network
    me = str(identities[0].peer_id)
    shared_rows = check_shared(
        config(),
        offline.recipe,
        me,
        7,
        contribution.shared_bundles,
        contribution.shared_groups,
        contribution.completion_token_ids,
        len(contribution.rows),
    )
    rows = [
        *offline.recipe.assigned_rows(RUN, me, 7, len(contribution.rows) - len(shared_rows)),
        *shared_rows,
    ]
    assert rows == contribution.rows
    result = replay_gradient(offline.model, offline.tokenizer, offline.recipe, contribution, rows=rows)
    assert result.verdict is Verdict.PASS and result.error == 0.0


@pytest.mark.unit
def test_the_commitment_binds_the_shared_bundles(mixed) -> None:
    contribution, _ = mixed
    swapped = contribution.with_changes(shared_groups=contribution.shared_groups[::-1])
    assert swapped.shared_groups != contribution.shared_groups
    assert rollouts_hash(swapped) != rollouts_hash(contribution)
    canonical, signature = contribution.shared_bundles[0]
    resigned = contribution.with_changes(
        shared_bundles=[[canonical, signature + b"x"], *contribution.shared_bundles[1:]]
    )
    assert rollouts_hash(resigned) != rollouts_hash(contribution)


@pytest.mark.unit
def test_an_auditor_refuses_shared_groups_that_were_not_published_as_claimed(
    offline: Offline, identities: list[Identity], mixed
) -> None:
    contribution, _ = mixed
    me = str(identities[0].peer_id)

    def check(
        changed=contribution, cfg: SwarmConfig | None = None, audited: str = me, epoch: int = 7
    ) -> None:
        check_shared(
            cfg or config(),
            offline.recipe,
            audited,
            epoch,
            changed.shared_bundles,
            changed.shared_groups,
            changed.completion_token_ids,
            len(changed.rows),
        )

    check()
    completions = [list(ids) for ids in contribution.completion_token_ids]
    completions[2 * GENERATIONS][0] = (
        completions[2 * GENERATIONS][0] + 1
    ) % 10  # hand-made, not the sender's
    with pytest.raises(SharingError, match="not what"):
        check(contribution.with_changes(completion_token_ids=completions))
    bundle, signature = contribution.shared_bundles[0]
    with pytest.raises(SharingError, match="invalid signature"):
        check(
            contribution.with_changes(
                shared_bundles=[[bundle, signature[::-1]], *contribution.shared_bundles[1:]]
            )
        )
    with pytest.raises(SharingError, match="own"):
        sender = RolloutBundle.from_canonical(bundle).sender
        check(audited=sender)
    with pytest.raises(SharingError, match="not allowed"):
        check(epoch=9)  # epoch 6 bundles are too old at epoch 9
    with pytest.raises(SharingError, match="more than the 1 allowed"):
        check(cfg=config(external_fraction=0.25))
    with pytest.raises(SharingError, match="sharing is off"):
        check(cfg=config(enabled=False))
    with pytest.raises(SharingError, match="repeats"):
        check(contribution.with_changes(shared_groups=[contribution.shared_groups[0]] * 2))


# ---- the DHT records ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, identities: list[Identity]):
    root = tmp_path_factory.mktemp("dht")
    nodes = []
    try:
        for index in range(2):
            peers = [str(addr) for node in nodes for addr in node.get_visible_maddrs()][:1]
            nodes.append(
                start_dht(
                    NetworkConfig(client_mode=False, initial_peers=peers),
                    identities[index],
                    root / str(index),
                    run_id=RUN,
                )
            )
        yield nodes
    finally:
        for node in nodes:
            node.shutdown()


@pytest.mark.integration
def test_bundles_travel_through_the_dht_and_junk_is_dropped(two_nodes, identities: list[Identity]) -> None:
    alice_node, bob_node = two_nodes
    alice = identities[0]
    board = RolloutBoard(alice_node, RUN, alice, ttl=60, max_record_bytes=64 * 1024)
    canonical, signature = bundle_of(alice, 11, [GROUP])
    assert board.publish(11, canonical, signature)
    assert not RolloutBoard(alice_node, RUN, alice, ttl=60, max_record_bytes=16).publish(
        12, canonical, signature
    )
    expiration = get_dht_time() + 60
    marker = owner_marker(alice)
    junk = {
        b"13:": {"bundle": b"not zlib", "signature": b"s"},
        b"14:": {"bundle": zlib.compress(b"0" * (20 << 20)), "signature": b"s"},  # inflates past 16 MiB
        b"15:": "not a dict",
    }
    for prefix, value in junk.items():
        # a guarded node takes bytes it cannot check cheaply (the reader inflates them), not a value of another shape
        stored = alice_node.store(rollouts_key(RUN), value, expiration, subkey=prefix + marker)
        assert stored == isinstance(value, dict)
    reader = RolloutBoard(bob_node, RUN, identities[1], ttl=60, max_record_bytes=64 * 1024)
    found = wait_until(lambda: reader.fetch({11, 12, 13, 14, 15}), 20, "alice's bundle at bob's node")
    assert found == [(str(alice.peer_id), 11, canonical, signature)]
    assert inflate_bundle(compress_bundle(canonical)) == canonical and inflate_bundle(b"junk") is None


@pytest.mark.integration
def test_dht_nodes_refuse_rollout_values_that_cannot_be_bundles(two_nodes) -> None:
    alice_node, bob_node = two_nodes
    # a plain value would replace every peer's bundles at once: a guarded node does not store it
    assert not bob_node.store(rollouts_key(RUN), b"everything", get_dht_time() + 60)
    validator = RolloutRecordValidator(RUN)
    key = DHTID.generate(source=rollouts_key(RUN)).to_bytes()
    subkey = DHTProtocol.serializer.dumps(b"1:[owner:x]")
    record = DHTRecord(key=key, subkey=subkey, value=b"v" * 100, expiration_time=get_dht_time() + 60)
    assert validator.validate(record)
    assert not validator.validate(replace(record, value=b"v" * (MAX_STORED_BYTES + 1)))
    other = DHTID.generate(source=f"{RUN}.peers").to_bytes()
    assert validator.validate(replace(record, key=other, value=b"v" * (MAX_STORED_BYTES + 1)))  # not its key


@pytest.mark.unit
def test_the_dashboard_shows_shared_rollouts_only_when_sharing_is_on() -> None:
    from rich.console import Console

    from swarm.monitor.dashboard import DashboardState, render

    def text(state: DashboardState) -> str:
        console = Console(record=True, width=120, file=io.StringIO())
        console.print(render(state))
        return console.export_text()

    state = DashboardState(name="peer", run_id=RUN)
    assert "shared rollouts" not in text(state)
    state.sharing = {
        "published_groups": 12,
        "used_groups": 5,
        "received_groups": 9,
        "dropped": 0,
    }
    assert "12 / 5 groups" in text(state)


@pytest.mark.unit
def test_an_auditor_refuses_a_shared_row_beyond_any_peers_own_rows(
    offline: Offline, identities: list[Identity]
) -> None:
    me, alice = str(identities[0].peer_id), identities[1]
    # a receiver would have to build a million rows to check it
    far = SharedGroup(10**6, ((5,),) * GENERATIONS)
    canonical, signature = bundle_of(alice, 6, [far])
    completions = [list(ids) for ids in far.completions]
    with pytest.raises(SharingError, match="beyond"):
        check_shared(config(), offline.recipe, me, 7, [[canonical, signature]], [[0, 0]], completions, 1)


@pytest.mark.unit
def test_every_receiver_drops_a_shared_group_that_was_not_sampled_and_keeps_the_sampled_ones(
    offline: Offline, identities: list[Identity]
) -> None:
    """Rollout sharing with the sampling check (what a verifying peer installs): a group whose completions the
    sender chose (here the right answer, which earns full reward) is dropped by every receiver before it reaches a
    gradient; the sender's honestly sampled group is used."""
    from swarm.sampling import SamplingParams, generate, round_seed
    from swarm.trl_adapter import prompt_token_ids, stop_token_ids
    from swarm.verify.checks import SAMPLING_MARGIN, shared_group_problem

    me, alice, bob = identities
    epoch, tokenizer, model = 4, offline.tokenizer, offline.model
    seed = round_seed(RUN, str(alice.peer_id), epoch)
    stops = list(stop_token_ids(model, tokenizer))
    rows = offline.recipe.assigned_rows(RUN, str(alice.peer_id), epoch, 2)
    sampled = generate(
        model,
        [prompt_token_ids(tokenizer, rows[0]["prompt"])] * GENERATIONS,
        [(seed, 0, generation) for generation in range(GENERATIONS)],
        SamplingParams(1.0),
        4,
        stops,
        tokenizer.pad_token_id,
    )
    honest = SharedGroup(0, tuple(tuple(ids) for ids in sampled))
    chosen = answered(offline, alice, epoch, 1, GENERATIONS // 2)
    board = MemoryBoard()
    board.add(alice, epoch, [honest, chosen])
    settings = GRPOSettings(num_generations=GENERATIONS, max_completion_length=4, stop_token_ids=tuple(stops))

    def check(group) -> str | None:
        return shared_group_problem(
            model,
            prompt_token_ids(tokenizer, group.row["prompt"]),
            group.completions,
            group.row_index,
            replace(settings, seed=round_seed(RUN, group.sender, group.epoch)),
            stops,
            tokenizer.pad_token_id,
            SAMPLING_MARGIN["fp32"],
        )

    for receiver in (me, bob):
        sharing = offline.sharing(receiver, board, skip_uninformative=False)
        sharing.sampled = check
        picked = sharing.select(epoch + 1, 4)
        assert [group.key for group in picked] == [(str(alice.peer_id), epoch, 0)]
        assert sharing.figures()["dropped_unsampled"] == 1
