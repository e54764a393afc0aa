#!/usr/bin/env bash
# The two quick-start commands:
#   bash run.sh demo   set up, then run the main job on the embedded tiny model and task (CPU)
#   bash run.sh test   set up, then lint and run the test suite
# Set-up makes a virtual environment keyed by the hash of the requirement files, so a fresh
# clone (or CI) reuses it and a change of requirements builds a new one. QRPO_VENV overrides it.
set -euo pipefail
cd "$(dirname "$0")"
hash=$(cat requirements.txt requirements-dev.txt constraints-cpu.txt | sha1sum | cut -c1-12)
venv=${QRPO_VENV:-$HOME/.cache/qrpo/venv-$hash}
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  constraints=()
  if ! command -v nvidia-smi >/dev/null 2>&1; then constraints=(-c constraints-cpu.txt); fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt "${constraints[@]}"
  touch "$venv/.complete"
fi
export PATH="$venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
  demo) shift; python -m pipelines.demo "$@" ;;
  test) shift; ruff check . && ruff format --check . && python -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh demo|test [args]"; exit 2 ;;
esac
