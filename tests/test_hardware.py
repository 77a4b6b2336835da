"""Tests for swarm.hardware: tier choice on fabricated machines, the memory estimate and the check that refuses a
model too big for the machine before anything is downloaded, parameter counts from config.json, tier configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from swarm.config import ModelConfig, TrainingConfig, load_config
from swarm.errors import UserError
from swarm.hardware import (
    CONFIGS_DIR,
    GIB,
    KNOWN_MODELS,
    Architecture,
    CudaDevice,
    Hardware,
    check_fits,
    choose_tier,
    count_parameters,
    detect_hardware,
    estimate_training_memory,
)
from swarm.training.model import load_model_and_tokenizer, tiny_model_dir

pytestmark = pytest.mark.unit

TIERS = ("cpu", "gpu-8gb", "gpu-12gb", "gpu-24gb")


def gpu(name: str, gib: float, bitsandbytes: bool = False) -> Hardware:
    return Hardware(
        cuda_devices=(CudaDevice(0, name, int(gib * GIB)),),
        cpu_count=8,
        total_ram=32 * GIB,
        available_ram=24 * GIB,
        bitsandbytes=bitsandbytes,
    )


# ---- detection and tiers ----------------------------------------------------------------------------------------
def test_detect_hardware_describes_this_machine() -> None:
    hw = detect_hardware()
    assert hw.cpu_count >= 1
    assert hw.total_ram is None or hw.total_ram > 0
    assert all(device.total_memory > 0 and device.name for device in hw.cuda_devices)
    assert hw.describe()


@pytest.mark.parametrize("hw", [Hardware(cpu_count=4, total_ram=16 * GIB), Hardware(mps=True, cpu_count=8)])
def test_no_cuda_gpu_means_the_cpu_tier(hw: Hardware) -> None:
    choice = choose_tier(hw)
    assert choice.name == "cpu" and choice.config_path == CONFIGS_DIR / "cpu.yaml"
    assert "cpu" in choice.reason and "tiny" in choice.reason
    assert "\n" not in choice.reason


@pytest.mark.parametrize(
    ("name", "gib", "tier", "model"),
    [
        ("NVIDIA GeForce RTX 3070", 7.8, "gpu-8gb", "Qwen2.5-0.5B-Instruct"),
        ("NVIDIA GeForce RTX 2060", 5.8, "gpu-8gb", "Qwen2.5-0.5B-Instruct"),
        ("NVIDIA GeForce RTX 3060", 11.76, "gpu-12gb", "Qwen2.5-1.5B-Instruct"),
        ("NVIDIA GeForce RTX 4080", 15.7, "gpu-12gb", "Qwen2.5-1.5B-Instruct"),
        ("NVIDIA GeForce RTX 4090", 23.6, "gpu-24gb", "Qwen2.5-3B-Instruct"),
        ("NVIDIA H100 80GB HBM3", 79.1, "gpu-24gb", "Qwen2.5-3B-Instruct"),
    ],
)
def test_gpu_tier_by_vram(name: str, gib: float, tier: str, model: str) -> None:
    choice = choose_tier(gpu(name, gib))
    assert choice.name == tier and choice.config_path == CONFIGS_DIR / f"{tier}.yaml"
    assert name in choice.reason and f"{gib:.1f} GiB" in choice.reason and model in choice.reason
    assert "LoRA r=16" in choice.reason and "\n" not in choice.reason
    # the chosen tier's own config fits the machine it was chosen for
    config = load_config(choice.config_path, environ={})
    assert config.model.name_or_path.endswith(model)
    check_fits(config.model, gpu(name, gib), config.training)


def test_bitsandbytes_is_mentioned_when_installed() -> None:
    assert any("load_in_4bit" in note for note in choose_tier(gpu("RTX", 8, bitsandbytes=True)).notes)
    assert choose_tier(gpu("RTX", 8)).notes == ()


@pytest.mark.parametrize("tier", TIERS)
def test_every_tier_config_loads(tier: str) -> None:
    config = load_config(CONFIGS_DIR / f"{tier}.yaml", environ={})
    assert config.run_id == f"swarm-{tier}"
    if tier == "cpu":
        assert config.model.name_or_path is None and config.model.lora_r == 0
        assert config.model_dump(exclude={"run_id"}) == load_config(environ={}).model_dump(exclude={"run_id"})
    else:
        assert config.model.name_or_path in KNOWN_MODELS and config.model.lora_r > 0
        assert config.model.dtype == "bfloat16" and not config.model.load_in_4bit


# ---- the memory estimate and the check --------------------------------------------------------------------------
def test_estimate_is_smaller_with_lora_and_with_four_bit() -> None:
    n = 1_500_000_000
    full = estimate_training_memory(n, "bfloat16")
    lora = estimate_training_memory(n, "bfloat16", lora=True, trainable_params=4_000_000)
    qlora = estimate_training_memory(n, "bfloat16", lora=True, four_bit=True, trainable_params=4_000_000)
    assert qlora < lora < full
    assert full >= n * 2 * 4  # bf16 weights + gradients + two AdamW statistics
    with_batch = estimate_training_memory(
        n,
        "bfloat16",
        lora=True,
        trainable_params=4_000_000,
        batch_tokens=2048,
        hidden_size=1536,
        num_layers=28,
        vocab_size=151936,
    )
    assert with_batch > lora + 2048 * 151936 * 4  # activations and logits are accounted for


def test_7b_on_an_8gb_gpu_is_refused_in_one_line() -> None:
    config = ModelConfig(name_or_path="Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16")
    with pytest.raises(UserError) as caught:
        check_fits(config, gpu("NVIDIA GeForce RTX 3070", 8.0))
    message = str(caught.value)
    assert "\n" not in message
    assert "Qwen/Qwen2.5-7B-Instruct" in message and "RTX 3070" in message and "8.0 GiB" in message
    assert "GiB to train" in message and "model.lora_r" in message
    with pytest.raises(UserError):  # LoRA does not save a 7B in bf16 on 8 GiB either
        check_fits(config.model_copy(update=dict(lora_r=16)), gpu("RTX 3070", 8.0))


def test_small_lora_model_fits_an_8gb_gpu_and_the_tiny_model_fits_anywhere() -> None:
    check_fits(
        ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16", lora_r=16),
        gpu("RTX 3070", 8.0),
        TrainingConfig(prompts_per_round=4, num_generations=4, micro_batch_size=4, max_completion_length=256),
    )
    check_fits(ModelConfig(), Hardware(total_ram=2 * GIB, available_ram=1 * GIB))
    check_fits(ModelConfig(), Hardware())  # memory unknown: let through


def test_cpu_training_is_checked_against_available_ram() -> None:
    config = ModelConfig(name_or_path="Qwen/Qwen2.5-1.5B-Instruct")  # float32, full fine-tuning: ~25 GiB
    with pytest.raises(UserError, match="free RAM"):
        check_fits(config, Hardware(cpu_count=8, total_ram=32 * GIB, available_ram=16 * GIB))


def test_unknown_models_are_let_through_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="swarm.hardware"):
        check_fits(ModelConfig(name_or_path="someone/some-model-70B"), gpu("RTX 3070", 8.0))
    assert "someone/some-model-70B" in caplog.text and "skipping the memory check" in caplog.text


def test_four_bit_needs_cuda_and_bitsandbytes() -> None:
    config = ModelConfig(name_or_path="Qwen/Qwen2.5-7B-Instruct", lora_r=16, load_in_4bit=True)
    with pytest.raises(UserError, match="model.load_in_4bit: .*CUDA"):
        check_fits(config, Hardware(total_ram=64 * GIB))
    with pytest.raises(UserError, match="model.load_in_4bit: .*bitsandbytes"):
        check_fits(config, gpu("RTX 4090", 24))
    check_fits(config, gpu("RTX 4090", 24, bitsandbytes=True), batch_tokens=1024)  # QLoRA 7B fits 24 GiB


# ---- parameter counts -------------------------------------------------------------------------------------------
def test_local_directory_count_matches_the_tiny_model(tmp_path: Path) -> None:
    model, _ = load_model_and_tokenizer(ModelConfig(), "0123456789+=", tmp_path)
    directory = tiny_model_dir(ModelConfig(), "0123456789+=", tmp_path)
    counted = count_parameters(json.loads((directory / "config.json").read_text()))
    real = sum(param.numel() for param in model.parameters())
    assert abs(counted - real) <= 0.01 * real
    sized = check_fits  # the same directory, named as a local path, is sized from its config.json
    sized(ModelConfig(name_or_path=str(directory)), Hardware(total_ram=4 * GIB, available_ram=4 * GIB))


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"])
def test_known_model_table_matches_transformers(name: str) -> None:
    """The built-in table's sizes give the parameter count transformers builds (on the meta device: no memory)."""
    fields = {key: value for key, value in KNOWN_MODELS[name].items() if key != "model_type"}
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**fields))
    assert count_parameters(KNOWN_MODELS[name]) == sum(param.numel() for param in model.parameters())


