"""The hobbyist's first hour: ``./launch.sh`` on one machine, ``./launch.sh --join ADDR`` on a second, as the README
says, land in one swarm (the first runs its tier's config, the second the default one: it takes the swarm's shared
settings from its initial peer). A joiner that chose a setting that differs from the swarm's is refused with one
line naming it, never left training alone in another run."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, Processes, clean_env, read_metrics, wait_until

pytestmark = pytest.mark.e2e

LAUNCH = str(PROJECT_ROOT / "launch.sh")


def launch(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LAUNCH, *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(480)
def test_launch_sh_join_lands_in_the_first_peers_swarm_and_different_choices_are_refused(
    tmp_path: Path, processes: Processes
) -> None:
    first_dir, second_dir, third_dir = (tmp_path / name for name in ("first", "second", "third"))
    for folder in (first_dir, second_dir, third_dir):
        folder.mkdir()
    first = processes.start([LAUNCH], first_dir / "launch.log", cwd=first_dir)  # the README's first command
    address_file = first_dir / "swarm_work" / "peer_addr.txt"
    address = wait_until(
        lambda: address_file.is_file() and address_file.read_text().split(), 120, "the first peer's address"
    )[0]

    second = processes.start([LAUNCH, "--join", address], second_dir / "launch.log", cwd=second_dir)
    second_work = second_dir / "swarm_work"
    # the first peer has trained alone meanwhile; once the second one is in, they average every round
    wait_until(
        lambda: (
            len(
                [
                    record
                    for record in read_metrics(second_work)
                    if record["swarm"]["outcome"] == "averaged" and record["swarm"]["group_size"] >= 2
                ]
            )
            >= 3
        ),
        240,
        "three rounds averaged by the two peers",
    )
    log = (second_dir / "launch.log").read_text()
    assert "joining run 'swarm-cpu' with the swarm's settings (run_id: \"swarm-default\" here" in log, log[
        -3000:
    ]
    joined = yaml.safe_load((second_work / "config.yaml").read_text())
    assert joined["run_id"] == "swarm-cpu"

    # choices of its own that differ from the swarm's: refused at once, naming each one, before any training
    for choice, named in (
        (["--recipe", "arithmetic_sft"], 'recipe.name: "arithmetic_sft" here, "arithmetic" in the swarm'),
        (["--set", "model.hidden_size=32"], "model.hidden_size: 32 here, 64 in the swarm"),
    ):
        refused = launch(third_dir, "--join", address, *choice)
        assert refused.returncode == 2, refused.stderr[-2000:]
        lines = [line for line in refused.stderr.splitlines() if line.startswith("swarm: error:")]
        assert len(lines) == 1 and named in lines[0], refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr
        assert not (third_dir / "swarm_work" / "metrics.jsonl").exists()

    for peer in (first, second):
        Processes.kill(peer, signal.SIGINT)
    assert first.wait(timeout=90) in (0, 130) and second.wait(timeout=90) in (0, 130)
