"""job upstream: a queue provider's jobs for this job (issue 27), recorded right
after each submit so a worker that dies then never submits again

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("upstream_open", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.create_index("ix_job_upstream_open_status", ["upstream_open", "status"])


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_upstream_open_status")
        batch_op.drop_column("upstream_open")
        batch_op.drop_column("upstream")
