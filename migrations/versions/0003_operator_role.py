"""the operator role

Creating projects and setting their quotas move from every project's admin to the server's operator:
the first admin key of the `default` project (the one `crucible up` made and wrote to admin-key)
becomes its `operator`. No schema change: `api_keys.role` is a string.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM api_keys WHERE role = 'operator'")).scalar():
        return
    first = bind.execute(
        sa.text(
            "SELECT id FROM api_keys WHERE project = 'default' AND role = 'admin' AND revoked_at IS NULL "
            "ORDER BY created_at, id LIMIT 1"
        )
    ).scalar()
    if first is not None:
        bind.execute(sa.text("UPDATE api_keys SET role = 'operator' WHERE id = :id"), {"id": first})


def downgrade() -> None:
    op.execute(sa.text("UPDATE api_keys SET role = 'admin' WHERE role = 'operator'"))
