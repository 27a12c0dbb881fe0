"""archived projects

A project can be archived by the operator: it stays readable (jobs, metrics, artifacts, models, the audit log)
while every write is refused, until the operator restores it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 12:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import workers.tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("archived_at", workers.tables.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("archived_at")
