"""The Alembic migrations create exactly the schema the code declares, on both databases."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from storage.index import create_engine, metadata, run_migrations


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    url = request.getfixturevalue("fresh_postgres_url")
    return url.replace("postgresql://", "postgresql+psycopg://")


def test_migrations_build_the_declared_schema(empty_database):
    engine = create_engine(empty_database)
    run_migrations(engine)
    run_migrations(engine)  # a second run is a no-op
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    assert differences == []
    assert version == "0007"
