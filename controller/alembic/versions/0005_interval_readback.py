"""compliance intervals keep the read-back they were judged on

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("compliance_interval", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pools", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("worker", AutoString(length=512), nullable=True))
        batch_op.add_column(sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compliance_interval", schema=None) as batch_op:
        batch_op.drop_column("checked_at")
        batch_op.drop_column("worker")
        batch_op.drop_column("pools")
