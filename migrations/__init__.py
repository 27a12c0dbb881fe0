"""Alembic migrations; every schema change is a revision here, tested up and down."""
