#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with a CPU build of torch, then this project
# with its test oracles. Safe to run again: it only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # a CPU build; a bare `torch` would pull a multi-GB CUDA build

# the web page's browser tests (tests/test_web_browser.py) drive Debian's Chromium; in CI they fail without it, so
# install it here when it is missing and we may (root with apt-get); elsewhere say how, and the tests skip
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "note: no chromium/chromedriver: the web page's browser tests will skip (apt-get install chromium chromium-driver)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.rwkv-lora-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
  python -m pip install -q -e ".[dev]"
  rm -f .venv/.rwkv-lora-installed-*
  touch "$stamp"
fi
