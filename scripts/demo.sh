#!/usr/bin/env bash
# Set up and run the main job: `asicfleet demo` — a controller, a 200-miner simulated farm on
# loopback and an enrolled agent enforcing the approved pool set (needs root for the simulated
# miners' ports 80 and 4028). Ctrl-C stops everything. Extra arguments go to `asicfleet demo`,
# e.g. `bash scripts/demo.sh --miners 1000 --exit-when-compliant`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/asicfleet demo "$@"
