"""Tests for LoRA fine-tuning (model.lora_r > 0): only adapters train, every peer starts from identical adapters,
and the flat training state peers exchange holds just the adapters and their optimizer statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import swarm.hardware as hardware
from swarm.config import ModelConfig
from swarm.errors import UserError
from swarm.hardware import GIB, CudaDevice, Hardware, model_architecture
from swarm.node.state import TrainingState, param_checksum
from swarm.training.model import add_lora, load_model_and_tokenizer, tiny_model_dir

pytestmark = pytest.mark.unit

ALPHABET = "0123456789+="
LORA = ModelConfig(lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    load_model_and_tokenizer(ModelConfig(), ALPHABET, root)
    return root


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _loss(model: torch.nn.Module, tokenizer, text: str = "12+7=19") -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return model(input_ids=ids, labels=ids).loss


def test_only_lora_parameters_require_grad(cache_root: Path) -> None:
    model, _ = load_model_and_tokenizer(LORA, ALPHABET, cache_root)
    trainable = _trainable(model)
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    expected = model_architecture(LORA).lora_parameters(LORA.lora_r, LORA.lora_target_modules)
    assert sum(param.numel() for param in trainable.values()) == expected
    assert {name.split(".")[-4] for name in trainable} == set(LORA.lora_target_modules)


def test_full_fine_tuning_is_unchanged_without_lora(cache_root: Path) -> None:
    model, _ = load_model_and_tokenizer(ModelConfig(), ALPHABET, cache_root)
    assert all(param.requires_grad for param in model.parameters())
    assert not any("lora" in name for name, _ in model.named_parameters())
    # LoRA settings do not change the base model: peers with and without adapters share the cached base
    assert tiny_model_dir(LORA, ALPHABET, cache_root) == tiny_model_dir(ModelConfig(), ALPHABET, cache_root)


def test_same_init_seed_gives_identical_adapters(cache_root: Path) -> None:
    first, _ = load_model_and_tokenizer(LORA, ALPHABET, cache_root)
    torch.manual_seed(12345)  # whatever the caller's random state, the adapters are the same
    second, _ = load_model_and_tokenizer(LORA, ALPHABET, cache_root)
    assert param_checksum(first) == param_checksum(second)
    for (name, a), (_, b) in zip(_trainable(first).items(), _trainable(second).items()):
        assert torch.equal(a, b), name
    assert any(param.abs().sum() > 0 for name, param in _trainable(first).items() if "lora_A" in name)
    other, _ = load_model_and_tokenizer(LORA.model_copy(update=dict(init_seed=1)), ALPHABET, cache_root)
    assert param_checksum(other) != param_checksum(first)


def test_adding_lora_leaves_the_callers_random_state_alone(cache_root: Path) -> None:
    model, _ = load_model_and_tokenizer(ModelConfig(), ALPHABET, cache_root)
    before = torch.random.get_rng_state()
    add_lora(model, LORA)
    assert torch.equal(before, torch.random.get_rng_state())


def test_backward_reaches_only_the_adapters(cache_root: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(LORA, ALPHABET, cache_root)
    _loss(model, tokenizer).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # B starts at zero (the wrapped model computes what the base did), so the first gradient is on B
    assert any(param.grad.abs().sum() > 0 for name, param in _trainable(model).items() if "lora_B" in name)


def test_training_state_round_trips_the_adapters(cache_root: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(LORA, ALPHABET, cache_root)
    optimizer = torch.optim.AdamW(list(_trainable(model).values()), lr=1e-2)
    for text in ("12+7=19", "3+4=7"):
        optimizer.zero_grad()
        _loss(model, tokenizer, text).backward()
        optimizer.step()
    state = TrainingState(model, optimizer)
    assert len(state.params) == len(_trainable(model))  # base weights are neither averaged nor checkpointed
    metadata, tensors = state.snapshot(epoch=2)

    fresh, _ = load_model_and_tokenizer(LORA, ALPHABET, cache_root)
    fresh_optimizer = torch.optim.AdamW(list(_trainable(fresh).values()), lr=1e-2)
    assert param_checksum(fresh) != param_checksum(model)
    fresh_state = TrainingState(fresh, fresh_optimizer)
    assert fresh_state.load(metadata, tensors) == 2
    assert param_checksum(fresh) == param_checksum(model)
    assert fresh_state.state_hash(2) == state.state_hash(2)


def test_unknown_target_module_is_a_user_error(cache_root: Path) -> None:
    with pytest.raises(UserError, match="model.lora_target_modules"):
        load_model_and_tokenizer(
            LORA.model_copy(update=dict(lora_target_modules=["nope_proj"])), ALPHABET, cache_root
        )


@pytest.mark.parametrize(
    ("config", "hw", "match"),
    [
        (ModelConfig(load_in_4bit=True), Hardware(), "lora_r"),
        (LORA.model_copy(update=dict(load_in_4bit=True)), Hardware(), "CUDA"),
        (
            LORA.model_copy(update=dict(load_in_4bit=True)),
            Hardware(cuda_devices=(CudaDevice(0, "RTX", 8 * GIB),)),
            "bitsandbytes",
        ),
    ],
)
def test_four_bit_is_refused_before_loading(
    config: ModelConfig, hw: Hardware, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardware, "detect_hardware", lambda: hw)
    with pytest.raises(UserError, match=f"model.load_in_4bit: .*{match}") as caught:
        load_model_and_tokenizer(config, ALPHABET, tmp_path)
    assert caught.value.exit_code == 2
    assert not any(tmp_path.iterdir())  # nothing was built or downloaded
