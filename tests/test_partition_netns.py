"""A partition in real network namespaces: three `swarm run` peers on one bridge, one of them cut off for 20 s
mid-run (its packets silently lost both ways), then healed. The cut-off peer must not step alone (no solo epoch,
no epoch of its own), the other two go on as the swarm, and after the heal all three end on one checksum, the
cut-off peer averaging with the others again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import Processes, finish, peer_epoch, read_metrics, wait_until
from tests.test_swarm import FAST, summary_of

pytestmark = pytest.mark.e2e

EPOCHS = 24  # the two others take ~11 epochs during the cut: the rest are rounds after the heal
CUT_S = 20.0
SETTINGS = [
    "--set",
    "network.client_mode=false",  # private addresses: auto would make them clients
    "--set",
    "training.prompts_per_round=4",
    "--set",
    "training.num_generations=4",
    "--max-epochs",
    str(EPOCHS),
    "--expected-peers",
    "3",
]


@pytest.fixture()
def lan() -> Iterator[netns.NamespaceLan]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    network = netns.NamespaceLan(3)
    try:
        yield network
    finally:
        network.close()


def start(processes: Processes, lan: netns.NamespaceLan, root: Path, index: int, join: str | None):
    workdir = root / f"peer_{index}"
    listen = f"network.host_maddrs=[/ip4/{lan.address(index)}/tcp/0]"
    joining = ["--join", join] if join else []
    process = processes.swarm(
        "run",
        "--workdir",
        str(workdir),
        *joining,
        "--set",
        listen,
        *FAST,
        *SETTINGS,
        log=workdir / "out.log",
        netns=lan.names[index],
    )
    return process, workdir


@pytest.mark.timeout(420)
def test_a_cut_off_peer_waits_and_rejoins_the_swarm_on_one_state(
    tmp_path: Path, processes: Processes, lan: netns.NamespaceLan
) -> None:
    first, dir0 = start(processes, lan, tmp_path, 0, None)
    addr_file = dir0 / "peer_addr.txt"
    wait_until(lambda: addr_file.is_file() and addr_file.read_text().strip(), 90, "the first peer's address")
    address = next(item for item in addr_file.read_text().split() if lan.address(0) in item)
    second, dir1 = start(processes, lan, tmp_path, 1, address)
    cut, dir2 = start(processes, lan, tmp_path, 2, address)
    wait_until(lambda: min(peer_epoch(d) for d in (dir0, dir1, dir2)) >= 3, 240, "all three at epoch 3")

    lan.cut(2)
    cut_at, others_at = peer_epoch(dir2), peer_epoch(dir0)
    time.sleep(CUT_S)
    during = peer_epoch(dir2)
    others_after = peer_epoch(dir0)
    lan.heal(2)

    for process, workdir in ((first, dir0), (second, dir1), (cut, dir2)):
        finish(process, 300, workdir / "out.log")
    logs = (dir2 / "out.log").read_text(errors="replace")[-4000:]
    assert during <= cut_at + 1, f"the cut-off peer went from epoch {cut_at} to {during} alone:\n{logs}"
    assert others_after >= others_at + 2, "the two connected peers did not go on during the partition"
    metrics = read_metrics(dir2)
    assert not [m["epoch"] for m in metrics if m["swarm"]["outcome"] == "solo"], logs
    summaries = [summary_of(workdir) for workdir in (dir0, dir1, dir2)]
    assert all(peer["epochs"] == EPOCHS for peer in summaries)
    assert len({peer["param_checksum"] for peer in summaries}) == 1, "the partition forked the swarm"
    # it rejoined: after the heal it averaged with both others again, not only downloaded the final state
    rejoined = [
        m
        for m in metrics
        if m["epoch"] > others_after and m["swarm"]["outcome"] == "averaged" and m["swarm"]["group_size"] == 3
    ]
    assert rejoined, logs
