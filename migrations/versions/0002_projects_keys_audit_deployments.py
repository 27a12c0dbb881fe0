"""projects, keys, audit, deployments

Every job, dataset, model and deployment now belongs to a project; rows that existed before this
revision move into the `default` project, which the upgrade creates.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 21:34:14.621679
"""

import sqlalchemy as sa
from alembic import op

import workers.tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


# 0001 left the datasets' unique(name) unnamed: SQLite reflects it nameless (batch mode names it
# through this convention), Postgres calls it datasets_name_key.
SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _dataset_name_unique() -> str:
    return "uq_datasets_name" if op.get_bind().dialect.name == "sqlite" else "datasets_name_key"


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("time", workers.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=26), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_project"), ["project"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_time"), ["time"], unique=False)

    op.create_table(
        "projects",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", workers.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.execute(
        sa.text(
            "INSERT INTO projects (name, description, created_at) "
            "VALUES ('default', 'created by migration 0002', CURRENT_TIMESTAMP)"
        )
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=26), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=26), nullable=True),
        sa.Column("created_at", workers.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", workers.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", workers.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["project"],
            ["projects.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hash"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_project"), ["project"], unique=False)

    op.create_table(
        "deployments",
        sa.Column("id", sa.String(length=26), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("engine", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=26), nullable=True),
        sa.Column("created_at", workers.tables.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project"],
            ["projects.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project", "name", name="uq_deployment_name"),
    )
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deployments_project"), ["project"], unique=False)

    with op.batch_alter_table("datasets", schema=None, naming_convention=SQLITE_NAMES) as batch_op:
        batch_op.add_column(sa.Column("project", sa.String(length=64), nullable=False, server_default="default"))
        batch_op.drop_constraint(_dataset_name_unique(), type_="unique")
        batch_op.create_index(batch_op.f("ix_datasets_project"), ["project"], unique=False)
        batch_op.create_unique_constraint("uq_dataset_name", ["project", "name"])
        batch_op.create_foreign_key("fk_datasets_project", "projects", ["project"], ["name"])

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("project", sa.String(length=64), nullable=False, server_default="default"))
        batch_op.create_index(batch_op.f("ix_jobs_project"), ["project"], unique=False)
        batch_op.create_foreign_key("fk_jobs_project", "projects", ["project"], ["name"])

    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("project", sa.String(length=64), nullable=False, server_default="default"))
        batch_op.drop_constraint(batch_op.f("uq_model_version"), type_="unique")
        batch_op.create_unique_constraint("uq_model_version", ["project", "name", "version"])
        batch_op.create_index(batch_op.f("ix_models_project"), ["project"], unique=False)
        batch_op.create_foreign_key("fk_models_project", "projects", ["project"], ["name"])


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_constraint("fk_models_project", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_models_project"))
        batch_op.drop_constraint("uq_model_version", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_model_version"), ["name", "version"])
        batch_op.drop_column("project")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_project", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_project"))
        batch_op.drop_column("project")

    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_constraint("fk_datasets_project", type_="foreignkey")
        batch_op.drop_constraint("uq_dataset_name", type_="unique")
        batch_op.drop_index(batch_op.f("ix_datasets_project"))
        batch_op.drop_column("project")
        batch_op.create_unique_constraint("datasets_name_key", ["name"])

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployments_project"))

    op.drop_table("deployments")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_project"))

    op.drop_table("api_keys")
    op.drop_table("projects")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_time"))
        batch_op.drop_index(batch_op.f("ix_audit_events_project"))

    op.drop_table("audit_events")
