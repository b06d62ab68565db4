#!/usr/bin/env bash
# Create .venv and install the project with its test and Milvus extras. Idempotent and quiet:
# a second run only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  echo "Installing fashion-retrieval and its dependencies into .venv (torch is large: a few minutes)..."
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,milvus,milvus-server]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import fashion_retrieval, torch, torchvision, faiss" || { echo "install failed" >&2; exit 1; }
  rm -f .venv/.installed-* && touch "$stamp"
fi
# The web page is tested in a real headless browser: Debian's chromium (root can install it).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Debian chromium + chromedriver for the browser test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "warning: chromium could not be installed; the browser test will be skipped" >&2
fi
