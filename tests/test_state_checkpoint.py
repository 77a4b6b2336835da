"""Tests for the tiny offline model, the flat training state peers exchange (swarm.node.state) and
crash-safe checkpoints (swarm.training.checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import swarm.training.checkpoint as checkpoint_module
import swarm.training.model as model_module
from swarm.config import ModelConfig
from swarm.node.state import TrainingState, param_checksum, tensors_hash
from swarm.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from swarm.training.model import build_char_tokenizer, load_model_and_tokenizer, tiny_model_dir

pytestmark = pytest.mark.unit

ALPHABET = "0123456789+="
TEXTS = ["12+7=19", "3+4=7", "9+9=18"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    load_model_and_tokenizer(ModelConfig(), ALPHABET, root)  # build the tiny model once for the module
    return root


def _fresh(cache_root: Path, lr: float = 1e-2) -> tuple[torch.nn.Module, object, torch.optim.Optimizer]:
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), ALPHABET, cache_root)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, tokenizer, optimizer


def _step(model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer, text: str) -> None:
    """One real training step on ``text`` (causal LM loss), so Adam has statistics."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def _optimizer_stats(state: TrainingState) -> list[dict[str, torch.Tensor]]:
    return [
        {key: value.clone() for key, value in state.optimizer.state.get(param, {}).items()}
        for param in state.params
    ]


def _assert_same_stats(first: list[dict[str, torch.Tensor]], second: list[dict[str, torch.Tensor]]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ---- tiny model and tokenizer -----------------------------------------------------------------------------------
def test_tiny_model_is_cached_and_reloaded_from_its_directory(tmp_path: Path, monkeypatch) -> None:
    first, _ = load_model_and_tokenizer(ModelConfig(), ALPHABET, tmp_path)
    directory = tiny_model_dir(ModelConfig(), ALPHABET, tmp_path)
    assert (directory / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]  # no staging directory left behind

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt instead of loaded")

    loaded_from = []
    real_from_pretrained = model_module.AutoModelForCausalLM.from_pretrained

    def spy(source, *args, **kwargs):
        loaded_from.append(Path(source))
        return real_from_pretrained(source, *args, **kwargs)

    monkeypatch.setattr(model_module, "_tiny_model", must_not_rebuild)
    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", spy)
    second, _ = load_model_and_tokenizer(ModelConfig(), ALPHABET, tmp_path)
    assert loaded_from == [directory]
    assert param_checksum(second) == param_checksum(first)


def test_same_config_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    a, _ = load_model_and_tokenizer(ModelConfig(), ALPHABET, tmp_path / "a")
    b, _ = load_model_and_tokenizer(ModelConfig(), ALPHABET, tmp_path / "b")
    c, _ = load_model_and_tokenizer(ModelConfig(init_seed=1), ALPHABET, tmp_path / "c")
    assert param_checksum(a) == param_checksum(b)
    assert param_checksum(c) != param_checksum(a)


def test_tokenizer_round_trips_arithmetic(cache_root: Path) -> None:
    _, tokenizer, _ = _fresh(cache_root)
    ids = tokenizer.encode("12+7=")
    assert len(ids) == 5  # one token per character, no special tokens added
    assert tokenizer.decode(ids) == "12+7="


def test_loaded_tokenizer_is_the_character_tokenizer_it_was_built_from(tmp_path: Path) -> None:
    # The arithmetic recipes' alphabet includes a space; what the model trains on must be what the recipe wrote.
    alphabet = "0123456789+-*= "
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), alphabet, tmp_path)
    built = build_char_tokenizer(alphabet)
    for text in ["3+4=7", "3 + 4 = 7", "12*3 =36"]:
        assert tokenizer.encode(text) == built.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings


# ---- TrainingState ----------------------------------------------------------------------------------------------
def test_checksum_equal_for_same_config_and_changes_after_a_step(cache_root: Path) -> None:
    a, tokenizer, optimizer = _fresh(cache_root)
    b, _, _ = _fresh(cache_root)
    assert param_checksum(a) == param_checksum(b)
    _step(a, tokenizer, optimizer, TEXTS[0])
    assert param_checksum(a) != param_checksum(b)


