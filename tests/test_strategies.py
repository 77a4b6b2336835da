"""The strategy slot (``averaging.strategy``): strategies are found by name or file, get their options from the
config, and a custom one selected through the config runs every round of a real swarm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm.errors import UserError
from swarm.training.strategies import (
    RoundInput,
    Strategy,
    available_strategies,
    register_strategy,
    strategy_class,
)
from swarm.training.strategies.sync import SyncGradientAveraging
from tests.conftest import clean_env, run_local, run_swarm

TOY_STRATEGY = '''
import json

from swarm.node.state import param_checksum, tensors_hash
from swarm.training.strategies.sync import SyncGradientAveraging


class AverageWithoutStepping(SyncGradientAveraging):
    """Meets the swarm exactly like sync, then never changes the parameters: only the epoch moves on."""

    def step(self, result):
        line = dict(epoch=result.epoch, outcome=result.outcome.value, update=tensors_hash(result.epoch, result.update),
                    params=param_checksum(self.peer.state.model))
        with open(self.peer.config.workdir / "toy-steps.jsonl", "a") as out:
            out.write(json.dumps(line) + "\\n")
        self.peer.advance(result.epoch + 1, result.samples)
'''


@pytest.mark.unit
def test_sync_is_the_default_and_a_strategy() -> None:
    assert strategy_class("sync") is SyncGradientAveraging
    assert issubclass(SyncGradientAveraging, Strategy)
    assert "sync" in available_strategies()


@pytest.mark.unit
def test_a_registered_strategy_is_found_by_name() -> None:
    @register_strategy("test-registered")
    class Registered(SyncGradientAveraging):
        pass

    assert strategy_class("test-registered") is Registered
    assert "test-registered" in available_strategies()
    with pytest.raises(TypeError, match="must define round"):
        register_strategy("broken")(type("Broken", (), {}))


@pytest.mark.unit
def test_a_strategy_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "toy.py"
    path.write_text(TOY_STRATEGY)
    cls = strategy_class(f"{path}:AverageWithoutStepping")
    assert issubclass(cls, SyncGradientAveraging) and cls.__name__ == "AverageWithoutStepping"


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", "averaging.strategy: 'nope' is not a strategy (available: "),
        ("missing.py:Thing", "averaging.strategy: file missing.py does not exist"),
    ],
)
def test_an_unknown_strategy_is_a_one_line_error(name: str, message: str) -> None:
    with pytest.raises(UserError) as caught:
        strategy_class(name)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.unit
def test_a_file_without_that_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "toy.py"
    path.write_text(TOY_STRATEGY)
    with pytest.raises(UserError, match="is not a class with round"):
        strategy_class(f"{path}:Missing")


@pytest.mark.unit
def test_an_unknown_option_names_the_strategy_and_the_option() -> None:
    from swarm.training.strategies import make_strategy

    with pytest.raises(UserError) as caught:
        make_strategy("sync", peer=None, optimizer=None, max_grad_norm=0.0, options={"inner_steps": 5})
    assert str(caught.value) == "averaging.options: strategy sync: unknown option(s) inner_steps"


@pytest.mark.unit
def test_round_input_is_what_the_epoch_hands_over() -> None:
    work = RoundInput(epoch=3, gradient=[], samples=16, commitment="digest")
    assert (work.epoch, work.samples, work.commitment) == (3, 16, "digest")


@pytest.mark.e2e
def test_an_unknown_strategy_stops_a_peer_before_it_loads_anything(tmp_path: Path) -> None:
    argv = ["run", "--workdir", str(tmp_path / "w"), "--set", "averaging.strategy=nope"]
    result = run_swarm(argv, tmp_path, 120, clean_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "averaging.strategy: 'nope' is not a strategy" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_custom_strategy_selected_in_the_config_runs_every_round_of_a_swarm(tmp_path: Path) -> None:
    """A strategy that averages like sync but never changes the parameters, from a file, in a 2-peer swarm: both
    peers average every epoch through it (the same averaged update on both), their parameters never move, and the
    run still advances its epochs."""
    toy = tmp_path / "toy.py"
    toy.write_text(TOY_STRATEGY)
    result, summary = run_local(
        tmp_path, 2, 3, [f"averaging.strategy={toy}:AverageWithoutStepping"], timeout=280
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peers = summary["peers"]
    assert [peer["epochs"] for peer in peers] == [3, 3]
    steps = [
        [
            json.loads(line)
            for line in (tmp_path / "w" / f"peer_{index}" / "toy-steps.jsonl").read_text().splitlines()
        ]
        for index in range(2)
    ]
    assert [[line["epoch"] for line in lines] for lines in steps] == [[0, 1, 2], [0, 1, 2]]
    assert all(line["outcome"] == "averaged" for lines in steps for line in lines)
    assert [line["update"] for line in steps[0]] == [line["update"] for line in steps[1]]  # one average
    checksums = {line["params"] for lines in steps for line in lines} | {
        peer["param_checksum"] for peer in peers
    }
    assert len(checksums) == 1, "the parameters moved although the strategy never stepped them"
