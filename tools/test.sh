#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test suite against a real mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
