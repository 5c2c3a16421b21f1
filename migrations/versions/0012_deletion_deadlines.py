"""deletion on demand and deadlines (issue 29): job.deleted_at and batch.deleted_at
(tombstones, read as absent), job.deadline_at (Cancel-After)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 10:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.core.columns import UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deadline_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("deleted_at", UTCDateTime(), nullable=True))
        batch_op.create_index("ix_job_deadline_at", ["deadline_at"])
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_deadline_at")
        batch_op.drop_column("deleted_at")
        batch_op.drop_column("deadline_at")
