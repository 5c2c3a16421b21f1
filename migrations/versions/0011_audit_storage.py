"""audit trail and storage accounting (issue 29): the audit_event table, a project's
optional storage quota, and the bytes of a job's stored edit inputs

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 10:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.core.columns import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_event",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_event_at", "audit_event", ["at"])
    op.create_index("ix_audit_event_project_id_id", "audit_event", ["project_id", "id"])
    op.create_index("ix_audit_event_action_id", "audit_event", ["action", "id"])
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_quota_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_bytes", sa.BigInteger(), nullable=True))
        batch_op.create_index(
            "ix_job_project_id_input_bytes",
            ["project_id", "input_bytes"],
            postgresql_where=sa.text("input_bytes IS NOT NULL"),
            sqlite_where=sa.text("input_bytes IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_project_id_input_bytes")
        batch_op.drop_column("input_bytes")
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("storage_quota_bytes")
    op.drop_index("ix_audit_event_action_id", table_name="audit_event")
    op.drop_index("ix_audit_event_project_id_id", table_name="audit_event")
    op.drop_index("ix_audit_event_at", table_name="audit_event")
    op.drop_table("audit_event")
