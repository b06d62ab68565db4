#!/usr/bin/env bash
# Set everything up, then run the main job: train a small model on the shared data, evaluate it
# and print the results table (CPU, under 15 minutes). Pass --data-root DIR for another location.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fashion-retrieval demo "$@"
