"""budgets: daily_budget_usd and monthly_budget_usd on project and api_key; the key
that created a batch (batch.key_id: its lines count against that key's budgets)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("project", "api_key"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("daily_budget_usd", sa.Float(), nullable=True))
            batch_op.add_column(sa.Column("monthly_budget_usd", sa.Float(), nullable=True))
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.drop_column("key_id")
    for table in ("api_key", "project"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("monthly_budget_usd")
            batch_op.drop_column("daily_budget_usd")
