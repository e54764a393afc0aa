#!/usr/bin/env bash
# The two quick-start commands:
#   bash run.sh demo   set up, then run the main job on the embedded tiny model and task (CPU)
#   bash run.sh test   set up, then lint and run the test suite
# and `bash run.sh setup`, which only sets up (CI uses it to print the versions first).
#
# Set-up makes a virtual environment and installs this project into it, editable, with its dev
# and bench extras (pyproject.toml holds the dependency ranges; bench brings TRL, the training
# bench's baseline, so its tests run). The venv is keyed by the hash of
# pyproject.toml, constraints-cpu.txt and this checkout's path, so a change of dependencies builds
# a new one and another clone never runs this clone's code. QRPO_VENV names the venv instead;
# QRPO_FRESH_VENV=1 rebuilds it, taking the newest versions the ranges allow today.
set -euo pipefail
cd "$(dirname "$0")"
hash=$( (cat pyproject.toml constraints-cpu.txt; pwd -P) | sha1sum | cut -c1-12)
venv=${QRPO_VENV:-$HOME/.cache/qrpo/venv-$hash}
if [ "${QRPO_FRESH_VENV:-0}" = 1 ] || [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  constraints=()
  if ! command -v nvidia-smi >/dev/null 2>&1; then constraints=(-c constraints-cpu.txt); fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[dev,bench]" "${constraints[@]}"
  touch "$venv/.complete"
fi
export PATH="$venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python - <<'PY'
from importlib.metadata import PackageNotFoundError, version
names = "torch transformers accelerate datasets liger-kernel triton trl kernels".split()
def found(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"
print("versions: " + ", ".join(f"{n} {found(n)}" for n in names))
PY
case "${1:-}" in
  setup) ;;
  demo) shift; python -m qrpo.pipelines.demo "$@" ;;
  test) shift; ruff check . && ruff format --check . && python -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh demo|test [args]"; exit 2 ;;
esac
