"""resumable uploads

Large model archives are sent in parts (`POST /api/v1/uploads`, then `PATCH` at the offset reached), so an
interrupted upload resumes instead of starting over. One row per unfinished upload; its parts are objects.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-09 03:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import workers.tables

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("project", sa.String(64), sa.ForeignKey("projects.name"), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("parts", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(26), nullable=True),
        sa.Column("created_at", workers.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", workers.tables.UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_uploads_project", "uploads", ["project"])


def downgrade() -> None:
    op.drop_index("ix_uploads_project", table_name="uploads")
    op.drop_table("uploads")
