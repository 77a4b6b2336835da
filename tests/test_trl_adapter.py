"""Canary for swarm/trl_adapter.py, the one module that uses TRL's private API: the installed TRL is the minor
version pyproject.toml pins, and everything the adapter reaches into is still there with the same parameters.
An upgrade that moves any of it fails here, by name, before a swarm computes a gradient that replays differently."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import trl
from trl import GRPOConfig, GRPOTrainer

from swarm.trl_adapter import GRPOSettings, RecordingGRPOTrainer, grpo_config
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.unit


def test_the_installed_trl_is_the_pinned_minor_version() -> None:
    pin = re.search(r'"trl>=(\d+)\.(\d+),<(\d+)\.(\d+)"', (PROJECT_ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin trl to one minor version"
    low, high = (int(pin[1]), int(pin[2])), (int(pin[3]), int(pin[4]))
    installed = tuple(int(part) for part in trl.__version__.split(".")[:2])
    assert high == (low[0], low[1] + 1) and installed == low, f"trl {trl.__version__} is not the pinned {low}"


def test_the_private_methods_the_adapter_overrides_keep_their_signatures() -> None:
    expected = {
        "_generate_single_turn": [
            "self",
            "prompt_ids",
            "images",
            "multimodal_fields",
            "num_generations",
            "has_tool_images",
        ],
        "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
        "_generate_and_score_completions": ["self", "inputs"],
        "_prepare_inputs": ["self", "generation_batch"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == parameters, name
    overridden = {
        "_generate_single_turn",
        "_prepare_inputs",
        "_calculate_rewards",
        "_generate_and_score_completions",
    }
    assert overridden <= set(vars(RecordingGRPOTrainer)), "the adapter no longer overrides what it documents"


def test_the_helpers_and_attributes_the_adapter_reads_exist() -> None:
    from trl.trainer.utils import split_tensor_dict

    assert list(inspect.signature(split_tensor_dict).parameters) == ["tensor_dict", "num_chunks"]
    source = inspect.getsource(GRPOTrainer)
    for attribute in (
        "self._step",
        "self._buffered_inputs",
        "self._metrics",
        "self.num_iterations",
        "self.reward_func_names",
        "self.reward_weights",
        "self.use_vllm",
        "self.num_generations",
        "self.eos_token_ids",
        "self.processing_class(text=prompts)",
    ):
        assert attribute in source, f"GRPOTrainer no longer has {attribute}"
    config = grpo_config(GRPOSettings(), num_rows=2, output_dir=Path("unused"))
    assert isinstance(config, GRPOConfig) and config.steps_per_generation is not None
    assert (config.max_steps, config.beta, config.shuffle_dataset) == (1, 0.0, False)
