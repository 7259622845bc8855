#!/usr/bin/env bash
# Regenerate the unreleased revision 0002 from controller.models (development only: 0002 has
# not shipped yet, so it is rewritten rather than followed by fix-up revisions).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f controller/alembic/versions/0002_*.py
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m controller.migrations revision -m "pool policy and compliance evidence"
