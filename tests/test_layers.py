"""The layering of docs/design.md §1 holds: the import-linter contracts in pyproject.toml pass (the test command
runs ``lint-imports`` too), they would catch an upward import, and no module takes part in an import cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.conftest import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration
def test_the_layer_contracts_are_kept() -> None:
    result = _lint(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.integration
def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contracts are not vacuous: the network layer importing the trainer fails them, naming the import."""
    shutil.copytree(PROJECT_ROOT / "swarm", tmp_path / "swarm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "swarm" / "network" / "upward.py").write_text("import swarm.training.trainer\n")
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
    )
    assert result.returncode != 0
    assert "swarm.network.upward -> swarm.training.trainer" in result.stdout


@pytest.mark.unit
def test_no_module_is_part_of_an_import_cycle() -> None:
    graph = grimp.build_graph("swarm", exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                chain = graph.find_shortest_chain(importer=imported, imported=module)
                cycles.append(" -> ".join([module, *chain]))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
