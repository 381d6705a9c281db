#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv.
# The CPU torch wheel is installed explicitly first, so no dependency drags in a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
stamp=.venv/.mmai-setup-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/mmai ]; then
  exit 0
fi
echo "setting up .venv with $PY" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >&2 || true
.venv/bin/python -m pip install -q "torch==2.13.0" >&2
.venv/bin/python -m pip install -q -e ".[dev]" >&2
echo "$want" > "$stamp"
