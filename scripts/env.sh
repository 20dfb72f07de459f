#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv with every role installed.
# Sourced by scripts/test.sh and scripts/demo.sh; re-installs only when pyproject.toml changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LDD_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
stamp="$venv/.ldd-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing dependencies into $venv (first run: a few minutes)"
  # torch/torchvision first, pinned to builds this machine has on disk; the project's ranges admit them.
  "$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  "$venv/bin/pip" install -q -e "$root[train,serve,queue,openvino,dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
