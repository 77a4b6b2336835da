#!/usr/bin/env bash
# launch.sh - one-command entry point for swarm: sets up a virtual environment, then starts a peer.
#
#   ./launch.sh                  detect the hardware, pick a tier config, start a peer (swarm run --tier auto)
#   ./launch.sh test [ARGS...]   ruff check + ruff format --check + lint-imports + pytest
#   ./launch.sh SUBCOMMAND ...   any swarm subcommand (run, local, ledger, recipe, doctor, config, export)
#   ./launch.sh ARGS...          anything else is passed to `swarm run ARGS...`
#
# Environment:
#   SWARM_VENV        virtual environment to create/reuse (default: .venv next to this script)
#   SWARM_PYTHON      python interpreter used to create the venv (default: python3.11, else python3)
#   SWARM_TORCH_SPEC  torch requirement installed before everything else (default: torch==2.13.0)
#   SWARM_TEST_WORKERS  pytest-xdist workers for `./launch.sh test` (default: 2; 0: one process)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SWARM_VENV:-$SCRIPT_DIR/.venv}"
TORCH_SPEC="${SWARM_TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.swarm-install-stamp"
SWARM_SUBCOMMANDS=(run local ledger recipe doctor config export)

log() { echo "launch.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    cat <<EOF
usage: ./launch.sh [test [PYTEST_ARGS...] | SUBCOMMAND [ARGS...] | RUN_ARGS... | -h | --help]

  (no arguments)          detect the hardware, pick a tier (no CUDA GPU: configs/cpu.yaml, the tiny offline model), start a
                          peer (= swarm run --tier auto)
  test [PYTEST_ARGS...]   run ruff (check, format), lint-imports, then the test suite (python -m pytest PYTEST_ARGS..., run in the project
                          directory, so paths are relative to it; on \$SWARM_TEST_WORKERS pytest-xdist workers, default 2, unless
                          PYTEST_ARGS name -n, --dist or -p no:xdist)
  SUBCOMMAND [ARGS...]    run 'swarm SUBCOMMAND ARGS...'; SUBCOMMAND is one of: ${SWARM_SUBCOMMANDS[*]}
  ARGS...                 anything else is passed on as 'swarm run ARGS...'
  -h, --help              this help, followed by 'swarm --help'

The first run creates a virtual environment (\$SWARM_VENV, default: $SCRIPT_DIR/.venv), installs torch
(\$SWARM_TORCH_SPEC, default: torch==2.13.0) and then swarm with its test extras; it re-installs only when
pyproject.toml changes.
EOF
}

find_python() {
    local candidates=()
    if [[ -n "${SWARM_PYTHON:-}" ]]; then
        candidates=("$SWARM_PYTHON")
    else
        candidates=(python3.11 python3)
    fi
    local py
    for py in "${candidates[@]}"; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    return 1
}

pyproject_hash() {
    "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        "$SCRIPT_DIR/pyproject.toml"
}

ensure_install() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        local py
        py="$(find_python)" || die "Python >= 3.11 is required (tried ${SWARM_PYTHON:-python3.11, python3}); install it or set SWARM_PYTHON"
        log "creating virtual environment $VENV with $py"
        "$py" -m venv "$VENV" || die "could not create virtual environment $VENV"
    fi
    "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "$VENV uses $("$VENV/bin/python" -V 2>&1); Python >= 3.11 is required (remove it or set SWARM_VENV)"

    local want have=""
    want="$(pyproject_hash)"
    [[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
    [[ "$want" == "$have" ]] && return 0

    local start=$SECONDS
    if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
        log "installing $TORCH_SPEC (first run)"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" ||
            die "pip install $TORCH_SPEC failed"
    fi
    if [[ -n "$have" ]]; then
        log "pyproject.toml changed: re-installing swarm into $VENV"
    else
        log "installing swarm and its dependencies into $VENV (a few minutes the first time)"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${SCRIPT_DIR}[test]" ||
        die "pip install -e '${SCRIPT_DIR}[test]' failed"
    echo "$want" >"$STAMP"
    log "install done in $((SECONDS - start)) s"
}

run_tests() {
    cd "$SCRIPT_DIR"
    local dirs=() d
    for d in swarm tests bench recipes; do
        [[ -d "$d" ]] && dirs+=("$d")
    done
    if ((${#dirs[@]})); then
        log "ruff check ${dirs[*]}"
        "$VENV/bin/python" -m ruff check "${dirs[@]}" || die "ruff check failed"
        log "ruff format --check ${dirs[*]}"
        "$VENV/bin/python" -m ruff format --check "${dirs[@]}" >/dev/null || {
            "$VENV/bin/python" -m ruff format --check "${dirs[@]}" | tail -n 20
            die "ruff format: run '.venv/bin/ruff format ${dirs[*]}'"
        }
    fi
    log "lint-imports (the layers in pyproject.toml)"
    "$VENV/bin/lint-imports" --no-cache >/dev/null || {
        "$VENV/bin/lint-imports" --no-cache | tail -n 30
        die "lint-imports: a module imports from a layer above its own (docs/design.md §1)"
    }
    # Two pytest-xdist workers unless the arguments choose (-n/--numprocesses/--dist, or -p no:xdist): the e2e
    # tests wait on timeouts and peers far more than they compute, so two workers finish a 2-core suite in about
    # two thirds of the serial time. SWARM_TEST_WORKERS=0 runs it in one process.
    local workers="${SWARM_TEST_WORKERS:-2}" a
    for a in "$@"; do
        case "$a" in
        -n | -n* | --numprocesses* | --dist* | no:xdist) workers="" ;;
        esac
    done
    [[ -n "$workers" && "$workers" != "0" ]] && set -- -n "$workers" --dist worksteal "$@"
    log "python -m pytest $*"
    exec "$VENV/bin/python" -m pytest "$@"
}

is_subcommand() {
    local s
    for s in "${SWARM_SUBCOMMANDS[@]}"; do
        [[ "$1" == "$s" ]] && return 0
    done
    return 1
}

main() {
    case "${1:-}" in
    -h | --help)
        usage
        ensure_install
        echo
        "$VENV/bin/swarm" --help
        exit $?
        ;;
    esac

    ensure_install

    if (($# == 0)); then
        exec "$VENV/bin/swarm" run --tier auto
    elif [[ "$1" == test ]]; then
        shift
        run_tests "$@"
    elif is_subcommand "$1"; then
        exec "$VENV/bin/swarm" "$@"
    else
        exec "$VENV/bin/swarm" run "$@"
    fi
}

main "$@"