def test_snapshot_load_restores_parameters_and_optimizer_statistics(cache_root: Path) -> None:
    model, tokenizer, optimizer = _fresh(cache_root)
    _step(model, tokenizer, optimizer, TEXTS[0])
    source = TrainingState(model, optimizer)
    assert any(key == "exp_avg_sq" for _, key in source.layout())
    metadata, tensors = source.snapshot(epoch=7)
    expected_checksum, expected_stats = param_checksum(model), _optimizer_stats(source)

    # the snapshot is a copy: training on does not change it
    _step(model, tokenizer, optimizer, TEXTS[1])
    assert tensors_hash(7, tensors) == metadata["state_hash"]

    # a peer that never trained (no optimizer statistics yet) takes the snapshot over
    other_model, _, other_optimizer = _fresh(cache_root)
    target = TrainingState(other_model, other_optimizer)
    assert target.load(metadata, tensors) == 7
    assert param_checksum(other_model) == expected_checksum
    _assert_same_stats(_optimizer_stats(target), expected_stats)
    assert target.state_hash(7) == metadata["state_hash"]

    # and the next step from the restored state is the same step the original would have taken
    reference_model, _, reference_optimizer = _fresh(cache_root)
    TrainingState(reference_model, reference_optimizer).load(metadata, tensors)
    _step(other_model, tokenizer, other_optimizer, TEXTS[2])
    _step(reference_model, tokenizer, reference_optimizer, TEXTS[2])
    restored_again = TrainingState(model, optimizer)
    restored_again.load(metadata, tensors)
    _step(model, tokenizer, optimizer, TEXTS[2])
    assert param_checksum(other_model) == param_checksum(model) == param_checksum(reference_model)


def test_load_rejects_tampered_tensors_and_leaves_model_untouched(cache_root: Path) -> None:
    model, tokenizer, optimizer = _fresh(cache_root)
    _step(model, tokenizer, optimizer, TEXTS[0])
    metadata, tensors = TrainingState(model, optimizer).snapshot(epoch=3)

    victim, victim_tokenizer, victim_optimizer = _fresh(cache_root)
    _step(victim, victim_tokenizer, victim_optimizer, TEXTS[1])
    victim_state = TrainingState(victim, victim_optimizer)
    before_checksum, before_stats = param_checksum(victim), _optimizer_stats(victim_state)

    for index in (0, len(tensors) - 1):  # one parameter, one optimizer statistic
        tampered = [tensor.clone() for tensor in tensors]
        tampered[index].view(-1)[0] += 1.0
        with pytest.raises(ValueError, match="hash"):
            victim_state.load(metadata, tampered)
        assert param_checksum(victim) == before_checksum
        _assert_same_stats(_optimizer_stats(victim_state), before_stats)

    with pytest.raises(ValueError, match="hash"):  # right tensors, announced for another epoch
        victim_state.load(dict(metadata, epoch=4), tensors)
    assert param_checksum(victim) == before_checksum


def test_load_rejects_wrong_tensor_count(cache_root: Path) -> None:
    model, tokenizer, optimizer = _fresh(cache_root)
    _step(model, tokenizer, optimizer, TEXTS[0])
    metadata, tensors = TrainingState(model, optimizer).snapshot(epoch=1)
    victim, _, victim_optimizer = _fresh(cache_root)
    before = param_checksum(victim)
    state = TrainingState(victim, victim_optimizer)
    for bad in (tensors[:-1], [*tensors, tensors[0].clone()]):
        # even with a matching hash, which a dishonest peer can always compute for what it sends
        with pytest.raises(ValueError, match="tensors"):
            state.load(dict(metadata, state_hash=tensors_hash(1, bad)), bad)
        assert param_checksum(victim) == before
        assert not victim_optimizer.state


def test_load_rejects_a_state_of_another_shape(cache_root: Path, tmp_path: Path) -> None:
    small, small_tokenizer = load_model_and_tokenizer(ModelConfig(hidden_size=32), ALPHABET, tmp_path)
    small_optimizer = torch.optim.AdamW(small.parameters(), lr=1e-2)
    _step(small, small_tokenizer, small_optimizer, TEXTS[0])
    metadata, tensors = TrainingState(small, small_optimizer).snapshot(epoch=2)

    victim, _, victim_optimizer = _fresh(cache_root)
    before = param_checksum(victim)
    with pytest.raises(ValueError, match="shape"):
        TrainingState(victim, victim_optimizer).load(metadata, tensors)
    assert param_checksum(victim) == before
    assert not victim_optimizer.state


