"""``swarm export``: the researcher takes the swarm's model out in Hugging Face format, and it answers like the
model the peer evaluated (the run summary's held-out examples are its greedy answers at the last epoch)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from swarm.recipe import load_recipe
from tests.conftest import clean_env, run_swarm


def swarm(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_swarm(list(args), tmp_path, 240, clean_env())


@pytest.mark.e2e
@pytest.mark.timeout(400)
@pytest.mark.parametrize("lora", [0, 4])
def test_an_exported_model_loads_with_from_pretrained_and_answers_like_the_trained_one(
    tmp_path: Path, lora: int
) -> None:
    workdir = tmp_path / "peer"
    trained = swarm(
        tmp_path,
        "run",
        "--plain",
        "--max-epochs",
        "2",
        "--workdir",
        str(workdir),
        "--set",
        "monitor.wandb=disabled",
        "--set",
        "training.prompts_per_round=4",
        "--set",
        f"model.lora_r={lora}",
        "--set",
        "training.learning_rate=0.05",
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    held_out = json.loads((workdir / "summary.json").read_text())["peers"][0]["eval"]
    assert held_out["epoch"] == 2 and held_out["figures"]["eval/rows"] == 32

    exported = swarm(tmp_path, "export", "--workdir", str(workdir), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged into the base weights
    length = load_recipe("arithmetic").max_completion_length  # what the held-out evaluation generated
    for example in held_out["examples"]:
        ids = tokenizer(example["prompt"], return_tensors="pt", add_special_tokens=False)
        output = model.generate(
            **ids,
            max_new_tokens=length,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answer = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == example["completion"], example
    if lora:
        adapter = swarm(
            tmp_path, "export", "--workdir", str(workdir), "--out", str(tmp_path / "adapter"), "--adapter"
        )
        assert adapter.returncode == 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.e2e
def test_exporting_a_directory_that_is_no_peers_fails_with_one_line(tmp_path: Path) -> None:
    result = swarm(tmp_path, "export", "--workdir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"swarm: error: {tmp_path / 'config.yaml'}: not found (is {tmp_path} a peer's work directory?)"
    ]


@pytest.mark.unit
def test_the_held_out_evaluation_runs_once_per_epoch_of_progress() -> None:
    """A skipped or failed round leaves the epoch (and the model) where it was: no second evaluation of it (seen in a
    founding peer that retried epoch 0 for minutes, evaluating after every try)."""
    from types import SimpleNamespace

    from swarm.training.trainer import SwarmTrainer

    trainer = SimpleNamespace(peer=SimpleNamespace(epoch=0), evaluation=None)
    due = lambda: SwarmTrainer._evaluation_due(trainer, 5)  # noqa: E731
    assert not due()  # nothing trained yet
    trainer.peer.epoch = 5
    assert due()
    trainer.evaluation = dict(epoch=5)
    assert not due()  # the round of epoch 5 was skipped: still epoch 5
    trainer.peer.epoch = 7
    assert not due()
    trainer.peer.epoch = 10
    assert due() and not SwarmTrainer._evaluation_due(trainer, 0)
