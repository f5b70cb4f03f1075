#!/usr/bin/env bash
# The demo: set up, start the stack (`edgecollab up`), ask it a few questions, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
ec=.venv/bin/edgecollab
broker="${EDGECOLLAB_DEMO_BROKER:-localhost:1883}"

$ec up --broker "$broker" > demo-up.log 2>&1 &
up_pid=$!
trap 'kill -INT $up_pid 2>/dev/null; wait $up_pid 2>/dev/null || true' EXIT

$ec agents --broker "$broker" --wait-for orchestrator-1,classifier-1,worker-1 --timeout 120
for question in \
    "What is the capital of France?" \
    "Summarise the air quality near the stadium." \
    "How can edge devices cooperate?"; do
  echo
  echo "\$ edgecollab ask \"$question\""
  $ec ask --broker "$broker" --max-tokens 40 "$question"
done
echo
echo "(stack log: demo-up.log)"
