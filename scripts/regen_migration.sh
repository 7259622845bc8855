#!/usr/bin/env bash
# Regenerate the unreleased revision 0002 from controller.models (development only: 0002 has
# not shipped yet, so it is rewritten rather than followed by fix-up revisions). Alembic does
# not drop the PostgreSQL enum types it creates; the downgrade is taught to, as in 0001.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f controller/alembic/versions/0002_*.py
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m controller.migrations revision -m "pool policy and compliance evidence"
.venv/bin/python - <<'PY'
import pathlib
import re

path = next(pathlib.Path("controller/alembic/versions").glob("0002_*.py"))
text = path.read_text()
names = sorted(set(re.findall(r'sa\.Enum\([^)]*name="(\w+)"', text)))
if names:
    marker = "    # ### end Alembic commands ###\n"
    head, _, tail = text.rpartition(marker)
    drops = "    bind = op.get_bind()\n" + "".join(
        f'    sa.Enum(name="{name}").drop(bind, checkfirst=True)\n' for name in names
    )
    path.write_text(head + marker + drops + tail)
PY
