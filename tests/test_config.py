"""Tests for swarm.config: layering (file < SWARM_* environment < --set), typed values, and one-line errors
that name where the bad value came from and the dotted key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from swarm.config import DEFAULT_CONFIG_PATH, SwarmConfig, dump_config, load_config
from swarm.errors import ConfigError, UserError

pytestmark = pytest.mark.unit

NO_ENV: dict[str, str] = {}


def _config_error(path: Path | str | None = None, overrides=(), environ=NO_ENV) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides, environ=environ)
    error = caught.value
    assert isinstance(error, UserError)
    assert error.exit_code == 2
    message = str(error)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return error


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- loading and layering ---------------------------------------------------------------------------------------
def test_default_config_loads_and_matches_the_shipped_file() -> None:
    config = load_config(environ=NO_ENV)
    assert isinstance(config, SwarmConfig)
    shipped = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert config.run_id == shipped["run_id"]
    assert config.recipe.name == shipped["recipe"]["name"]
    assert config.recipe.options == shipped["recipe"]["options"]
    assert config.training.learning_rate == shipped["training"]["learning_rate"]
    assert config.network.initial_peers == []
    assert config.model.name_or_path is None  # the offline tiny model
    assert config.key_path == config.workdir / "identity.key"


def test_set_overrides_are_parsed_into_typed_fields() -> None:
    config = load_config(
        overrides=[
            "training.learning_rate=1e-4",
            "network.client_mode=true",
            "network.initial_peers=[a, b]",
            "training.max_epochs=3",
            "workdir=/tmp/somewhere",
        ],
        environ=NO_ENV,
    )
    assert isinstance(config.training.learning_rate, float)
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.network.client_mode is True
    assert config.network.initial_peers == ["a", "b"]
    assert config.training.max_epochs == 3
    assert config.workdir == Path("/tmp/somewhere")


def test_set_value_may_contain_equals_sign() -> None:
    config = load_config(overrides=["recipe.options={expr: a=b}"], environ=NO_ENV)
    assert config.recipe.options == {"expr": "a=b"}


def test_environment_variables_override_the_file() -> None:
    environ = {"SWARM_TRAINING__LEARNING_RATE": "0.003", "SWARM_INITIAL_PEERS": "a, b,"}
    config = load_config(environ=environ)
    assert config.training.learning_rate == pytest.approx(0.003)
    assert config.network.initial_peers == ["a", "b"]


def test_numeric_looking_strings_from_env_and_set_stay_strings() -> None:
    # Environment variables are always strings, and a run id / recipe name / work directory of digits is valid.
    config = load_config(environ={"SWARM_RUN_ID": "42"})
    assert config.run_id == "42"
    config = load_config(overrides=["run_id=2024", "recipe.name=2024", "workdir=2024"], environ=NO_ENV)
    assert (config.run_id, config.recipe.name, config.workdir) == ("2024", "2024", Path("2024"))


def test_precedence_set_over_environment_over_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  learning_rate: 0.1\n  seed: 5\nrun_id: from-file\n")
    environ = {"SWARM_TRAINING__LEARNING_RATE": "0.2", "SWARM_RUN_ID": "from-env"}

    only_file = load_config(path, environ=NO_ENV)
    assert only_file.training.learning_rate == pytest.approx(0.1)
    assert only_file.run_id == "from-file"

    with_env = load_config(path, environ=environ)
    assert with_env.training.learning_rate == pytest.approx(0.2)
    assert with_env.run_id == "from-env"
    assert with_env.training.seed == 5  # untouched keys keep the file's value

    with_set = load_config(path, ["training.learning_rate=0.3"], environ=environ)
    assert with_set.training.learning_rate == pytest.approx(0.3)
    assert with_set.run_id == "from-env"


def test_unrelated_swarm_variables_are_ignored() -> None:
    baseline = load_config(environ=NO_ENV)
    config = load_config(environ={"SWARM_VENV": "/opt/venv", "SWARM_RECIPE_PATH": "/x", "PATH": "/bin"})
    assert config == baseline


def test_file_sections_may_be_partial(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  hidden_size: 32\n")
    config = load_config(path, environ=NO_ENV)
    assert config.model.hidden_size == 32
    assert config.model.num_layers == SwarmConfig().model.num_layers


def test_dump_config_round_trips(tmp_path: Path) -> None:
    config = load_config(
        overrides=[
            "training.learning_rate=1e-4",
            "network.initial_peers=[/ip4/1.2.3.4/tcp/5/p2p/QmX]",
            "identity_path=keys/me.key",
            "recipe.options={max_operand: 20, operators: '+-'}",
            "averaging.compression=fp16",
        ],
        environ=NO_ENV,
    )
    path = _write(tmp_path, dump_config(config), "dumped.yaml")
    again = load_config(path, environ=NO_ENV)
    assert again == config
    assert again.identity_path == Path("keys/me.key")
    assert dump_config(again) == dump_config(config)


# ---- errors -----------------------------------------------------------------------------------------------------
def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "run_id: x\nmodel:\n  hidden_size: 64: 32\n  num_layers: 2\n")
    message = str(_config_error(path))
    assert str(path) in message
    assert f"{path}:3" in message
    assert "YAML" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "run_id: x\nlearning_rate: 0.1\n")
    message = str(_config_error(path))
    assert str(path) in message
    assert "learning_rate" in message
    assert "unknown key" in message


def test_unknown_nested_key_lists_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  hiden_size: 32\n")
    message = str(_config_error(path))
    assert str(path) in message
    assert "model.hiden_size" in message
    for allowed in ("hidden_size", "num_layers", "name_or_path"):
        assert allowed in message


def test_unknown_key_from_set_names_the_override() -> None:
    message = str(_config_error(overrides=["training.lerning_rate=0.1"]))
    assert "--set training.lerning_rate" in message
    assert "learning_rate" in message.split("allowed", 1)[1]


def test_unknown_section_from_set_names_the_override_not_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "run_id: x\n")
    message = str(_config_error(path, overrides=["nework.client_mode=true"]))
    assert "--set nework.client_mode" in message
    assert str(path) not in message  # the file has no such key; blaming it sends the user to the wrong place
    assert "network" in message


def test_wrong_type_in_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  prompts_per_round: many\n")
    message = str(_config_error(path))
    assert str(path) in message
    assert "training.prompts_per_round" in message


def test_wrong_type_from_set_names_override_and_key() -> None:
    message = str(_config_error(overrides=["training.learning_rate=fast"]))
    assert "--set training.learning_rate" in message
    assert "training.learning_rate:" in message


def test_wrong_type_from_environment_names_the_variable() -> None:
    message = str(_config_error(environ={"SWARM_TRAINING__LEARNING_RATE": "fast"}))
    assert "SWARM_TRAINING__LEARNING_RATE" in message
    assert "training.learning_rate" in message


def test_invalid_value_in_list_names_the_element() -> None:
    message = str(_config_error(overrides=["network.initial_peers=[a, [1]]"]))
    assert "--set network.initial_peers" in message
    assert "network.initial_peers.1" in message


def test_set_without_equals_sign() -> None:
    message = str(_config_error(overrides=["training.learning_rate"]))
    assert "--set" in message
    assert "training.learning_rate" in message
    assert "KEY=VALUE" in message


def test_set_into_a_scalar_is_refused() -> None:
    message = str(_config_error(overrides=["run_id.name=x"]))
    assert "--set run_id.name" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = str(_config_error(path))
    assert str(path) in message
    assert "not found" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    message = str(_config_error(path))
    assert str(path) in message
    assert "mapping" in message


def test_empty_file_means_all_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "# nothing here\n")
    assert load_config(path, environ=NO_ENV) == SwarmConfig()


def test_swarm_config_with_another_recipe_shows_that_recipes_options_not_the_files(capsys) -> None:
    """configs/default.yaml holds the arithmetic recipe's options: another recipe starts from its own defaults
    (what `swarm run --recipe` trains with too), and options set on the command line still apply."""
    import yaml

    from swarm.cli import main

    assert main(["config", "--recipe", "arithmetic_sft"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["recipe"] == {"name": "arithmetic_sft", "options": {}}
    assert main(["config", "--recipe", "arithmetic_sft", "--set", "recipe.options.max_operand=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["recipe"]["options"] == {"max_operand": 3}
    assert main(["config", "--recipe", "arithmetic"]) == 0  # the file's own recipe keeps the file's options
    assert yaml.safe_load(capsys.readouterr().out)["recipe"]["options"] == {
        "max_operand": 9,
        "operators": "+",
    }
