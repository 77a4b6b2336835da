"""The audit protocol of :class:`Verifier` with several simulated peers sharing one in-memory verdict board: who
audits, when a failure is re-checked, when it is final, and what a lying auditor can (not) do. The replays
themselves are stubbed here (tests/test_replay.py, tests/test_attacks.py and tests/test_verify_swarm.py run real
ones)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from swarm.config import SwarmConfig
from swarm.network.records import AuditVerdict
from swarm.node.rounds import Outcome, RoundResult
from swarm.verify.auditor import VerificationObserver, Verifier
from swarm.verify.replay import GRPOSettings
from swarm.verify.selection import AuditAssignment

pytestmark = pytest.mark.unit


class EqualWeights:
    """Every peer weighs 1 (as members of this peer's round do before they have ledger credit)."""

    def weight(self, peer_id: str) -> float:
        return 1.0


@dataclass
class FakePeer:
    peer_id: str
    banned: list[str] = field(default_factory=list)
    trust: EqualWeights = field(default_factory=EqualWeights)

    def set_banned(self, peer_ids: list[str]) -> None:
        self.banned = list(peer_ids)


class SharedVerdicts:
    """The DHT's verdict key, shared by every simulated peer."""

    def __init__(self) -> None:
        self.verdicts: list[AuditVerdict] = []

    def publish(self, verdict: AuditVerdict) -> bool:
        self.verdicts.append(verdict)
        return True

    def fetch(self, epoch: int | None = None) -> list[AuditVerdict]:
        return [verdict for verdict in self.verdicts if epoch is None or verdict.epoch == epoch]


class NoCommitments:
    def fetch(self, epoch: int) -> dict:
        return {}


class Recorder(VerificationObserver):
    def __init__(self) -> None:
        self.finals: list[tuple[str, bool]] = []

    def on_final(self, assignment, passed, verdicts, current_epoch) -> None:
        self.finals.append((assignment.audited, passed))


PEERS = [f"Qm{name}" for name in ("Alice", "Bob", "Carol", "Dave")]
FIVE = [*PEERS, "QmErin"]
EVIDENCE = dict(replayed_hash="ab" * 32, worst_index=0)


def make_swarm(
    tmp_path: Path, cheaters: set[str], liars: set[str], peers: list[str] = PEERS, recheck_auditors: int = 2
) -> tuple[dict[str, Verifier], dict[str, Recorder]]:
    """Verifiers of ``peers``; replays of a cheater's contribution fail, a liar fails every contribution it replays."""
    board = SharedVerdicts()
    verifiers, recorders = {}, {}
    for peer_id in peers:
        config = SwarmConfig(workdir=tmp_path / peer_id)
        config.verify.audit_probability = 1.0
        config.verify.recheck_auditors = recheck_auditors
        # a re-checker does not wait for a primary verdict that comes later
        config.verify.fetch_timeout = 0.01
        config.workdir.mkdir(parents=True)
        recorders[peer_id] = Recorder()
        verifier = Verifier(
            config, FakePeer(peer_id), None, None, None, GRPOSettings(), observers=[recorders[peer_id]]
        )
        verifier.verdicts, verifier.commitments = board, NoCommitments()
        verifier.snapshots[0] = []

        def judge(assignment, me=peer_id):
            failed = assignment.audited in cheaters or me in liars
            return ("gradient_mismatch", 0.5, EVIDENCE) if failed else ("pass", 0.0, EVIDENCE)

        verifier._judge = judge
        verifiers[peer_id] = verifier
    return verifiers, recorders


def run_round(verifiers: dict[str, Verifier], epoch: int = 0) -> None:
    """One averaged round of the peers in ``verifiers`` (peer i committed the digest f"{i:064x}")."""
    members = {peer: f"{i:064x}" for i, peer in enumerate(FIVE) if peer in verifiers}
    averaged = "averaged-gradient" if epoch == 0 else f"averaged-gradient-{epoch}"
    result = RoundResult(Outcome.AVERAGED, epoch, len(members), members, averaged)
    for verifier in verifiers.values():
        verifier.snapshots.setdefault(epoch, [])
        verifier.after_round(result)
    for _ in range(3):  # primaries first (every peer), then re-checks, then decisions
        for verifier in verifiers.values():
            verifier.process(current_epoch=epoch + 1)


def test_a_cheater_is_rechecked_failed_by_a_majority_and_banned_everywhere(tmp_path: Path) -> None:
    verifiers, recorders = make_swarm(tmp_path, cheaters={"QmDave"}, liars=set())
    run_round(verifiers)
    for peer_id, verifier in verifiers.items():
        if peer_id == "QmDave":
            assert verifier.peer.banned == [] and verifier.stats.my_audits_failed == 1  # never bans itself
            continue
        assert verifier.peer.banned == ["QmDave"]
        events = [
            json.loads(line) for line in (tmp_path / peer_id / "audit_events.jsonl").read_text().splitlines()
        ]
        assert [(event["audited"], event["verdicts"]) for event in events] == [
            ("QmDave", ["gradient_mismatch"])
        ]
        assert ("QmDave", False) in recorders[peer_id].finals
    verdicts = verifiers["QmAlice"].verdicts.fetch(0)
    about_dave = [verdict for verdict in verdicts if verdict.audited == "QmDave"]
    assert len(about_dave) == 3 and {verdict.role for verdict in about_dave} == {"primary", "recheck"}
    # honest contributions are audited once (no re-check when the primary passes) and decided as passed
    for peer_id in ("QmAlice", "QmBob", "QmCarol"):
        assert len([verdict for verdict in verdicts if verdict.audited == peer_id]) == 1
        assert (peer_id, True) in recorders["QmAlice"].finals


def events_of(verifier: Verifier) -> list[dict]:
    path = verifier.events_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("liar", PEERS)
def test_one_lying_auditor_never_gets_an_honest_peer_banned_and_is_banned_itself(
    tmp_path: Path, liar: str
) -> None:
    verifiers, _ = make_swarm(tmp_path, cheaters=set(), liars={liar})
    run_round(verifiers)
    lied_as_primary = any(
        verdict.auditor == liar and verdict.role == "primary" and not verdict.passed
        for verdict in verifiers[liar].verdicts.fetch(0)
    )
    for peer_id, verifier in verifiers.items():
        assert verifier.stats.my_audits_failed == 0
        if peer_id == liar:
            continue  # what a liar decides for itself is its own business
        assert not [event for event in events_of(verifier) if event["event"] == "audit_failed"]
        if lied_as_primary:  # the re-check refuted it: a false accuser, banned like a cheater
            assert verifier.peer.banned == [liar]
            assert {
                event["accuser"] for event in events_of(verifier) if event["event"] == "false_accusation"
            } == {liar}
        else:  # it was nobody's primary in this round: it had nothing to lie about
            assert verifier.peer.banned == []


@pytest.mark.parametrize("recheck_auditors", [8, 2])
def test_two_colluding_auditors_among_five_ban_nobody_honest_and_are_banned(
    tmp_path: Path, recheck_auditors: int
) -> None:
    """Two colluders train honestly and fail every contribution they audit or re-check. With 8 re-checkers the whole
    round re-checks a primary's failure; with 2, both colluders fill three of a contribution's auditors half of the
    time, and the honest re-checker's pass puts the failure to the rest of the round (the escalation). Every honest
    peer goes by its own replay: no honest peer fails anywhere honest, and both colluders are false accusers."""
    colluders = {"QmCarol", "QmErin"}
    verifiers, recorders = make_swarm(
        tmp_path, cheaters=set(), liars=colluders, peers=FIVE, recheck_auditors=recheck_auditors
    )
    for verifier in verifiers.values():
        verifier.verify.ban_epochs = 1  # banned peers are still audited in the next rounds of this simulation
    epochs = range(6)
    for epoch in epochs:
        run_round(verifiers, epoch)
    verdicts = verifiers["QmAlice"].verdicts.fetch()
    honest = set(FIVE) - colluders
    against_honest = [verdict for verdict in verdicts if not verdict.passed and verdict.audited in honest]
    assert {verdict.auditor for verdict in against_honest} == colluders  # both lied about honest peers...
    # ...together, too
    assert any(
        {verdict.auditor for verdict in against_honest if (verdict.epoch, verdict.audited) == key}
        == colluders
        for key in {(verdict.epoch, verdict.audited) for verdict in against_honest}
    )
    if (
        recheck_auditors == 2
    ):  # the colluders did fill a panel, and the round's other member replayed the dispute
        assert any(
            verdict.role == "recheck" and verdict.auditor not in target.auditors
            for verdict in verdicts
            for target in verifiers["QmAlice"].assignments.get(verdict.epoch, [])
            if target.audited == verdict.audited and colluders <= set(target.auditors)
        )
    for peer_id in honest:
        verifier = verifiers[peer_id]
        assert not [event for event in events_of(verifier) if event["event"] == "audit_failed"]
        assert len(recorders[peer_id].finals) == 5 * len(epochs)
        # every contribution passed, on every honest peer
        assert all(passed for _, passed in recorders[peer_id].finals)
        accused = {event["accuser"] for event in events_of(verifier) if event["event"] == "false_accusation"}
        assert accused == colluders, peer_id  # each refuted accuser is a false accuser here


def test_a_verdict_from_an_auditor_the_beacon_did_not_assign_does_not_count(tmp_path: Path) -> None:
    verifiers, _ = make_swarm(tmp_path, cheaters=set(), liars=set())
    alice = verifiers["QmAlice"]
    result = RoundResult(Outcome.AVERAGED, 0, 4, {peer: f"{i:064x}" for i, peer in enumerate(PEERS)}, "avg")
    assignments = {assignment.audited: assignment for assignment in alice.after_round(result)}
    target = assignments["QmBob"]
    for auditor in ("QmBob", "QmStranger"):  # the audited peer itself, and a peer outside the group
        alice.verdicts.publish(
            AuditVerdict.model_construct(
                auditor=auditor,
                audited="QmBob",
                epoch=0,
                commitment=target.commitment,
                verdict="gradient_mismatch",
                error=1.0,
                role="primary",
            )
        )
    alice._finalize(current_epoch=1)
    assert alice.peer.banned == []


class PublishedCommitments:
    """The commitments key as an outsider reads it: one commitment per peer, identified by its digest."""

    def __init__(self, digests: dict[str, str]) -> None:
        self.digests = digests

    def fetch(self, epoch: int) -> dict:
        return {
            peer: type("Published", (), {"digest": lambda self, d=digest: d})()
            for peer, digest in self.digests.items()
        }


def test_a_peer_outside_the_round_bans_on_a_quorum_of_failing_auditors(tmp_path: Path) -> None:
    """A peer whose all-reduce failed (or that joined later) does not know the round's beacon: it bans a peer that
    two distinct auditors failed on its real commitment, never on one auditor's word or on a commitment it never
    published."""
    verifiers, _ = make_swarm(tmp_path, cheaters={"QmDave"}, liars=set())
    outsider = verifiers.pop("QmAlice")
    run_round(verifiers)  # Alice was not in this round: she has no assignments for it
    assert not outsider.assignments
    digests = {peer: f"{i:064x}" for i, peer in enumerate(PEERS)}
    # not the commitment the auditors failed
    outsider.commitments = PublishedCommitments({"QmDave": "f" * 64})
    outsider._finalize(current_epoch=2)
    assert outsider.peer.banned == []
    outsider.commitments = PublishedCommitments(digests)
    outsider._finalize(current_epoch=1)  # the round's re-checks may still be under way: not yet
    assert outsider.peer.banned == []
    outsider._finalize(current_epoch=2)
    assert outsider.peer.banned == ["QmDave"]
    events = [json.loads(line) for line in outsider.events_path.read_text().splitlines()]
    assert [event["audited"] for event in events] == ["QmDave"]


def test_one_failing_auditor_is_not_enough_for_a_peer_outside_the_round(tmp_path: Path) -> None:
    verifiers, _ = make_swarm(tmp_path, cheaters=set(), liars={"QmBob"})
    outsider = verifiers.pop("QmAlice")
    run_round(verifiers)
    outsider.commitments = PublishedCommitments({peer: f"{i:064x}" for i, peer in enumerate(PEERS)})
    outsider._finalize(current_epoch=2)
    assert outsider.peer.banned == []


class FlakyVerdicts(SharedVerdicts):
    """A verdict board whose first ``failures`` stores are refused (no DHT node stored them)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def publish(self, verdict: AuditVerdict) -> bool:
        if self.failures > 0:
            self.failures -= 1
            return False
        return super().publish(verdict)


def test_a_verdict_the_dht_did_not_store_is_published_again(tmp_path: Path) -> None:
    """The audited peer waits for its verdict before leaving: a store that failed must not lose it."""
    verifiers, recorders = make_swarm(tmp_path, cheaters=set(), liars=set())
    board = FlakyVerdicts(failures=1)
    for verifier in verifiers.values():
        verifier.verdicts = board
    members = {peer: f"{i:064x}" for i, peer in enumerate(PEERS)}
    for verifier in verifiers.values():
        verifier.after_round(RoundResult(Outcome.AVERAGED, 0, len(members), members, "averaged-gradient"))
    for verifier in verifiers.values():
        verifier.process(current_epoch=1)  # every primary audits; the first verdict published is refused
    assert board.failures == 0 and len(board.verdicts) == len(PEERS) - 1
    for _ in range(2):
        for verifier in verifiers.values():
            verifier.process(current_epoch=1)  # the next pass publishes it again, then everyone decides
    assert len(board.verdicts) == len(PEERS) and {verdict.audited for verdict in board.verdicts} == set(PEERS)
    # each knows its audit passed
    assert all((peer_id, True) in recorders[peer_id].finals for peer_id in PEERS)


def assignments_of(verifiers: dict[str, Verifier], members: list[str]) -> dict[str, AuditAssignment]:
    """Derive one round of ``members`` on every verifier; the assignments by audited peer."""
    digests = {peer: f"{PEERS.index(peer):064x}" for peer in members}
    result = RoundResult(Outcome.AVERAGED, 0, len(digests), digests, "averaged-gradient")
    found = {}
    for verifier in verifiers.values():
        found = {assignment.audited: assignment for assignment in verifier.after_round(result)}
    return found


def test_a_silent_primary_is_replaced_by_the_first_rechecker_a_round_later(tmp_path: Path) -> None:
    """The primary's all-reduce failed one-sidedly: it never learnt the round's beacon, so it never audits. The
    first re-checker takes over once a whole round passed without its verdict, and every member decides."""
    verifiers, recorders = make_swarm(tmp_path, cheaters=set(), liars=set())
    assignments = assignments_of(verifiers, PEERS)
    silent = assignments["QmAlice"].auditors[0]
    present = {peer: verifier for peer, verifier in verifiers.items() if peer != silent}
    orphaned = [assignment for assignment in assignments.values() if assignment.auditors[0] == silent]
    for _ in range(2):
        for verifier in present.values():
            verifier.process(current_epoch=1)
    for assignment in orphaned:  # the round just ended: nobody takes over yet
        assert all((assignment.audited, True) not in recorders[peer].finals for peer in present)
    for _ in range(2):
        for verifier in present.values():
            verifier.process(current_epoch=2)
    verdicts = present[next(iter(present))].verdicts.fetch(0)
    for assignment in orphaned:
        takeover = [verdict for verdict in verdicts if verdict.audited == assignment.audited]
        assert [(verdict.auditor, verdict.role) for verdict in takeover] == [
            (assignment.auditors[1], "takeover")
        ]
        assert all((assignment.audited, True) in recorders[peer].finals for peer in present)
    assert all(verifier.peer.banned == [] for verifier in present.values())


@pytest.mark.parametrize("primary", ["left", "silent"])
def test_at_the_end_of_the_run_a_silent_primary_is_replaced_without_waiting_a_round(
    tmp_path: Path, primary: str
) -> None:
    """The last round's primary is out of the round (it left, or it is still there but never audits): the peers
    that finish do not wait out their timeout for its verdict."""
    verifiers, recorders = make_swarm(tmp_path, cheaters=set(), liars=set())
    assignments = assignments_of(verifiers, PEERS)
    silent = assignments["QmAlice"].auditors[0]
    present = {peer: verifier for peer, verifier in verifiers.items() if peer != silent}
    for peer, verifier in present.items():
        live = set(PEERS) - {peer} - ({silent} if primary == "left" else set())
        verifier.peer.other_peers = lambda live=live: dict.fromkeys(live)
    threads = [threading.Thread(target=verifier.finish, args=(1, 30.0)) for verifier in present.values()]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 10
    for assignment in assignments.values():
        if assignment.audited != silent:
            assert all((assignment.audited, True) in recorders[peer].finals for peer in present)


def test_a_rechecker_taking_over_early_does_not_pass_a_cheater(tmp_path: Path) -> None:
    """A re-checker colluding with a cheater publishes a "takeover" pass right after the round, before the primary's
    verdict is out: it does not stand for the primary's, which fails the cheater; the other re-checker confirms."""
    verifiers, recorders = make_swarm(tmp_path, cheaters={"QmDave"}, liars=set())
    target = assignments_of(verifiers, PEERS)["QmDave"]
    colluder = verifiers[target.auditors[1]]
    colluder.verdicts.publish(
        AuditVerdict(
            auditor=colluder.me,
            audited="QmDave",
            epoch=0,
            commitment=target.commitment,
            verdict="pass",
            error=0.0,
            role="takeover",
        )
    )
    colluder.performed.add((0, "QmDave"))
    for verifier in verifiers.values():  # everyone reads the board before the primary's verdict is out
        verifier._finalize(current_epoch=1)
    assert all(("QmDave", True) not in recorder.finals for recorder in recorders.values())
    for _ in range(2):
        for verifier in verifiers.values():
            verifier.process(current_epoch=1)
    for peer_id, verifier in verifiers.items():
        if peer_id != colluder.me:
            assert verifier.peer.banned == ([] if peer_id == "QmDave" else ["QmDave"])


def test_what_a_verifier_remembers_stays_bounded_over_many_epochs(tmp_path: Path) -> None:
    verifiers, _ = make_swarm(tmp_path, cheaters=set(), liars=set())
    window = verifiers["QmAlice"].verify.audit_window + 2
    epochs = 2 * window + 2  # what a verifier keeps, once it has forgotten more than twice over
    for epoch in range(epochs):
        run_round(verifiers, epoch)
    for verifier in verifiers.values():
        assert {epoch for epoch, _ in verifier.finalized} == set(range(epochs - window, epochs))
        assert len(verifier.performed) <= window * len(PEERS) and len(verifier.assignments) <= window