def test_known_model_counts_are_the_published_ones() -> None:
    published = {"0.5B": 494e6, "1.5B": 1.54e9, "3B": 3.09e9, "7B": 7.6e9}
    for size, count in published.items():
        assert abs(count_parameters(KNOWN_MODELS[f"Qwen/Qwen2.5-{size}-Instruct"]) - count) < 0.01 * count


def test_llama_style_config_count() -> None:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    assert count_parameters(config.to_dict()) == sum(param.numel() for param in model.parameters())
    with pytest.raises(ValueError, match="model_type"):
        Architecture.from_config({"model_type": "mixtral", "hidden_size": 64})


def test_the_memory_check_sizes_rows_by_the_recipe_not_a_512_token_guess() -> None:
    """A 34M-parameter tiny model with the arithmetic recipe (rows of ~20 tokens) trains in a few GiB; sized as
    512-token rows it was refused on a machine with 8 GiB free ("needs about 20 GiB")."""
    model = ModelConfig(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=2048, max_positions=256
    )
    machine = Hardware(cpu_count=2, total_ram=24 * GIB, available_ram=8 * GIB)
    with pytest.raises(UserError, match="needs about"):
        check_fits(model, machine, TrainingConfig())
    check_fits(model, machine, TrainingConfig(), row_tokens=4 + 16)  # "9+9=" and the recipe's 16 tokens
