#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test suite against a real mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/mypy schemas services  # the contract and the services type-check (topics bind payloads)
exec .venv/bin/python -m pytest -q "$@"
