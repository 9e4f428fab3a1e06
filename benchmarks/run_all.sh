#!/usr/bin/env bash
# Run every benchmark with its defaults (each about 1-4 minutes on a 2-core CPU). Each script
# prints its table, appends a section to docs/benchmarks.md and prints its RATIO line last.
# Extra arguments are passed to every script (e.g. --no-report, --data synthetic, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
for script in cached_vs_online teacher_throughput training_scaling loader cache_size; do
  echo "=== benchmarks/${script}.py"
  "$PY" "benchmarks/${script}.py" "$@"
done
