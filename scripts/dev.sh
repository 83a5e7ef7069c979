#!/usr/bin/env bash
# Sets itself up on a fresh machine, then runs the job:
#   bash scripts/dev.sh train [cifar-train flags...]   train (default: --preset 94, the fast recipe)
#   bash scripts/dev.sh test  [pytest args...]         ruff, lint-imports (the layers) + the test suite
#   bash scripts/dev.sh run CMD [args...]              any command inside the project's venv
# The venv (.venv, or $CIFAR_LIGHTNING_VENV) is built once and rebuilt when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CIFAR_LIGHTNING_VENV:-.venv}
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setting up $venv (first run only)..." >&2
    # torch's x86_64 wheel with its CUDA libraries fills about 7.6 GB: a new venv says so before
    # pip half-installs it (a rebuild after a pyproject.toml change reuses what is there).
    need_gb=9
    fresh=$([ -x "$venv/bin/python" ] || echo 1)
    mkdir -p "$venv"
    free_kb=$(df -Pk "$venv" | awk 'NR == 2 {print $4}')
    if [ -n "$fresh" ] && [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
        echo "error: setting up $venv needs about $need_gb GB free; $(df -Ph "$venv" | awk 'NR == 2 {print $6}') has $((free_kb / 1024 / 1024)) GB" >&2
        exit 1
    fi
    python3 -m venv "$venv"
    # torch/torchvision pinned to the capped releases: this avoids a multi-GB download of a newer one.
    # pip byte-compiles as it installs: where PYTHONDONTWRITEBYTECODE is set (as on these machines),
    # Python never caches what it compiles, and without pip's .pyc files every process that imports
    # torch compiles it again (4.9 s against 2.6 s to import torch, measured).
    # One pip call: one resolution for torch and the project together.
    "$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[dev]' 2>&1 | grep -v "is ignored" >&2 || true
    "$venv/bin/python" -c "import cifar_lightning, lightning, torchvision" || { echo "setup failed" >&2; exit 1; }
    touch "$stamp"
fi
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    train) exec "$venv/bin/cifar-train" "$@" ;;
    test) "$venv/bin/ruff" check . && "$venv/bin/lint-imports" && exec "$venv/bin/python" -m pytest "$@" ;;
    run) exec "$venv/bin/$1" "${@:2}" ;;
    *) echo "usage: bash scripts/dev.sh train|test|run ..." >&2; exit 2 ;;
esac
