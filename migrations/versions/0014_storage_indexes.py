"""storage accounting indexes (issue 29): a project's live image bytes summed from an
index alone, and its deleted jobs found without reading its other jobs

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.create_index(
            "ix_image_live_project_id_size_bytes",
            ["project_id", "size_bytes"],
            postgresql_where=sa.text("expired_at IS NULL"),
            sqlite_where=sa.text("expired_at IS NULL"),
        )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(
            "ix_job_deleted_project_id",
            ["project_id"],
            postgresql_where=sa.text("deleted_at IS NOT NULL"),
            sqlite_where=sa.text("deleted_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_deleted_project_id")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index("ix_image_live_project_id_size_bytes")
