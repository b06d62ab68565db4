#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two or more cores: pytest-xdist workers, one per core up to 4, whole test files per worker
# (tests/conftest.py schedules them and gives each worker its share of the torch threads).
# Pass -n 0 to run in one process.
workers=$(.venv/bin/python -c "import os; print(min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")
if [ "$workers" -gt 1 ]; then
  exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
