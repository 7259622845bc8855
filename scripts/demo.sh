#!/usr/bin/env bash
# Set up and run the main job. For now: a 500-miner virtual farm on 127.10.0.0/16
# (needs root for ports 80 and 4028). Ctrl-C to stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p data
exec .venv/bin/asicfleet sim run --miners 500 --seed 7 \
    --mix antminer=60,whatsminer=25,avalon=10,vnish=5 \
    --faults blackhole=1%,malware=2% --inventory-out data/inventory.json "$@"
