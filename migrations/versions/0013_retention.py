"""retention (issue 29): per-project retention of images, files and job rows;
image.expired_at (its object gone, the job still readable), job.images_expire_at
(a request's own shorter life, Image-Expires-After), file.expires_at (Files
expires_after), batch.output_expires_after_seconds (its output files' life)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 10:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.core.columns import UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = sa.text("expired_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_retention_seconds", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("file_retention_seconds", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("job_retention_seconds", sa.Integer(), nullable=True))
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("images_expire_at", UTCDateTime(), nullable=True))
        batch_op.create_index("ix_job_images_expire_at", ["images_expire_at"])
        batch_op.create_index("ix_job_project_id_created_at", ["project_id", "created_at"])
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expired_at", UTCDateTime(), nullable=True))
    op.create_index(
        "ix_image_live_project_id_created_at",
        "image",
        ["project_id", "created_at"],
        postgresql_where=_LIVE,
        sqlite_where=_LIVE,
    )
    with op.batch_alter_table("file", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", UTCDateTime(), nullable=True))
        batch_op.create_index("ix_file_expires_at", ["expires_at"])
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.add_column(sa.Column("output_expires_after_seconds", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.drop_column("output_expires_after_seconds")
    with op.batch_alter_table("file", schema=None) as batch_op:
        batch_op.drop_index("ix_file_expires_at")
        batch_op.drop_column("expires_at")
    op.drop_index("ix_image_live_project_id_created_at", table_name="image")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_column("expired_at")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_project_id_created_at")
        batch_op.drop_index("ix_job_images_expire_at")
        batch_op.drop_column("images_expire_at")
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("job_retention_seconds")
        batch_op.drop_column("file_retention_seconds")
        batch_op.drop_column("image_retention_seconds")
