# Sourced by tests/run.sh and launch/quickstart.sh: create or reuse .venv and install the pinned stack.
# Reinstalls only when requirements*.txt, constraints.txt or pyproject.toml change (a stamp holds their hash).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.megatron_hope_installed
want=$(cat requirements.txt requirements-test.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the pinned stack into .venv (first run takes about a minute)"
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c constraints.txt -r requirements-test.txt
  .venv/bin/python -m pip install -q -c constraints.txt --no-deps -e .
  echo "$want" > "$stamp"
fi
source .venv/bin/activate
