"""Every Alembic revision goes up and down cleanly, and head matches the SQLAlchemy models."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from workers.db import downgrade, upgrade
from workers.tables import Base


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    assert {"jobs", "metrics", "artifacts", "models", "datasets", "log_chunks"} <= set(
        inspect(create_engine(url)).get_table_names()
    )
    downgrade(url, "base")
    assert set(inspect(create_engine(url)).get_table_names()) <= {"alembic_version"}
    upgrade(url)


def test_head_schema_matches_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    with create_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree; add a revision: {diff}"


def test_0003_makes_the_first_admin_key_of_default_the_operator_and_back(tmp_path):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0002")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (name, description, created_at) VALUES ('other', '', '2026-01-01')"))
        for key_id, project, created in (
            ("k2", "default", "2026-02-01"),
            ("k1", "default", "2026-01-01"),
            ("k0", "other", "2025-01-01"),
        ):
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, project, role, name, prefix, hash, created_at) "
                    "VALUES (:id, :project, 'admin', '', 'cru_', :id, :created)"
                ),
                {"id": key_id, "project": project, "created": created},
            )
    roles = lambda: dict(engine.connect().execute(text("SELECT id, role FROM api_keys")).all())  # noqa: E731
    upgrade(url)
    assert roles() == {"k1": "operator", "k2": "admin", "k0": "admin"}
    downgrade(url, "0002")
    assert set(roles().values()) == {"admin"}
