"""The contribution pipeline (swarm/training/pipeline.py): a cheater of the attack suite is a wrapper around the
honest pipeline, installed from the config, changing what goes into each stage and what comes out of it. The trainer
calls the same four stages for every peer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from swarm.training.pipeline import CheatingPipeline, ComputedRound, ComputeRequest, HonestPipeline, install
from swarm.verify.attacks import Attack

pytestmark = pytest.mark.unit

ROWS = [{"prompt": "1+1="}, {"prompt": "2+2="}]
OTHER_ROWS = [{"prompt": "7+7="}, {"prompt": "8+8="}]


class Recorder(Attack):
    """Changes every seam and notes what each one was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def compute_rows(self, context):
        self.seen.append(("compute_rows", context))
        return context.unassigned_rows()

    def reward_funcs(self, honest):
        return ["forged", *honest]

    def autocast_dtype(self):
        return torch.bfloat16

    def tamper(self, contribution, context):
        self.seen.append(("tamper", context))
        return SimpleNamespace(gradient=[-grad for grad in contribution.gradient], epoch=contribution.epoch)

    def sent(self, gradient, context):
        self.seen.append(("sent", context))
        return [grad * 2 for grad in gradient]

    def deceive(self, peer):
        peer.deceived = True


def honest_step(requests: list[ComputeRequest]):
    def compute(request: ComputeRequest) -> ComputedRound:
        requests.append(request)
        gradient = [torch.ones(2)]
        contribution = SimpleNamespace(gradient=gradient, epoch=request.epoch)
        return ComputedRound(None, gradient, 8, contribution)

    return compute


def run(pipeline, epoch: int) -> ComputedRound:
    request = ComputeRequest(epoch=epoch, rows=ROWS, seed=epoch, reward_funcs=["correct"])
    return pipeline.send(request, pipeline.commit(request, pipeline.compute(request)))


def test_without_an_attack_the_pipeline_is_the_honest_one_and_changes_nothing() -> None:
    requests: list[ComputeRequest] = []
    honest = HonestPipeline(honest_step(requests))
    pipeline = install(honest, None, unassigned_rows=lambda request: OTHER_ROWS, other=lambda epoch: None)
    assert pipeline is honest
    computed = run(pipeline, 0)
    assert requests[0].compute_rows is None and requests[0].use_shared and requests[0].autocast_dtype is None
    assert computed.sent is computed.contribution.gradient and torch.equal(computed.sent[0], torch.ones(2))
    peer = SimpleNamespace()
    pipeline.announce(peer)
    assert not hasattr(peer, "deceived")


def test_a_cheater_wraps_every_stage_with_one_context_per_epoch() -> None:
    requests: list[ComputeRequest] = []
    attack = Recorder()
    pipeline = install(
        HonestPipeline(honest_step(requests)),
        attack,
        unassigned_rows=lambda request: OTHER_ROWS,
        other=lambda epoch: None,
    )
    assert isinstance(pipeline, CheatingPipeline)
    computed = run(pipeline, 0)
    # compute: the honest step ran on the cheater's request
    request = requests[0]
    assert request.compute_rows == OTHER_ROWS and request.rows == ROWS and not request.use_shared
    assert request.reward_funcs == ["forged", "correct"] and request.autocast_dtype == torch.bfloat16
    # commit and send: the tampered contribution is committed, and what it sends derives from that one
    assert torch.equal(computed.contribution.gradient[0], -torch.ones(2))
    assert torch.equal(computed.sent[0], -2 * torch.ones(2))
    assert computed.sent[0] is not computed.contribution.gradient[0]
    contexts = {id(context) for _, context in attack.seen}
    assert [name for name, _ in attack.seen] == ["compute_rows", "tamper", "sent"] and len(contexts) == 1
    first = attack.seen[0][1]
    assert first.previous is None and first.rows == ROWS
    # the next epoch: a new context, which knows what the cheater committed before
    committed = computed.contribution
    run(pipeline, 1)
    later = attack.seen[3][1]
    assert later is not first and later.previous is committed
    peer = SimpleNamespace()
    pipeline.announce(peer)
    assert peer.deceived
