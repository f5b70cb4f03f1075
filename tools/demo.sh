#!/usr/bin/env bash
# The demo: set up, start the stack (`edgecollab up`), ask it questions, run the paper's two
# scenarios, stop it. Answers come from SmolLM2-135M on this machine, with their provenance.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
ec=.venv/bin/edgecollab
broker="${EDGECOLLAB_DEMO_BROKER:-localhost:1883}"

$ec up --broker "$broker" > demo-up.log 2>&1 &
up_pid=$!
trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid 2>/dev/null || true' EXIT  # SIGINT is ignored by background jobs

$ec agents --broker "$broker" --timeout 120 \
  --wait-for orchestrator-1,classifier-1,worker-1,wearable-1,camera-1,air-1,noise-1,traffic-1
for question in "What is the capital of France?" "Write a haiku about edge computing."; do
  echo
  echo "\$ edgecollab ask \"$question\""
  $ec ask --broker "$broker" --max-tokens 40 "$question"
done
for scenario in health city; do
  echo
  echo "\$ edgecollab demo $scenario"
  $ec demo --broker "$broker" "$scenario"
done
echo
echo "(stack log: demo-up.log)"