def test_load_rejects_optimizer_statistics_of_the_wrong_shape(cache_root: Path) -> None:
    # A downloaded state is untrusted input: statistics that do not fit their parameter must be refused at load
    # time, not crash the next optimizer step.
    model, tokenizer, optimizer = _fresh(cache_root)
    _step(model, tokenizer, optimizer, TEXTS[0])
    metadata, tensors = TrainingState(model, optimizer).snapshot(epoch=2)
    first_stat = len(tensors) - len(metadata["layout"])
    index = next(i for i, (_, key) in enumerate(metadata["layout"]) if key == "exp_avg") + first_stat
    forged = [tensor.clone() for tensor in tensors]
    forged[index] = torch.zeros(3)
    forged_metadata = dict(metadata, state_hash=tensors_hash(2, forged))

    victim, victim_tokenizer, victim_optimizer = _fresh(cache_root)
    before = param_checksum(victim)
    with pytest.raises(ValueError):
        TrainingState(victim, victim_optimizer).load(forged_metadata, forged)
    assert param_checksum(victim) == before
    _step(victim, victim_tokenizer, victim_optimizer, TEXTS[1])  # the peer can still train


# ---- checkpoints ------------------------------------------------------------------------------------------------
def _payload(cache_root: Path, epoch: int) -> dict:
    model, tokenizer, optimizer = _fresh(cache_root)
    _step(model, tokenizer, optimizer, TEXTS[epoch % len(TEXTS)])
    metadata, tensors = TrainingState(model, optimizer).snapshot(epoch=epoch)
    return dict(
        metadata=metadata, tensors=tensors, history=[dict(epoch=epoch, reward=0.5)], samples=16 * epoch
    )


def _assert_same_payload(loaded: dict | None, expected: dict) -> None:
    assert loaded is not None
    assert loaded["metadata"] == expected["metadata"]
    assert loaded["history"] == expected["history"]
    assert loaded["samples"] == expected["samples"]
    assert len(loaded["tensors"]) == len(expected["tensors"])
    assert all(torch.equal(a, b) for a, b in zip(loaded["tensors"], expected["tensors"]))


def test_checkpoint_round_trip_restores_the_training_state(cache_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "work" / CHECKPOINT_FILE
    payload = _payload(cache_root, epoch=1)
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    _assert_same_payload(loaded, payload)

    model, _, optimizer = _fresh(cache_root)
    state = TrainingState(model, optimizer)
    assert state.load(loaded["metadata"], loaded["tensors"]) == 1
    assert state.state_hash(1) == payload["metadata"]["state_hash"]

    newer = _payload(cache_root, epoch=2)
    save_checkpoint(path, newer)  # replaces the old one
    _assert_same_payload(load_checkpoint(path), newer)
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_FILE]  # no staging file left


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE) is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_is_none_not_an_exception(cache_root: Path, tmp_path: Path, damage: str) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _payload(cache_root, epoch=1))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    assert load_checkpoint(path) is None


def test_leftover_staging_file_never_replaces_the_checkpoint(cache_root: Path, tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    payload = _payload(cache_root, epoch=1)
    save_checkpoint(path, payload)
    # a peer killed while writing its next checkpoint leaves a torn staging file behind
    leftover = path.with_name(f"{path.name}.tmp99999")
    leftover.write_bytes(path.read_bytes()[:100])
    _assert_same_payload(load_checkpoint(path), payload)
    newer = _payload(cache_root, epoch=2)
    save_checkpoint(path, newer)
    _assert_same_payload(load_checkpoint(path), newer)


def test_crash_while_saving_keeps_the_previous_checkpoint(
    cache_root: Path, tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / CHECKPOINT_FILE
    payload = _payload(cache_root, epoch=1)
    save_checkpoint(path, payload)

    def torn_save(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(OSError):
        save_checkpoint(path, _payload(cache_root, epoch=2))
    monkeypatch.undo()
    _assert_same_payload(load_checkpoint(path), payload)
