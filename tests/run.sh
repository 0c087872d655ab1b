#!/usr/bin/env bash
# The test command: creates or reuses .venv, installs the project and its test dependencies, runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k inner_loop`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected: that is a failure of the suite, not a pass.
exit $rc
